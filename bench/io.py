"""Video I/O: farm's reader and writer against bare PyAV, and segment-parallel encoding against one encoder.

- decode: ``farm.video.read_frames`` vs a bare ``container.decode`` loop with ``to_ndarray("rgb24")``
  (both with PyAV's frame threading, ``thread_type="AUTO"``, as farm sets it), at 720p and 1080p.
- encode: ``farm.encode.SegmentWriter`` vs a bare PyAV libx264 encoder with the same settings
  (crf 16, preset medium, no B-frames, yuv420p, BT.709 limited), frames already in memory.
- assembly: a 1080p video decoded and encoded as N segments by 2 processes, then remuxed with
  ``concat_segments``, vs the same decode and one serial encoder. x264 threads itself in both.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from typing import Any

from bench.common import SHARED_VIDEOS, machine, machine_line, parse_args, scratch, trimmed_clip, write_result


def bare_decode(path: str) -> int:
    import av

    n = 0
    with av.open(path) as c:
        v = c.streams.video[0]
        v.thread_type = "AUTO"
        for frame in c.decode(v):
            frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8
            n += 1
    return n


def farm_decode(path: str) -> int:
    from farm.video import probe, read_frames

    return sum(1 for _ in read_frames(path, 0, probe(path).frame_count))


def bare_encode(path: str, frames: list[Any], fps: Fraction) -> int:
    import av

    h, w, _ = frames[0].shape
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "16", "preset": "medium", "bf": "0"})
        s.max_b_frames = 0
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        tb = s.time_base = Fraction(1) / fps  # kept: the mp4 muxer changes the stream's at the header
        s.color_range, s.colorspace = 1, 1
        for i, rgb in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf = vf.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            vf.pts = i
            vf.time_base = tb
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return len(frames)


def farm_encode(path: str, frames: list[Any], fps: Fraction) -> int:
    from farm.encode import SegmentWriter

    h, w, _ = frames[0].shape
    with SegmentWriter(path, fps, w, h) as out:
        for f in frames:
            out.write(f)
    return out.frames


def best_of(fns: list[tuple[Any, tuple]], repeat: int) -> list[tuple[float, Any]]:
    """Fastest of ``repeat`` runs of each function, interleaved (farm, baseline, farm, ...) so that a
    burst of load from elsewhere on a shared machine hits both sides alike; the minimum is the least
    disturbed run."""
    best: list[list[Any]] = [[float("inf"), None] for _ in fns]
    for _ in range(repeat):
        for k, (fn, args) in enumerate(fns):
            t0 = time.perf_counter()
            value = fn(*args)
            best[k] = [min(best[k][0], time.perf_counter() - t0), value]
    return [(t, v) for t, v in best]


def encode_segment(src: str, start: int, stop: int, path: str) -> int:
    """Decode [start, stop) of ``src`` and encode it as one segment (what a farm actor does per shard)."""
    from farm.encode import SegmentWriter
    from farm.video import probe, read_frames

    info = probe(src)
    with SegmentWriter(path, info.fps, info.width, info.height) as out:
        for f in read_frames(src, start, stop):
            out.write(f)
    return out.frames


def segment_parallel(src: str, n_frames: int, segments: int, out_dir: str) -> dict[str, Any]:
    from farm.encode import concat_segments

    t0 = time.perf_counter()
    serial = encode_segment(src, 0, n_frames, os.path.join(out_dir, "serial.mp4"))
    t_serial = time.perf_counter() - t0
    edges = [round(k * n_frames / segments) for k in range(segments + 1)]
    paths = [os.path.join(out_dir, f"seg{k:03d}.mp4") for k in range(segments)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        counts = list(pool.map(encode_segment, [src] * segments, edges[:-1], edges[1:], paths))
    t_enc = time.perf_counter() - t0
    total = concat_segments(paths, os.path.join(out_dir, "parallel.mp4"))
    t_par = time.perf_counter() - t0
    assert serial == sum(counts) == total == n_frames, (serial, counts, total)  # a broken run is not a figure
    return {
        "frames": n_frames,
        "segments": segments,
        "processes": 2,
        "serial_s": round(t_serial, 3),
        "parallel_encode_s": round(t_enc, 3),
        "parallel_with_concat_s": round(t_par, 3),
        "concat_s": round(t_par - t_enc, 3),
        "serial_fps": round(n_frames / t_serial, 2),
        "parallel_fps": round(n_frames / t_par, 2),
        "speedup": round(t_serial / t_par, 3),
    }


def main() -> None:
    args = parse_args(__doc__)
    from farm.video import probe, read_frames

    m = machine()
    n = 40 if args.quick else 100
    clip720 = trimmed_clip(str(SHARED_VIDEOS / "cockatoo.mp4"), n if args.quick else 280)
    clip1080 = trimmed_clip(str(SHARED_VIDEOS / "cockatoo.mp4"), n, 1920, 1080)
    out = scratch("io")
    decode = {}
    for label, path in (("720p", clip720), ("1080p", clip1080)):
        frames = probe(path).frame_count
        (t_farm, got_farm), (t_bare, got_bare) = best_of([(farm_decode, (path,)), (bare_decode, (path,))], 5)
        assert got_farm == got_bare == frames
        decode[label] = {
            "file": path,
            "frames": frames,
            "farm_fps": round(frames / t_farm, 1),
            "bare_pyav_fps": round(frames / t_bare, 1),
            "ratio": round(t_bare / t_farm, 3),
            "runs": "fastest of 5, interleaved",
        }
        print(f"decode {label}: {decode[label]}")
    frames720 = list(read_frames(clip720, 0, min(n, 60)))
    fps = probe(clip720).fps
    (t_farm, _), (t_bare, _) = best_of(
        [
            (farm_encode, (os.path.join(out, "farm.mp4"), frames720, fps)),
            (bare_encode, (os.path.join(out, "bare.mp4"), frames720, fps)),
        ],
        3,
    )
    encode = {
        "resolution": "720p",
        "frames": len(frames720),
        "farm_fps": round(len(frames720) / t_farm, 2),
        "bare_pyav_fps": round(len(frames720) / t_bare, 2),
        "ratio": round(t_bare / t_farm, 3),
        "runs": "fastest of 3, interleaved",
    }
    print(f"encode 720p: {encode}")
    del frames720
    assembly = segment_parallel(clip1080, probe(clip1080).frame_count, 4, str(out))
    print(f"assembly 1080p: {assembly}")
    shutil.rmtree(out, ignore_errors=True)
    write_result(
        "io",
        {
            "machine": m,
            "machine_line": machine_line(m),
            "baseline": "bare PyAV loops with the same settings; one serial encoder for assembly",
            "decode": decode,
            "encode": encode,
            "segment_parallel_assembly_1080p": assembly,
            "target": {"decode_ratio": 0.9, "encode_ratio": 0.9},
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
