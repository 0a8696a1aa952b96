"""Contact sheets: a few frames of a render as input | alpha | composite, to check a matte at a glance.

``contact_sheet`` draws one video's sheet from its source and alpha URLs (mp4/mov files or PNG-sequence
folders, local or fsspec); ``preview_job`` finds those URLs in a job's manifest (given directly, or
through the job YAML) and draws one sheet per video. No torch here.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from farm import storage

COLUMNS = ("input", "alpha", "composite")
PAD = 4  # px between cells and around the sheet
HEADER = 16  # px strip with the column names
GUTTER = 44  # px column at the left with the frame numbers
CHECKER = 8  # px squares of the checkerboard under the composite
SHEET_BG = (32, 32, 36)
TEXT = (230, 230, 230)


class PreviewError(RuntimeError):
    """A render that cannot be previewed; the message is one line naming the file."""


@dataclass(frozen=True)
class Sheet:
    """What was written: ``cells[(row, column)]`` is the ``(x, y, w, h)`` box of a thumbnail."""

    path: str
    frames: list[int]
    size: tuple[int, int]  # (width, height) of the PNG
    cells: dict[tuple[int, str], tuple[int, int, int, int]] = field(default_factory=dict)


def spread_frames(count: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly over ``[0, count)``, first and last included."""
    if count < 1:
        raise ValueError("a video has at least one frame")
    n = max(1, min(n, count))
    return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


def _is_video(url: str) -> bool:
    return url.lower().rsplit("?", 1)[0].endswith((".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"))


def frame_count(url: str, storage_options: dict[str, Any] | None = None) -> int:
    """Frames in a video file or a PNG-sequence folder."""
    if _is_video(url):
        from farm.video import probe

        return probe(url, storage_options).frame_count
    try:
        return sum(u.endswith(".png") for u in storage.list_files(url, storage_options))
    except storage.StorageError as e:
        raise PreviewError(f"{url}: cannot list the PNG sequence ({e})") from e


def read_at(url: str, indices: list[int], storage_options: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Frames ``indices`` of a video or a PNG sequence as ``uint8 [H, W, C]`` (C = 3, or 1 for grey PNGs)."""
    if _is_video(url):
        from farm.video import VideoError, read_frames

        try:  # one seek per frame: a long video is never decoded end to end for a preview
            return [next(iter(read_frames(url, i, i + 1, storage_options))) for i in indices]
        except VideoError as e:
            raise PreviewError(str(e)) from e
    from PIL import Image

    out = []
    for i in indices:
        key = storage.join(url, f"{i:06d}.png")
        try:
            img = Image.open(io.BytesIO(storage.read_bytes(key, storage_options)))
        except (storage.StorageError, OSError) as e:
            raise PreviewError(f"{key}: cannot read frame {i} ({e.__class__.__name__})") from e
        a = np.asarray(img.convert("L") if img.mode in ("L", "I", "I;16") else img.convert("RGB"))
        out.append(a[..., None] if a.ndim == 2 else a)
    return out


def _thumb(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """``uint8 [h, w, 3]``; untouched (but for grey -> RGB) when the size already fits."""
    rgb = np.repeat(frame[..., :1], 3, axis=-1) if frame.shape[-1] == 1 else frame[..., :3]
    if rgb.shape[:2] == (height, width):
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR))


def _background(height: int, width: int, colour: tuple[float, float, float] | None) -> np.ndarray:
    """``float32 [h, w, 3]``: a checkerboard (None) or a flat colour in [0, 1]."""
    if colour is not None:
        return np.broadcast_to(np.asarray(colour, np.float32), (height, width, 3))
    yy, xx = np.mgrid[:height, :width]
    light = ((yy // CHECKER + xx // CHECKER) % 2).astype(np.float32)
    return np.repeat((0.35 + 0.3 * light)[..., None], 3, axis=-1)


def composite(rgb: np.ndarray, alpha: np.ndarray, colour: tuple[float, float, float] | None = None) -> np.ndarray:
    """``uint8 [h, w, 3]``: ``rgb`` over the background by ``alpha`` (``uint8 [h, w, 1|3]``)."""
    a = alpha[..., :1].astype(np.float32) / 255
    bg = _background(rgb.shape[0], rgb.shape[1], colour)
    out = rgb.astype(np.float32) / 255 * a + bg * (1 - a)
    return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)


def contact_sheet(
    source_url: str,
    alpha_url: str,
    out_path: str,
    frames: int = 4,
    width: int = 240,
    fgr_url: str | None = None,
    background: tuple[float, float, float] | None = None,
    storage_options: dict[str, Any] | None = None,
    title: str | None = None,
) -> Sheet:
    """Write a PNG: one row per frame spread over the video, columns input, alpha, composite.

    The composite puts ``fgr_url`` (the model's foreground, if given) else the input over ``background``
    (RGB in [0, 1]; None: a checkerboard, so that both a missing and a leaking matte show).
    """
    from PIL import Image, ImageDraw

    if frames < 1 or width < 8:
        raise PreviewError(f"need frames >= 1 and width >= 8 (got {frames}, {width})")
    count = frame_count(alpha_url, storage_options)
    if count == 0:
        raise PreviewError(f"{alpha_url}: no frames")
    indices = spread_frames(count, frames)
    src = read_at(source_url, indices, storage_options)
    alpha = read_at(alpha_url, indices, storage_options)
    fgr = read_at(fgr_url, indices, storage_options) if fgr_url else src
    h0, w0 = alpha[0].shape[:2]
    if src[0].shape[:2] != (h0, w0):
        raise PreviewError(f"{alpha_url}: {w0}x{h0} frames, but the input {source_url} is "
                           f"{src[0].shape[1]}x{src[0].shape[0]}")
    height = max(1, round(h0 * width / w0))

    sheet_w = GUTTER + len(COLUMNS) * (width + PAD) + PAD
    top = HEADER + (HEADER if title else 0)
    sheet_h = top + len(indices) * (height + PAD) + PAD
    img = Image.new("RGB", (sheet_w, sheet_h), SHEET_BG)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((PAD, 2), title, fill=TEXT)
    cells: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for c, name in enumerate(COLUMNS):
        draw.text((GUTTER + c * (width + PAD) + PAD, top - HEADER + 2), name, fill=TEXT)
    for r, i in enumerate(indices):
        y = top + r * (height + PAD) + PAD
        draw.text((PAD, y + 2), f"#{i}", fill=TEXT)
        a = _thumb(alpha[r], width, height)
        thumbs = {"input": _thumb(src[r], width, height), "alpha": a,
                  "composite": composite(_thumb(fgr[r], width, height), a, background)}
        for c, name in enumerate(COLUMNS):
            x = GUTTER + c * (width + PAD) + PAD
            img.paste(Image.fromarray(thumbs[name]), (x, y))
            cells[(r, name)] = (x, y, width, height)

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    if "://" in out_path:
        storage.write_bytes_atomic(out_path, buf.getvalue(), storage_options)
    else:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_bytes(buf.getvalue())
    return Sheet(path=out_path, frames=indices, size=img.size, cells=cells)


# ---- a job's render -> sheets ---------------------------------------------------------------------


def find_manifest(target: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(manifest URL, manifest, storage options)`` for a manifest URL or a job YAML."""
    so: dict[str, Any] = {}
    if target.endswith((".yaml", ".yml")):
        from farm.ledger import ledger_root
        from farm.spec import absolute_local_paths, load_spec

        spec = absolute_local_paths(load_spec(target))  # SpecError for a bad file: the caller says so
        so = dict(spec.storage_options)
        url = storage.join(ledger_root(spec), "manifest.json")
    else:
        url = target
    try:
        manifest = json.loads(storage.read_bytes(url, so))
    except storage.StorageNotFound:
        hint = " (has the job been submitted?)" if target != url else ""
        raise PreviewError(f"{storage.redact(url, so)}: no manifest{hint}") from None
    except (storage.StorageError, ValueError) as e:
        raise PreviewError(f"{storage.redact(url, so)}: cannot read the manifest ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("videos"), dict):
        raise PreviewError(f"{storage.redact(url, so)}: not a farm manifest (no 'videos')")
    return url, manifest, so


def preview_job(
    target: str, out: str | None = None, frames: int = 4, width: int = 240,
    background: tuple[float, float, float] | None = None,
) -> tuple[list[Sheet], list[str]]:
    """One sheet per finished video of a job; returns the sheets and one line per video left out.

    ``out``: a ``.png`` path when the job has one video, else a folder (default ``.``) that gets
    ``<video key>_preview.png`` per video.
    """
    _, manifest, so = find_manifest(target)
    done = {k: v for k, v in manifest["videos"].items() if v.get("status") in ("succeeded", "skipped")}
    skipped = [f"{v.get('url', k)}: {v.get('status')}, no preview" for k, v in manifest["videos"].items()
               if k not in done]
    single_file = out is not None and out.lower().endswith(".png")
    if single_file and len(done) > 1:
        raise PreviewError(f"--out {out}: the job has {len(done)} videos; give a folder instead")
    sheets = []
    for key, v in sorted(done.items()):
        outputs = v.get("outputs") or {}
        if "alpha" not in outputs:
            skipped.append(f"{v['url']}: no alpha output (channels: {', '.join(outputs) or 'none'})")
            continue
        fgr = outputs.get("fgr", {}).get("url")
        path = out if single_file else posixpath.join(out or ".", f"{key}_preview.png")
        title = f"{posixpath.basename(v['url'])}  (job {manifest.get('job', '?')})"
        sheets.append(contact_sheet(v["url"], outputs["alpha"]["url"], path, frames=frames, width=width,
                                    fgr_url=fgr, background=background, storage_options=so, title=title))
    return sheets, skipped
