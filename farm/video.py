"""Video input: probe, frame-accurate range decode, images (segment encode and concat: ``farm.encode``).

Frames are ``uint8 [H, W, C]`` numpy arrays (RGB when decoded). Frame *i* always means the i-th frame of
a sequential full decode; ranges are half-open ``[start, stop)``. No torch here: actors and the driver
import this module alike.

Decisions (why):
- Reads map decoded frames to indices from pts on the ``1/fps`` grid (rounded, so the millisecond
  timestamps of Matroska and NTSC rates like 45000/1499 land exactly), count forward from the keyframe
  and cross-check every frame. A file whose pts leave the grid (variable frame rate) is read again
  through an exact pts-rank index built by demuxing (no decode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import fsspec
import numpy as np

from farm.errors import one_line


class VideoError(RuntimeError):
    """A video that cannot be read or written; the message is one line naming the input."""


@dataclass(frozen=True)
class VideoInfo:
    """What the planner and the sinks need to know about one input video."""

    url: str
    frame_count: int
    fps_num: int
    fps_den: int
    width: int  # as displayed: read_frames turns frames upright (see upright_turns)
    height: int
    rotation: int  # degrees counter-clockwise from the display matrix (ffprobe's sign), 0 if none
    pix_fmt: str
    codec: str
    duration: float  # seconds of video: frame_count / fps
    has_audio: bool
    audio_codec: str | None = None

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VideoInfo:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _one_line(e: BaseException) -> str:
    if isinstance(e, av.FFmpegError) and e.strerror:  # not "[Errno 1094995529] ...: 'avcodec_send_packet()'"
        return e.strerror
    return one_line(e, named=False)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def read_image(url: str, storage_options: dict | None = None, mode: str = "RGB") -> np.ndarray:
    """One still image (trimap, mask, background plate) from a local path or fsspec URL, through PIL:
    ``uint8 [H, W, 3]`` for ``mode="RGB"``, ``[H, W]`` for ``"L"``. Any failure is one VideoError line."""
    from PIL import Image

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return np.array(Image.open(f).convert(mode), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - missing, unreadable or not an image: one message naming it
        raise VideoError(f"{url}: cannot read image ({_one_line(e)})") from None


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@contextlib.contextmanager
def _open(url: str, storage_options: dict | None = None) -> Iterator[Any]:
    """An input container for a local path or any fsspec URL, with errors turned into VideoError."""
    try:
        if _is_local(url):
            path = url[len("file://") :] if url.startswith("file://") else url
            if not os.path.exists(path):
                raise VideoError(f"{url}: no such file")
            if os.path.isdir(path):
                raise VideoError(f"{url}: is a directory")
            if os.path.getsize(path) == 0:
                raise VideoError(f"{url}: not a video file (empty file)")
            with av.open(path, "r") as c:
                yield c
        else:
            try:
                opened = fsspec.open(url, "rb", **(storage_options or {}))
            except (ValueError, ImportError) as e:  # "Protocol not known: ftpx", a backend not installed
                raise VideoError(f"{url}: unsupported URL ({_one_line(e)})") from e
            with opened as f, av.open(f, "r") as c:
                yield c
    except VideoError:
        raise
    except FileNotFoundError as e:
        raise VideoError(f"{url}: no such file") from e
    except av.InvalidDataError as e:
        raise VideoError(f"{url}: not a video file (invalid data)") from e
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{url}: {_one_line(e)}") from e


def _video_stream(c: Any, url: str) -> Any:
    if not c.streams.video:
        raise VideoError(f"{url}: no video stream")
    return c.streams.video[0]


def _rate(v: Any, url: str) -> Fraction:
    for r in (v.average_rate, v.guessed_rate, v.base_rate):
        if r:
            return Fraction(r)
    raise VideoError(f"{url}: no frame rate")


def _frame_packets(c: Any, v: Any) -> Iterator[Any]:
    """Packets that become frames: skips the demuxer's empty flush packets and edit-list discards."""
    for pkt in c.demux(v):
        if pkt.size and not pkt.is_discard:
            yield pkt


def _trust_container_count(c: Any, v: Any, fps: Fraction) -> bool:
    """mp4/mov sample tables are exact unless an edit list cut frames (then duration disagrees)."""
    if v.frames <= 0 or "mp4" not in c.format.name or v.duration is None or v.time_base is None:
        return False
    return abs(v.duration * v.time_base * fps - v.frames) < Fraction(1, 2)


def probe(url: str, storage_options: dict | None = None) -> VideoInfo:
    """Read what planning needs; the frame count is exact (packets counted when the container's is not)."""
    with _open(url, storage_options) as c:
        v = _video_stream(c, url)
        fps = _rate(v, url)
        trusted = _trust_container_count(c, v, fps)
        count, rotation = 0, None
        try:
            for pkt in _frame_packets(c, v):
                if rotation is None:
                    frames = pkt.decode()
                    if frames:
                        rotation = int(frames[0].rotation)
                count += 1
                if trusted and rotation is not None:
                    break  # the sample table is exact: only the first frame was needed
            if rotation is None:  # a short clip still in the decoder's reorder delay: drain it
                frames = v.codec_context.decode(None)
                rotation = int(frames[0].rotation) if frames else 0
        except av.FFmpegError as e:
            raise VideoError(f"{url}: {_one_line(e)}") from e
        if trusted:
            count = v.frames
        if count == 0:
            raise VideoError(f"{url}: no video frames")
        audio = c.streams.audio[0] if c.streams.audio else None
        width, height = int(v.codec_context.width), int(v.codec_context.height)
        if upright_turns(rotation or 0) % 2:
            width, height = height, width
        return VideoInfo(
            url=url,
            frame_count=int(count),
            fps_num=fps.numerator,
            fps_den=fps.denominator,
            width=width,
            height=height,
            rotation=rotation or 0,
            pix_fmt=str(v.codec_context.pix_fmt),
            codec=v.codec_context.codec.canonical_name,
            duration=float(count / fps),
            has_audio=audio is not None,
            audio_codec=audio.codec_context.codec.canonical_name if audio is not None else None,
        )


def upright_turns(rotation: float) -> int:
    """Quarter turns counter-clockwise (``np.rot90``'s k) that show a frame as its display matrix says,
    as ffmpeg does by default: a phone's portrait clip reaches the model upright. Angles that are
    not a multiple of 90 degrees are left alone."""
    quarters = rotation / 90
    return int(round(quarters)) % 4 if abs(quarters - round(quarters)) < 0.01 else 0


def decoded_frame_count(path: str, storage_options: dict | None = None) -> int:
    """Frames in a file, counted as video packets by demuxing (no decode): verifies written segments."""
    with _open(path, storage_options) as c:
        v = _video_stream(c, path)
        try:
            return sum(1 for _ in _frame_packets(c, v))
        except av.FFmpegError as e:
            raise VideoError(f"{path}: {_one_line(e)}") from e


# Frames decoded by read_frames in this process, kept so tests can show a late start does not decode
# from frame 0.
_STATS = {"decoded": 0}


class _OffGrid(Exception):
    """A frame's pts is not where a constant frame rate puts it: read through the exact index instead."""


class _Grid:
    """Constant-rate mapping: index = round((pts - first_pts) * time_base * fps)."""

    sequential = True

    def __init__(self, v: Any, fps: Fraction):
        self.t0 = v.start_time or 0
        self.ticks = Fraction(1) / (fps * v.time_base)  # pts ticks per frame

    def index(self, pts: int) -> int:
        return round((pts - self.t0) / self.ticks)

    def pts(self, i: int) -> int:
        return self.t0 + int(i * self.ticks)


class _Ranks:
    """Exact mapping for any timing: frame i has the i-th smallest pts of the stream's packets."""

    sequential = False

    def __init__(self, c: Any, v: Any):
        self.sorted = sorted(p.pts for p in _frame_packets(c, v) if p.pts is not None)  # [N] int
        self.rank = {p: i for i, p in enumerate(self.sorted)}

    def index(self, pts: int) -> int:
        i = self.rank.get(pts)
        if i is None:  # a decoder-invented pts: the nearest packet's rank
            i = int(np.searchsorted(self.sorted, pts).clip(0, len(self.sorted) - 1))
        return i

    def pts(self, i: int) -> int:
        return self.sorted[min(i, len(self.sorted) - 1)]


def _prime_decoder(c: Any, v: Any) -> list[Any]:
    """Read the first packet and return it; for H.264 from x264, tell the decoder the x264 build.

    Old x264 builds (< 151) wrote 4:4:4 streams that ffmpeg decodes right only when it knows the build,
    which it learns from an SEI in the first packet; a seek skips that packet and decodes garbage
    (cockatoo.mp4). The ``x264_build`` decoder option gives the build to a decoder that starts later.
    """
    first = next(iter(c.demux(v)), None)
    if first is None:
        return []
    if v.codec_context.name == "h264":
        m = re.search(rb"x264 - core (\d+)", bytes(first))
        # Only where it matters: setting options costs the decoder its frame threads (1080p: -25%).
        if m and int(m.group(1)) < 151:
            v.codec_context.options = {**v.codec_context.options, "x264_build": m.group(1).decode()}
            v.thread_type = "AUTO"
    return [first]


def _decode_range(c: Any, v: Any, start: int, stop: int, mapping: Any, seek_to: int | None):
    """Yield ``(index, frame)`` for [start, stop); raise _SeekLate if the seek landed after start."""
    head = _prime_decoder(c, v)
    if seek_to is not None:
        c.seek(mapping.pts(seek_to), stream=v, backward=True, any_frame=False)
        head = []
    started = False
    expected = 0 if seek_to is None else None
    for pkt in itertools.chain(head, c.demux(v)):
        if not started:
            if not pkt.size:
                break
            if pkt.is_discard or pkt.pts is None or not pkt.is_keyframe:
                continue  # decoding starts at a keyframe
            if seek_to is not None and mapping.index(pkt.pts) > start:
                raise _SeekLate(mapping.index(pkt.pts))
            started = True
        for frame in pkt.decode():
            _STATS["decoded"] += 1
            if frame.pts is None:
                if expected is None:
                    raise _OffGrid
                i = expected
            else:
                i = mapping.index(frame.pts)
                if mapping.sequential and expected is not None and i != expected:
                    raise _OffGrid
            expected = i + 1
            if i >= stop:
                return
            if i >= start:
                yield i, frame


class _SeekLate(Exception):
    def __init__(self, keyframe_index: int):
        self.keyframe_index = keyframe_index


def read_frames(url: str, start: int, stop: int, storage_options: dict | None = None) -> Iterator[np.ndarray]:
    """Yield frames [start, stop) as ``uint8 [H, W, 3]`` RGB: seek to the keyframe at or before start,
    decode forward, drop the frames before start. A generator: memory stays at one GOP of decoder state.
    Frames come upright (the display matrix applied, as ffmpeg does), at ``probe``'s width and height."""
    if start < 0 or stop < start:
        raise ValueError(f"bad frame range [{start}, {stop})")
    if stop == start:
        return
    done: list[int] = []  # pts of the frames yielded so far
    try:
        yield from _read(url, start, stop, storage_options, None, done)
        return
    except _OffGrid:
        pass  # pts left the constant-rate grid: go on through the exact pts-rank index
    with _open(url, storage_options) as c:
        ranks = _Ranks(c, _video_stream(c, url))
    if [ranks.index(p) for p in done] != list(range(start, start + len(done))):
        raise VideoError(f"{url}: variable frame rate before frame {start}: frames were mis-numbered")
    yield from _read(url, start + len(done), stop, storage_options, ranks, done)


def _read(
    url: str, start: int, stop: int, storage_options: dict | None, ranks: _Ranks | None, done: list[int]
) -> Iterator[np.ndarray]:
    """The decode loop of read_frames; ``ranks`` None maps pts on the constant-rate grid (raising
    _OffGrid where a frame is off it); appends each yielded frame's pts to ``done``."""
    target: int | None = start if start > 0 else None
    step = 1
    yielded = 0
    while True:
        with _open(url, storage_options) as c:
            v = _video_stream(c, url)
            v.thread_type = "AUTO"
            mapping = ranks if ranks is not None else _Grid(v, _rate(v, url))
            try:
                for i, frame in _decode_range(c, v, start, stop, mapping, target):
                    if i != start + yielded:
                        raise VideoError(f"{url}: frame {start + yielded} missing (decoded {i} next)")
                    rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
                    turns = upright_turns(frame.rotation)
                    yield np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb
                    done.append(frame.pts)
                    yielded += 1
            except _SeekLate as late:
                # the demuxer landed on a later keyframe (its dts is before our pts target): aim earlier
                nxt = min(target or 0, late.keyframe_index - 1) - step
                step *= 2
                target = nxt if nxt > 0 else None
                continue
            except av.FFmpegError as e:
                raise VideoError(f"{url}: cannot decode frame {start + yielded}: {_one_line(e)}") from e
        break
    if yielded < stop - start:
        raise VideoError(
            f"{url}: asked for frames [{start}, {stop}) but the video ends at frame {start + yielded}"
        )
