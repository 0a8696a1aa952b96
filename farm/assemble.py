"""Small tasks after rendering: encode each blended overlap as its own piece, then commit each output.

Encoding is the slowest CPU step, so no video is encoded serially: every shard already encoded its
core; here each overlap (a few frames) is blended and encoded in a task of its own, and the final file
is a remux concat of the pieces (``VideoSink.on_write_complete``), never a re-encode.

They run on the job's ``Assembler``, one actor started beside the model actors: a Ray task on a worker
process that Ray started (or restarted after it idled) waits about a second for the process and its imports,
and a video's commit is the last step of its render time.
"""

from __future__ import annotations

from typing import Any

from farm.sinks import OutputTarget, make_sink
from farm.stitch import Ramp, blend, seam_disagreement, to_uint8
from farm.worker import load_npz


def blend_overlap(
    target: OutputTarget, name: str, start: int, tail_url: str, head_url: str, kind: Ramp = "linear"
) -> dict[str, Any]:
    """Blend shard i's tail with shard i+1's head (same frame indices) and write it as a piece.

    The piece record carries ``seam``: how far the two renders disagreed before the blend
    (``farm.stitch.seam_disagreement``); the driver takes it off before the piece is committed."""
    so = target.storage_options
    tail = load_npz(tail_url, so)["frames"]  # [n, H, W, C] float16
    head = load_npz(head_url, so)["frames"]
    if tail.shape != head.shape:
        raise ValueError(f"{name}: overlap frames differ: {tail.shape} vs {head.shape}")
    seam = seam_disagreement(tail, head, start)
    return {**make_sink(target).write_piece(name, start, to_uint8(blend(tail, head, kind))), "seam": seam}


def commit_output(target: OutputTarget, pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the pieces in frame order and make the final output appear atomically."""
    covered = 0
    for p in sorted(pieces, key=lambda p: p["start"]):
        if p["start"] != covered:
            raise ValueError(
                f"{target.url}: pieces leave a gap or overlap at frame {covered} (next starts {p['start']})"
            )
        covered += p["frames"]
    sink = make_sink(target)
    try:
        return sink.on_write_complete(pieces)
    except BaseException as e:
        sink.on_write_failed(e)
        raise


class Assembler:
    """The job's process for blends and commits (wrapped by ``ray.remote`` in ``farm.pool``): started with
    the model actors, it has imported this module (sinks, stitch, PyAV) when the first shards finish. Its
    calls run on a few threads at once (PyAV's muxing, numpy and storage I/O release the GIL); Ray restarts
    it and retries a call that its death cut short, as it retried the tasks these once were."""

    def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)
