"""What users see of an error: farm's error types, the one-line formatter and the credential scrubber.

Every message, event, manifest entry and log line goes through ``one_line`` and ``redact``. Pure (no Ray
import: Ray's wrappers are told apart by their module), so the scheduler, workers and the CLI share it.
"""

from __future__ import annotations

import os
import re
from typing import Any

# farm's own errors already say what and where: their words are shown as they are
_OWN_WORDS = ("ModelError", "JobError")  # and their subclasses
_OWN_EXACT = ("VideoError", "StorageError", "SinkError")


class StorageError(RuntimeError):
    """A storage operation that failed for good: ``<url>: <reason>``, one line, credentials redacted."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object (or bucket) does not exist; also a ``FileNotFoundError`` for callers that expect one."""


class WeightsError(RuntimeError):
    """A weights reference could not be resolved or loaded (one-line message, never a credential)."""


class JobError(RuntimeError):
    """The job as a whole cannot run (e.g. the model does not load on any actor)."""


def cause(e: BaseException) -> BaseException:
    """The error a Ray task raised, unwrapped from Ray's ``RayTaskError`` (else ``e``)."""
    return getattr(e, "cause", None) or e


def one_line(e: BaseException, storage_options: dict[str, Any] | None = None, named: bool = True) -> str:
    """The root error as one line with credentials removed: ``Name: message`` unless it is farm's own
    (``named=False``: the message alone, for messages that say what failed themselves)."""
    c = cause(e)
    text = str(c).strip().splitlines()
    from_ray = type(c).__module__.startswith("ray.")  # Ray's own errors end with the line that matters
    line = text[-1] if from_ray and text else (text[0] if text else "")
    name = type(c).__name__
    own = any(k.__name__ in _OWN_WORDS for k in type(c).__mro__) or name in _OWN_EXACT
    if not named:
        line = line or name
    elif not own and not line.startswith(name):
        line = f"{name}: {line}"
    return redact(line, storage_options)


# ---- the credential scrubber ----------------------------------------------------------------------

_SECRET_NAME = re.compile(r"key|secret|token|password|passwd|credential|signature|connection_string", re.I)
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|ACCOUNT_KEY", re.I)
_NOT_SECRET_VALUES = {"anon", "google_default", "cloud", "browser", "cache", "true", "false", "none"}
_NOT_SECRET = {"endpoint_url", "region_name", "key_file", "requester_pays", "use_ssl", "default_fill_cache"}
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s:]+(:[^/@\s]*)?@")
# query parameters of signed URLs (presigned S3, SAS tokens): X-Amz-Signature=..., sig=..., token=...
_SIGNED_QUERY = re.compile(r"([?&][^=&#\s]*(?:signature|sig|token|credential|key|password)[^=&#\s]*=)[^&#\s]+", re.I)


def _secrets(obj: Any, name: str = "", found: set[str] | None = None) -> set[str]:
    found = set() if found is None else found
    if isinstance(obj, dict):
        for k, v in obj.items():
            _secrets(v, str(k), found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _secrets(v, name, found)
    elif (isinstance(obj, str) and len(obj) >= 4 and _SECRET_NAME.search(name) and name not in _NOT_SECRET
          and obj.lower() not in _NOT_SECRET_VALUES):
        found.add(obj)
    return found


def redact(text: str, storage_options: dict[str, Any] | None = None) -> str:
    """Replace every credential in ``text`` with ``***``.

    Secrets are the string values under credential-like names anywhere in ``storage_options``
    (``key``, ``secret``, ``token``, ``client_kwargs.aws_secret_access_key``, ...), credential-like
    environment variables (``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ...), and the
    ``user:password@`` part of URLs and the signature parameters of signed URLs.
    """
    secrets = _secrets(storage_options or {})
    secrets |= {v for k, v in os.environ.items()
                if _SECRET_ENV.search(k) and len(v) >= 8 and v.lower() not in _NOT_SECRET_VALUES}
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return display_url(text)


def display_url(url: str) -> str:
    """A URL (or text holding URLs) as shown to users: no ``user:password@``, no signature parameters."""
    return _SIGNED_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))
