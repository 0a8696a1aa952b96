"""URL helpers for outputs and ledgers: join, the static prefix of a template, and joins that cannot
escape their prefix. Pure string work (no I/O)."""

from __future__ import annotations

import os
import re
import string

from fsspec.core import split_protocol

from farm.errors import StorageError
from farm.errors import display_url as _display


def join(base_url: str, *parts: str) -> str:
    """Join URL parts with single slashes (no escape checks: use ``safe_join`` for untrusted parts)."""
    out = base_url
    for part in parts:
        part = part.strip("/")
        if part:
            out = out + part if (not out or out.endswith("/")) else f"{out}/{part}"
    return out


def static_prefix(template: str) -> str:
    """The directory part of an output URI template before its first ``{placeholder}``.

    ``s3://b/renders/{job}/{stem}.mp4`` -> ``s3://b/renders``. The ledger lives under this prefix, so it
    is known before any placeholder is filled. A template whose bucket is a placeholder is refused.
    """
    literal = ""
    for text, field, _spec, _conv in string.Formatter().parse(template):
        literal += text
        if field is not None:
            break
    protocol, rest = split_protocol(literal)
    head = f"{protocol}://" if protocol else ""
    if "/" not in rest.lstrip("/") and protocol not in (None, "file", "local"):
        raise StorageError(f"{template}: the bucket must not contain a placeholder")
    if "/" not in rest:
        return head if protocol else "."
    directory = rest.rsplit("/", 1)[0]
    return head + (directory or "/")


_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def safe_join(prefix_url: str, relative: str) -> str:
    """``prefix_url/relative``, refusing any relative path that could land outside the prefix.

    Refused: ``..`` segments, absolute paths, URLs or drive letters (a colon in the first segment),
    backslashes, control characters, and paths that normalise to nothing. ``.`` and repeated
    slashes are dropped.
    """
    if not isinstance(relative, str):
        got = type(relative).__name__
        raise StorageError(f"{_display(prefix_url)}: relative path must be a string, got {got}")
    why = None
    if not relative:
        why = "empty relative path"
    elif "\\" in relative:
        why = "backslash in relative path"
    elif any(ord(c) < 32 or c == "\x7f" for c in relative):
        why = "control character in relative path"
    elif relative.startswith("/") or relative.startswith("~"):
        why = "absolute path"
    elif "://" in relative or _SCHEME_LIKE.match(relative):
        why = "relative path looks like a URL"
    segments = [s for s in relative.split("/") if s not in ("", ".")]
    if why is None and ".." in segments:
        why = "'..' segment in relative path"
    if why is None and not segments:
        why = "relative path is empty after normalisation"
    if why:
        raise StorageError(f"{_display(prefix_url)}: refused {relative!r}: {why}")
    return join(prefix_url, *segments)


def _normalise(url: str) -> tuple[str, str]:
    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return "file", os.path.abspath(path)
    return protocol, path.rstrip("/")


def check_inside(prefix_url: str, url: str) -> str:
    """Return ``url`` if it lies inside ``prefix_url`` (same protocol, below the prefix), else raise."""
    if ".." in url.replace("\\", "/").split("/"):
        raise StorageError(f"{_display(url)}: refused: '..' segment")
    p_proto, p_path = _normalise(prefix_url)
    u_proto, u_path = _normalise(url)
    root = p_path.rstrip("/")
    if p_proto != u_proto or not (u_path.startswith(root + "/") and len(u_path) > len(root) + 1):
        raise StorageError(f"{_display(url)}: refused: not inside {_display(prefix_url)}")
    return url
