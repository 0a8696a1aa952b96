"""Errors as one readable line: what every user-facing message, event and manifest entry shows.

Pure (no Ray import: Ray's wrappers are told apart by their module), so the scheduler and the CLI share it.
"""

from __future__ import annotations

from typing import Any

from farm.storage import redact

# farm's own errors already say what and where: their words are shown as they are
_OWN_WORDS = ("ModelError", "JobError")  # and their subclasses
_OWN_EXACT = ("VideoError", "StorageError", "SinkError")


class JobError(RuntimeError):
    """The job as a whole cannot run (e.g. the model does not load on any actor)."""


def cause(e: BaseException) -> BaseException:
    """The error a Ray task raised, unwrapped from Ray's ``RayTaskError`` (else ``e``)."""
    return getattr(e, "cause", None) or e


def one_line(e: BaseException, storage_options: dict[str, Any] | None = None) -> str:
    """The root error as one line, ``Name: message`` unless it is farm's own, with credentials removed."""
    c = cause(e)
    text = str(c).strip().splitlines()
    from_ray = type(c).__module__.startswith("ray.")  # Ray's own errors end with the line that matters
    line = text[-1] if from_ray and text else (text[0] if text else "")
    name = type(c).__name__
    own = any(k.__name__ in _OWN_WORDS for k in type(c).__mro__) or name in _OWN_EXACT
    if not own and not line.startswith(name):
        line = f"{name}: {line}"
    return redact(line, storage_options)
