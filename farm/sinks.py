"""Where a rendered channel goes, shaped like Ray Data's Datasink: start, write pieces, commit, fail.

One output (a video's channel) is written as ordered *pieces* — each shard's core frames and each
blended overlap — by whichever process rendered them. ``commit`` makes the final key appear in one
step. The fsspec base handles temporaries, retries and atomic puts; each concrete sink overrides the
one thing that differs: how a piece is encoded (and, for videos, how pieces become one file).
"""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from farm import storage
from farm.digest import sha256_file


class SinkError(RuntimeError):
    """A piece or commit that failed verification (retried by the scheduler)."""


@dataclass(frozen=True)
class OutputTarget:
    """One output file (or folder, for sequences) of one video's channel."""

    url: str  # final key (file for mp4/mov, folder for png)
    parts_url: str  # ledger folder for this output's pieces
    format: str  # mp4 | mov | png
    fps_num: int
    fps_den: int
    width: int
    height: int
    components: int  # 1 alpha, 3 colour, 4 rgba
    quality: int = 16
    preset: str = "veryfast"  # x264's speed/size trade-off (mp4 only): output.preset's default
    audio_from: str | None = None  # source video whose audio is carried in
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Piece:
    """An open piece: frames are appended in order, then ``close`` uploads and returns its record."""

    def __init__(self, sink: FsspecSink, name: str, start: int) -> None:
        self.sink, self.name, self.start, self.frames = sink, name, start, 0

    def write(self, batch: np.ndarray) -> None:  # uint8 [t, H, W, C]
        raise NotImplementedError

    def close(self) -> dict[str, Any]:
        raise NotImplementedError

    def discard(self) -> None:
        """Drop what was written so far (the shard failed or was cancelled): nothing of it is uploaded."""


class FsspecSink:
    """Base: fsspec I/O with retries and atomic puts. Subclasses override ``open_piece``."""

    def __init__(self, target: OutputTarget) -> None:
        self.target = target

    @property
    def so(self) -> dict[str, Any]:
        return self.target.storage_options

    def on_write_start(self) -> None:
        """Nothing to reserve: pieces and the final key are written atomically when ready."""

    def open_piece(self, name: str, start: int, threads: int = 0) -> Piece:
        """``threads``: the encoder's thread count where it has one (0: its own choice)."""
        raise NotImplementedError

    def write_piece(self, name: str, start: int, frames: np.ndarray) -> dict[str, Any]:
        piece = self.open_piece(name, start)
        piece.write(frames)
        return piece.close()

    def on_write_complete(self, pieces: list[dict[str, Any]]) -> dict[str, Any]:
        """Commit: make the final output appear. Returns ``{url, frames, sha256}``."""
        raise NotImplementedError

    def on_write_failed(self, error: BaseException) -> None:
        """Final keys are only ever written complete, so there is nothing to roll back."""


# ---- video files: pieces are segments, commit is a remux concat -------------------------------


class _SegmentPiece(Piece):
    def __init__(self, sink: VideoSink, name: str, start: int, threads: int = 0) -> None:
        super().__init__(sink, name, start)
        from farm.encode import SegmentWriter

        t = sink.target
        fd, self.path = tempfile.mkstemp(suffix=f".{t.format}", prefix="farm-piece-")
        os.close(fd)
        self.writer = SegmentWriter(
            self.path,
            Fraction(t.fps_num, t.fps_den),
            t.width,
            t.height,
            format=t.format,
            channels=t.components,
            quality=t.quality,
            preset=t.preset,
            threads=threads,
        )

    def write(self, batch: np.ndarray) -> None:
        for frame in batch:
            self.writer.write(frame)
            self.frames += 1

    def close(self) -> dict[str, Any]:
        from farm.video import decoded_frame_count

        try:
            written = self.writer.close()
            counted = decoded_frame_count(self.path)
            if not written == counted == self.frames:
                raise SinkError(
                    f"{self.name}: segment has {counted} frames, {self.frames} were rendered (encoder lost frames)"
                )
            from farm.video import probe

            got, t = probe(self.path), self.sink.target
            if (got.width, got.height) != (t.width, t.height):
                raise SinkError(f"{self.name}: segment is {got.width}x{got.height}, the output is {t.width}x{t.height}")
            url = storage.join(self.sink.target.parts_url, f"{self.name}.{self.sink.target.format}")
            digest = sha256_file(self.path)
            storage.put_file_atomic(self.path, url, self.sink.so)
            return {"name": self.name, "start": self.start, "frames": self.frames, "url": url, "sha256": digest}
        finally:
            os.unlink(self.path)

    def discard(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - the piece is dropped whatever state its encoder is in
            pass
        if os.path.exists(self.path):
            os.unlink(self.path)


class VideoSink(FsspecSink):
    """mp4 (H.264) or mov (ProRes 4444): each piece an independently decodable segment."""

    def open_piece(self, name: str, start: int, threads: int = 0) -> Piece:
        return _SegmentPiece(self, name, start, threads)

    def on_write_complete(self, pieces: list[dict[str, Any]]) -> dict[str, Any]:
        from farm.encode import concat_segments
        from farm.video import decoded_frame_count

        pieces = sorted(pieces, key=lambda p: p["start"])
        with tempfile.TemporaryDirectory(prefix="farm-assemble-") as tmp:
            local = []
            for i, p in enumerate(pieces):
                path = os.path.join(tmp, f"{i:05d}.{self.target.format}")
                storage.get_file(p["url"], path, self.so)
                if sha256_file(path) != p["sha256"]:
                    raise SinkError(f"{p['url']}: checksum mismatch after download")
                local.append(path)
            out = os.path.join(tmp, f"out.{self.target.format}")
            frames = concat_segments(local, out, audio_from=self.target.audio_from, storage_options=self.so)
            expected = sum(p["frames"] for p in pieces)
            counted = decoded_frame_count(out)
            if not frames == counted == expected:
                raise SinkError(f"{self.target.url}: assembled {counted} frames, expected {expected}")
            digest = sha256_file(out)
            storage.put_file_atomic(out, self.target.url, self.so)
        # a commit killed mid-copy (a killed job, now resumed) left a hidden temporary beside the output
        parent, name = posixpath.split(self.target.url)
        storage.remove_temporaries(parent or ".", self.so, of=name)
        return {"url": self.target.url, "frames": expected, "sha256": digest}


# ---- image sequences: each frame is its own final key -----------------------------------------


class _PngPiece(Piece):
    def write(self, batch: np.ndarray) -> None:
        from PIL import Image

        for frame in batch:
            img = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)
            url = storage.join(self.sink.target.url, f"{self.start + self.frames:06d}.png")
            storage.write_bytes_atomic(url, buf.getvalue(), self.sink.so)
            self.frames += 1

    def close(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "frames": self.frames, "url": None, "sha256": None}


class PngSequenceSink(FsspecSink):
    """A folder of ``000000.png`` … named by frame index; no concat needed."""

    def open_piece(self, name: str, start: int, threads: int = 0) -> Piece:
        return _PngPiece(self, name, start)

    def on_write_complete(self, pieces: list[dict[str, Any]]) -> dict[str, Any]:
        expected = sum(p["frames"] for p in pieces)
        # frames are written in place: a writer killed mid-frame (a lost node, a killed job that was
        # resumed) left a hidden temporary here; every piece is in, and cancelled copies were told to stop
        storage.remove_temporaries(self.target.url, self.so)
        found = [u for u in storage.list_files(self.target.url, self.so) if u.endswith(".png")]
        if len(found) < expected:
            raise SinkError(f"{self.target.url}: {len(found)} frames present, expected {expected}")
        return {"url": self.target.url, "frames": expected, "sha256": None}


class MemorySink(FsspecSink):
    """Keeps pieces in this process (for tests and notebooks): ``frames()`` returns the whole output."""

    def __init__(self, target: OutputTarget) -> None:
        super().__init__(target)
        self.pieces: dict[int, np.ndarray] = {}

    def write_piece(self, name: str, start: int, frames: np.ndarray) -> dict[str, Any]:
        self.pieces[start] = np.asarray(frames)
        return {"name": name, "start": start, "frames": len(frames), "url": None, "sha256": None}

    def on_write_complete(self, pieces: list[dict[str, Any]]) -> dict[str, Any]:
        return {"url": None, "frames": sum(len(v) for v in self.pieces.values()), "sha256": None}

    def frames(self) -> np.ndarray:
        return np.concatenate([self.pieces[k] for k in sorted(self.pieces)])


def make_sink(target: OutputTarget) -> FsspecSink:
    if target.format in ("mp4", "mov"):
        return VideoSink(target)
    if target.format == "png":
        return PngSequenceSink(target)
    raise ValueError(f"unknown output format {target.format!r}")


