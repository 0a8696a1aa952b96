"""farm.video on the real clips (../shared/videos) and on synthetic clips with the frame number drawn in."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import av
import fsspec
import numpy as np
import pytest
from media import write_video

from farm import video
from farm.encode import SegmentWriter, concat_segments
from farm.video import VideoError, VideoInfo, probe, read_frames

VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "videos"
REAL = sorted(VIDEOS.glob("*")) if VIDEOS.is_dir() else []
needs_shared = pytest.mark.skipif(
    not REAL, reason="../shared/videos is absent (a fresh clone): real clips skipped"
)


def full_decode(path: str) -> list[np.ndarray]:
    """The reference: every frame of a plain sequential decode, ``uint8 [H, W, 3]`` each."""
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def numbered_clip(
    path: str,
    n: int,
    fps: Fraction,
    *,
    fmt: str = "mp4",
    bframes: int = 3,
    gop: int = 12,
    start_pts: int = 0,
    size: tuple[int, int] = (64, 48),
) -> None:
    """A clip whose frame number is drawn into the pixels: 8 bars, one bit each ([H, W, 3] uint8)."""
    w, h = size
    with av.open(path, "w", format={"mkv": "matroska"}.get(fmt, fmt)) as c:
        s = c.add_stream(
            "libx264",
            rate=fps,
            options={
                "crf": "18",
                "bf": str(bframes),
                "g": str(gop),
                "keyint_min": str(gop),
                "sc_threshold": "0",
            },
        )
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.time_base = Fraction(1) / fps
        for i in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            for b in range(8):
                img[:, b * w // 8 : (b + 1) * w // 8] = 255 if (i >> b) & 1 else 0
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = start_pts + i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))


def frame_number(img: np.ndarray) -> int:
    h, w, _ = img.shape
    bars = [img[:, b * w // 8 + 2 : (b + 1) * w // 8 - 2].mean() > 127 for b in range(8)]
    return sum(int(v) << b for b, v in enumerate(bars))


def ranges(n: int, k: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = [(0, min(3, n)), (n - 2, n), (n // 2, n // 2 + 1)]
    out += [tuple(sorted(rng.sample(range(n + 1), 2))) for _ in range(k)]
    return [(a, b) for a, b in out if a < b]


# --- probe / read_frames on the real clips ------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_clip_count_and_random_ranges(path: Path) -> None:
    full = full_decode(str(path))
    info = probe(str(path))
    assert info.frame_count == len(full) == video.decoded_frame_count(str(path))
    assert (info.height, info.width) == full[0].shape[:2]
    assert VideoInfo.from_dict(info.to_dict()) == info
    k = 2 if info.width >= 1280 else 5  # the 720p clip decodes slowly on 2 cores
    for a, b in ranges(len(full), k):
        got = list(read_frames(str(path), a, b))
        assert len(got) == b - a, (a, b)
        for j, g in enumerate(got):
            assert np.array_equal(g, full[a + j]), f"{path.name} frame {a + j} of [{a}, {b})"


@needs_shared
def test_old_x264_444_decodes_right_after_a_seek() -> None:
    """cockatoo.mp4 is 4:4:4 from x264 core 142: a decoder that starts at its second keyframe (76) must
    be told the build (it is in the first packet only), or every frame comes out wrong."""
    url = str(VIDEOS / "cockatoo.mp4")
    sequential = list(read_frames(url, 0, 80))[76:]
    after_seek = list(read_frames(url, 76, 80))
    assert all(np.array_equal(a, b) for a, b in zip(after_seek, sequential, strict=True))


@needs_shared
def test_probe_known_facts() -> None:
    info = {p.name: probe(str(p)) for p in REAL}
    assert info["realshort.mp4"].fps == Fraction(45000, 1499) and info["realshort.mp4"].frame_count == 36
    assert info["cockatoo.mp4"].frame_count == 280 and (
        info["cockatoo.mp4"].width,
        info["cockatoo.mp4"].height,
    ) == (1280, 720)
    assert info["pancake.mkv"].frame_count == 310  # Matroska stores no count: packets were counted
    assert info["carphone.mp4"].has_audio is False and info["pancake.mkv"].audio_codec == "opus"


# --- synthetic clips: frame-accurate seeking ----------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,fps,start_pts,bframes",
    [
        ("mp4", Fraction(24), 0, 3),
        ("mp4", Fraction(45000, 1499), 0, 3),
        ("mkv", Fraction(30000, 1001), 0, 2),
        ("mkv", Fraction(25), 40, 3),
        ("mp4", Fraction(30), 7, 0),
    ],
)
def test_numbered_clip_ranges(tmp_path: Path, fmt: str, fps: Fraction, start_pts: int, bframes: int) -> None:
    p = str(tmp_path / f"n.{fmt}")
    numbered_clip(p, 60, fps, fmt=fmt, bframes=bframes, start_pts=start_pts)
    assert probe(p).frame_count == 60
    full = full_decode(p)
    assert [frame_number(f) for f in full] == list(range(60))
    for a, b in ranges(60, 8, seed=1):
        got = list(read_frames(p, a, b))
        assert [frame_number(g) for g in got] == list(range(a, b))
        assert all(np.array_equal(g, full[a + j]) for j, g in enumerate(got))


def test_late_start_does_not_decode_from_zero(tmp_path: Path) -> None:
    p = str(tmp_path / "n.mp4")
    numbered_clip(p, 120, Fraction(24), gop=12)
    before = video._STATS["decoded"]
    assert [frame_number(f) for f in read_frames(p, 100, 103)] == [100, 101, 102]
    assert video._STATS["decoded"] - before <= 12 + 8  # one GOP plus the reorder delay, not 100


def test_read_frames_over_fsspec_memory(tmp_path: Path) -> None:
    p = str(tmp_path / "n.mp4")
    numbered_clip(p, 40, Fraction(25))
    fs = fsspec.filesystem("memory")
    fs.pipe("/farm-test/n.mp4", Path(p).read_bytes())
    try:
        url = "memory://farm-test/n.mp4"
        assert probe(url).frame_count == 40
        assert [frame_number(f) for f in read_frames(url, 17, 29)] == list(range(17, 29))
    finally:
        fs.rm("/farm-test", recursive=True)


def test_read_past_end_is_an_error(tmp_path: Path) -> None:
    p = str(tmp_path / "n.mp4")
    numbered_clip(p, 10, Fraction(24))
    with pytest.raises(VideoError, match="ends at frame 10"):
        list(read_frames(p, 8, 12))


# --- errors ---------------------------------------------------------------------------------------


def test_errors_are_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    cases = {
        str(empty): "not a video file",
        str(text): "not a video file",
        str(tmp_path / "missing.mp4"): "no such file",
        "memory://nope/missing.mp4": "no such file",
    }
    for url, why in cases.items():
        for call in (lambda u: probe(u), lambda u: list(read_frames(u, 0, 1))):
            with pytest.raises(VideoError) as e:
                call(url)
            msg = str(e.value)
            assert "\n" not in msg and msg.startswith(f"{url}: ") and why in msg, msg


def test_no_video_stream(tmp_path: Path) -> None:
    p = str(tmp_path / "audio.m4a")
    with av.open(p, "w", format="mp4") as c:
        a = c.add_stream("aac", rate=48000, layout="mono")
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        af.sample_rate = 48000
        c.mux(a.encode(af))
        c.mux(a.encode(None))
    with pytest.raises(VideoError, match=r"audio\.m4a: no video stream$"):
        probe(p)


# --- segments and concat ------------------------------------------------------------------------------


def moving_frames(n: int, h: int, w: int, c: int = 3) -> np.ndarray:
    """``uint8 [T, H, W, C]`` smooth moving colour waves (codec-friendly, like real footage)."""
    t = np.arange(n)[:, None, None, None]
    y = np.linspace(0, 1, h)[None, :, None, None]
    x = np.linspace(0, 1, w)[None, None, :, None]
    ph = np.arange(c)[None, None, None, :] * 2.0
    return np.clip(128 + 100 * np.sin(6 * x + 0.3 * t + ph) * np.cos(4 * y - 0.1 * t), 0, 255).astype(
        np.uint8
    )


def write_segments(
    tmp: Path, frames: np.ndarray, cuts: int, fps: Fraction, fmt: str = "mp4", channels: int = 3
) -> list[str]:
    bounds = np.linspace(0, len(frames), cuts + 1).astype(int)
    out = []
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        p = str(tmp / f"seg{k:03d}.{fmt}")
        with SegmentWriter(p, fps, frames.shape[2], frames.shape[1], format=fmt, channels=channels) as w:
            for f in frames[a:b]:
                w.write(f)
        assert video.decoded_frame_count(p) == b - a
        out.append(p)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def packets(path: str) -> list[bytes]:
    with av.open(path) as c:
        return [bytes(p) for p in c.demux(video=0) if p.size]


@pytest.mark.parametrize("size", [(96, 64), (97, 63)], ids=["even", "odd"])
def test_segmented_encode_matches_single(tmp_path: Path, size: tuple[int, int]) -> None:
    w, h = size
    fps = Fraction(30000, 1001)
    frames = moving_frames(35, h, w)
    one = write_segments(tmp_path / "", frames, 1, fps)[0]
    (tmp_path / "s").mkdir()
    segs = write_segments(tmp_path / "s", frames, 7, fps)
    cat = str(tmp_path / "cat.mp4")
    assert concat_segments(segs, cat) == 35
    assert packets(cat) == [b for s in segs for b in packets(s)]  # remuxed, not re-encoded
    i1, ic = probe(one), probe(cat)
    assert (ic.frame_count, ic.fps, ic.width, ic.height) == (i1.frame_count, i1.fps, i1.width, i1.height)
    assert (ic.frame_count, ic.fps, ic.width, ic.height) == (35, fps, w, h)
    assert ic.pix_fmt == ("yuv444p" if w % 2 else "yuv420p")
    d1, dc = np.stack(list(read_frames(one, 0, 35))), np.stack(list(read_frames(cat, 0, 35)))
    # Tolerance. Both are crf-16 encodes of the same frames that differ only in where IDR frames are, so
    # they are not bit-identical. Measured (96x64 / 97x63 / 320x240): mean |one - cat| 1.7 / 2.2 / 1.1,
    # PSNR(one, cat) 40.7 / 39.0 / 44.3 dB; against the source the 7-segment file loses <= 0.4 dB.
    assert np.abs(d1.astype(int) - dc).mean() < 3.0 and psnr(d1, dc) > 36.0
    assert psnr(dc, frames) > psnr(d1, frames) - 1.0 and psnr(dc, frames) > 35.0
    with av.open(cat) as c:  # timestamps continue across the joins
        pts = [p.pts for p in c.demux(video=0) if p.size]
    assert pts == sorted(pts) and len(set(np.diff(pts))) == 1


def test_concat_carries_audio(tmp_path: Path) -> None:
    src = str(tmp_path / "src.mp4")
    from farm.sample import write_sample

    write_sample(src, frames=24, width=64, height=48, audio=True)
    frames = moving_frames(24, 48, 64)
    segs = write_segments(tmp_path, frames, 3, Fraction(24))
    out = str(tmp_path / "out.mp4")
    assert concat_segments(segs, out, audio_from=src) == 24
    info = probe(out)
    assert info.has_audio and info.audio_codec == "aac" and info.frame_count == 24
    with av.open(out) as c:
        a = c.streams.audio[0]
        end = max(p.pts + p.duration for p in c.demux(a) if p.size) * a.time_base
    assert abs(float(end) - 1.0) <= 1024 / 48000 + 1e-6  # trimmed to the video within one AAC frame


@needs_shared
def test_concat_audio_from_mkv_opus(tmp_path: Path) -> None:
    frames = moving_frames(30, 48, 64)
    segs = write_segments(tmp_path, frames, 2, Fraction(30))
    out = str(tmp_path / "out.mp4")
    concat_segments(segs, out, audio_from=str(VIDEOS / "pancake.mkv"))
    info = probe(out)
    assert info.has_audio and info.audio_codec == "opus" and info.frame_count == 30


def test_concat_rejects_mismatched_segments(tmp_path: Path) -> None:
    a = write_segments(tmp_path, moving_frames(4, 48, 64), 1, Fraction(24))[0]
    (tmp_path / "b").mkdir()
    b = write_segments(tmp_path / "b", moving_frames(4, 64, 64), 1, Fraction(24))[0]
    with pytest.raises(VideoError, match="cannot concat without re-encoding"):
        concat_segments([a, b], str(tmp_path / "out.mp4"))


def test_gray_segment_keeps_levels(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :], (32, 1))  # [32, 256]
    p = str(tmp_path / "g.mp4")
    with SegmentWriter(p, Fraction(24), 256, 32, channels=1, quality=0) as w:
        for _ in range(3):
            w.write(ramp)
    got = next(read_frames(p, 0, 1))
    assert np.abs(got.astype(int) - ramp[..., None]).max() <= 1


def test_prores_4444_alpha_round_trip(tmp_path: Path) -> None:
    frames = moving_frames(6, 48, 64, c=4)
    segs = write_segments(tmp_path, frames, 2, Fraction(25), fmt="mov", channels=4)
    out = str(tmp_path / "out.mov")
    assert concat_segments(segs, out) == 6
    assert packets(out) == [b for s in segs for b in packets(s)]
    with av.open(out) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "prores" and s.codec_context.pix_fmt.startswith("yuva444p")
        got = np.stack([f.to_ndarray(format="rgba") for f in c.decode(s)])  # [T, H, W, 4]
    err = np.abs(got.astype(int) - frames)
    assert err[..., 3].max() <= 1  # alpha is kept (12-bit in ProRes 4444)
    assert err[..., :3].max() <= 3


def test_segment_writer_rejects_bad_frames(tmp_path: Path) -> None:
    with SegmentWriter(str(tmp_path / "x.mp4"), Fraction(24), 64, 48) as w:
        with pytest.raises(ValueError, match="uint8"):
            w.write(np.zeros((48, 64, 3), np.float32))
        with pytest.raises(ValueError, match=r"\(48, 64, 3\)"):
            w.write(np.zeros((64, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="no alpha"):
        SegmentWriter(str(tmp_path / "y.mp4"), Fraction(24), 64, 48, channels=4)


def test_variable_frame_rate_uses_exact_index(tmp_path: Path) -> None:
    p = str(tmp_path / "vfr.mkv")
    with av.open(p, "w", format="matroska") as c:
        s = c.add_stream("libx264", rate=Fraction(30), options={"bf": "2", "g": "8"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.time_base = Fraction(1, 30)
        pts = np.cumsum([0] + [1, 1, 3, 1, 2] * 8)[:40]  # gaps: frames dropped as a phone camera does
        for i, t in enumerate(pts):
            img = np.zeros((48, 64, 3), np.uint8)
            for b in range(8):
                img[:, b * 8 : (b + 1) * 8] = 255 if (i >> b) & 1 else 0
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = int(t)
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    assert probe(p).frame_count == 40
    # from the start: the grid breaks at frame 3, and the read goes on through the exact pts-rank index
    for a, b in [(0, 5), (0, 40)]:
        assert [frame_number(f) for f in read_frames(p, a, b)] == list(range(a, b))
    # after a seek, gaps before the keyframe cannot be seen from the grid: an error, not wrong frames
    with pytest.raises(VideoError, match="variable frame rate"):
        list(read_frames(p, 13, 27))


def test_probe_rotation(tmp_path: Path) -> None:
    p = str(tmp_path / "rot.mp4")
    with av.open(p, "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.set_display_rotation(90)
        for _ in range(2):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        c.mux(s.encode(None))
    info = probe(p)
    assert info.rotation == 90 and (info.width, info.height) == (48, 64)  # as displayed


@pytest.mark.parametrize("rotation", [90, -90, 180, 270])
def test_frames_come_upright(tmp_path: Path, rotation: int) -> None:
    """The same H.264 stream with and without a display matrix: read_frames turns the rotated one
    as a player shows it (np.rot90 counter-clockwise by the matrix's angle), pixel for pixel."""
    plain = probe(write_video(tmp_path / "plain.mp4", 12, (64, 48)))
    turned = probe(write_video(tmp_path / "turned.mp4", 12, (64, 48), rotation=rotation))
    assert (turned.width, turned.height) == ((48, 64) if rotation % 180 else (64, 48))
    for a, b in [(0, 12), (5, 9)]:  # from the start and after a seek
        want = [np.rot90(f, rotation // 90) for f in read_frames(plain.url, a, b)]
        got = list(read_frames(turned.url, a, b))
        assert all(g.shape == (turned.height, turned.width, 3) and g.flags.c_contiguous for g in got)
        assert np.array_equal(np.stack(got), np.stack(want))
    assert not np.array_equal(np.stack(got), np.stack([np.rot90(w, 2) for w in want]))
