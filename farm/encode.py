"""Video encode: a shard's frames into a segment, and segments joined into one file by remux.

Segments are H.264 without B-frames (dts == pts == frame index), each starting with an IDR frame, so
remuxing them end to end gives monotonic timestamps and no re-encode. Odd widths or heights use yuv444p
(4:2:0 needs even sizes; padding would change the output size). RGB is tagged BT.709 limited range; gray
(channels=1) goes in as full-range luma with neutral chroma, so 256 levels survive. Decoding and probing
are ``farm.video``'s.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import av
import numpy as np

from farm.video import VideoError, _frame_packets, _one_line, _open, _rate, _video_stream, decoded_frame_count

# ffmpeg enum values (libavutil/pixfmt.h)
_RANGE_MPEG, _RANGE_JPEG = 1, 2
_SPC_BT709 = 1

# Audio codecs each container takes as they are (by ffmpeg codec name); others are transcoded to AAC.
_AUDIO_COPY_OK = {
    "mp4": {"aac", "mp3", "ac3", "eac3", "alac", "flac", "opus"},
    "mov": {"aac", "mp3", "ac3", "eac3", "alac", "pcm_s16le", "pcm_s24le", "pcm_f32le", "pcm_s16be"},
}


class SegmentWriter:
    """Encode one shard's frames into a segment that concatenates by remux (RVM-style write/close).

    mp4: H.264 (libx264, crf=quality, no B-frames, IDR first); yuv420p, or yuv444p for odd sizes.
    mov: ProRes 4444 (prores_ks), yuva444p10le with alpha when channels == 4; ``quality`` is unused
    (ProRes rate comes from its profile). ``threads``: the encoder's threads (an actor's share of its CPUs).
    """

    def __init__(
        self,
        path: str,
        fps: Fraction,
        width: int,
        height: int,
        format: str = "mp4",
        channels: int = 3,
        quality: int = 16,
        preset: str = "medium",
        threads: int = 0,
    ):
        if format not in ("mp4", "mov"):
            raise ValueError(f"format must be mp4 or mov, not {format!r}")
        if channels not in (1, 3, 4):
            raise ValueError(f"channels must be 1, 3 or 4, not {channels}")
        if format == "mp4" and channels == 4:
            raise ValueError("mp4 (H.264) has no alpha: use format='mov' for channels=4")
        self.path, self.fps = path, Fraction(fps)
        self.width, self.height, self.channels = int(width), int(height), channels
        self.frames = 0
        try:
            self._c = av.open(path, "w", format=format)
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{path}: {_one_line(e)}") from e
        if format == "mp4":
            odd = self.width % 2 or self.height % 2
            self._pix = "yuv444p" if odd else "yuv420p"
            opts = {"crf": str(quality), "preset": preset, "bf": "0"}
            s = self._c.add_stream("libx264", rate=self.fps, options=opts)
            s.max_b_frames = 0
        else:
            self._pix = "yuva444p10le" if channels == 4 else "yuv444p10le"
            s = self._c.add_stream("prores_ks", rate=self.fps, options={"profile": "4444", "vendor": "apl0"})
        s.width, s.height, s.pix_fmt = self.width, self.height, self._pix
        if threads:  # 0: the encoder's own choice (every core of the machine, whatever the actor was given)
            s.codec_context.thread_count = int(threads)
        self._tb = Fraction(1) / self.fps
        s.time_base = self._tb  # pts = frame index
        self._gray = channels == 1 and format == "mp4"
        s.color_range = _RANGE_JPEG if self._gray else _RANGE_MPEG
        s.colorspace = _SPC_BT709
        self._s = s

    def write(self, frame: np.ndarray) -> None:
        """Append one ``uint8 [H, W, C]`` frame (``[H, W]`` is accepted for channels=1)."""
        if frame.ndim == 2:
            frame = frame[:, :, None]
        want = (self.height, self.width, self.channels)
        if frame.dtype != np.uint8 or frame.shape != want:
            raise ValueError(f"{self.path}: frame must be uint8 {want}, got {frame.dtype} {frame.shape}")
        if self._gray:  # full-range luma, neutral chroma: all 256 levels survive
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:, :, 0]), format="gray")
            vf = vf.reformat(format=self._pix, src_color_range="JPEG", dst_color_range="JPEG")
        else:
            if self.channels == 1:
                frame = np.repeat(frame, 3, axis=2)
            fmt = "rgba" if self.channels == 4 else "rgb24"
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=fmt)
            vf = vf.reformat(format=self._pix, dst_colorspace="ITU709", dst_color_range="MPEG")
        vf.pts = self.frames
        vf.time_base = self._tb  # not the stream's: the mp4 muxer changes that at the header
        self._mux(self._s.encode(vf))
        self.frames += 1

    def _mux(self, packets: list) -> None:
        try:
            self._c.mux(packets)
        except av.FFmpegError as e:
            raise VideoError(f"{self.path}: {_one_line(e)}") from e

    def close(self) -> int:
        """Flush the encoder and finish the file; returns the number of frames written."""
        if self._c is not None:
            try:
                self._mux(self._s.encode(None))
            finally:
                self._c.close()
                self._c = None
        return self.frames

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _audio_packets(
    url: str, storage_options: dict | None, out: Any, fmt: str, duration: Fraction
) -> Iterator[Any]:
    """The source's audio as packets of a new output stream, trimmed to ``duration`` seconds of video.

    Copied as they are when the container takes the codec, else transcoded to AAC. Trimming is per
    packet (an audio frame, ~20 ms), so the audio ends within one packet of the video.
    """
    with _open(url, storage_options) as c:
        if not c.streams.audio:
            return
        a = c.streams.audio[0]
        v0 = c.streams.video[0].start_time if c.streams.video else None
        v0_s = Fraction(v0 or 0) * (c.streams.video[0].time_base if c.streams.video else 1)
        name = a.codec_context.codec.canonical_name
        if name in _AUDIO_COPY_OK[fmt]:
            o = out.add_stream_from_template(a)
            o.time_base = a.time_base
            yield o  # the stream first, so the caller can write the header
            shift = round(v0_s / a.time_base)  # keep A/V alignment relative to the first video frame
            for pkt in c.demux(a):
                if not pkt.size or pkt.pts is None:
                    continue
                t = (pkt.pts - shift) * a.time_base
                if t >= duration:
                    break
                if t + (pkt.duration or 0) * a.time_base <= 0:
                    continue
                pkt.pts -= shift
                pkt.dts = (pkt.dts if pkt.dts is not None else pkt.pts + shift) - shift
                pkt.stream = o
                yield pkt
            return
        rate = a.codec_context.sample_rate or 48000
        o = out.add_stream("aac", rate=rate, layout=a.codec_context.layout.name or "stereo")
        o.bit_rate = 192_000
        yield o
        for frame in c.decode(a):
            if frame.pts is not None and (frame.pts * a.time_base - v0_s) >= duration:
                break
            frame.pts = None  # the encoder numbers samples from 0
            yield from o.encode(frame)
        yield from o.encode(None)


def _concat_signature(s: Any) -> tuple[Any, ...]:
    """What segments must share to be joined by remux: codec, width, height, time base, extradata."""
    c = s.codec_context
    return c.name, c.width, c.height, s.time_base, bytes(c.extradata or b"")


def concat_segments(
    segments: list[str], out_path: str, audio_from: str | None = None, storage_options: dict | None = None
) -> int:
    """Remux segments end to end into ``out_path`` without re-encoding; returns the total frame count.

    Each segment's pts/dts are offset by the frames before it. The segments must share codec, size, rate
    and codec extradata (SPS/PPS), as segments from one SegmentWriter configuration do; anything else is a
    VideoError, because fixing it would need a re-encode. ``audio_from`` (the source URL) gives the audio.
    """
    if not segments:
        raise ValueError("concat_segments needs at least one segment")
    fmt = "mov" if out_path.lower().endswith(".mov") else "mp4"
    with _open(segments[0]) as c0:
        t = _video_stream(c0, segments[0])
        ref = _concat_signature(t)
        fps = _rate(t, segments[0])
        try:
            out = av.open(out_path, "w", format=fmt, options={"movflags": "faststart"})
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{out_path}: {_one_line(e)}") from e
        ov = out.add_stream_from_template(t)
        ov.time_base = t.time_base
    ticks = Fraction(1) / (fps * ref[3])  # time-base ticks per frame
    total = 0

    def video() -> Iterator[Any]:
        nonlocal total
        for seg in segments:
            with _open(seg) as c:
                s = _video_stream(c, seg)
                got = _concat_signature(s)
                if got != ref:
                    what = ["codec", "width", "height", "time base", "codec extradata"]
                    diff = [w for w, a, b in zip(what, got, ref, strict=True) if a != b]
                    raise VideoError(f"{seg}: cannot concat without re-encoding ({', '.join(diff)} differ)")
                off = round(total * ticks)
                n = 0
                for pkt in _frame_packets(c, s):
                    pkt.pts += off
                    pkt.dts += off
                    pkt.stream = ov
                    n += 1
                    yield pkt
                total += n

    try:
        streams = []
        audio = iter(())
        if audio_from is not None:
            # video duration = sum of segment frame counts / fps, known before muxing from the packet counts
            n_frames = sum(decoded_frame_count(s) for s in segments)
            audio = _audio_packets(audio_from, storage_options, out, fmt, Fraction(n_frames) / fps)
            first = next(audio, None)
            if first is not None:
                streams.append(first)
        vpk = video()

        def key(p: Any) -> float:
            return float(p.dts * p.time_base)

        for pkt in heapq.merge(vpk, audio, key=key):  # interleave by time: bounded muxer buffering
            out.mux(pkt)
    except av.FFmpegError as e:
        out.close()
        raise VideoError(f"{out_path}: {_one_line(e)}") from e
    out.close()
    return total
