"""An actor's shard as a pipeline, so the model's device never waits on the CPU's work.

    decoder thread --chunks (<= depth)--> model calls (the caller's thread) --outputs (<= depth)--> a writer per channel

Why: an accelerator renders a chunk far faster than one CPU thread decodes, converts and encodes it. Here
decoding runs ahead of the model on its own thread, the model's calls run back to back on the caller's
thread, and each output channel is converted, encoded and uploaded on its own thread behind it (PyAV and
the encoders release the GIL). Every queue holds at most ``depth`` items, so memory stays flat whatever
the shard's length. A failure in any stage stops the others: the first error is raised in the caller's
thread, every thread is joined before that, and writers discard their pieces (nothing partial is uploaded).

``depth=0`` runs the same stages one after the other on the caller's thread (the serial path, kept as
the baseline of ``bench/accelerator.py`` and as the reference of the tests).

Pure threading and numpy: no Ray here, so the in-process worker and the tests run it as it is.
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

Chunk = tuple[int, int, np.ndarray]  # [a, b) video frame indices, uint8 [b - a, H, W, 3]
_POLL_S = 0.05  # how often a blocked stage looks up from its queue to see whether the pipeline stopped
BACKGROUND_NICE = 5  # decoders and writers sit this much nicer than the thread that feeds the model


def yield_to_model() -> None:
    """Lower the calling thread's priority by ``BACKGROUND_NICE`` (Linux, where a thread has a nice value
    of its own; threads it starts, such as the codec's, inherit it; Ray's workers run at 15, so there it is
    19). When decoders, encoders and the model's own host work want more CPU than the actor has, the
    model's thread goes first: the device must not wait, and the bounded queues between the stages let the
    others catch up while the device computes."""
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
        except OSError:
            pass


class Stopped(Exception):
    """The pipeline was stopped (by another stage's failure or by the caller): not an error of its own."""


class _End:
    """The last item of a queue; carries the producer's error, if it failed."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class BoundedQueue:
    """A FIFO of at most ``depth`` items whose blocking calls give up when ``stop`` is set.
    ``high`` is the most items it ever held (the tests check it never exceeds ``depth``)."""

    def __init__(self, depth: int, stop: threading.Event) -> None:
        self.depth, self.stop, self.high = depth, stop, 0
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def put(self, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                self._q.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            self.high = max(self.high, self._q.qsize())
            return

    def get(self, check: Callable[[], None] | None = None) -> Any:
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                return self._q.get(timeout=_POLL_S)
            except queue.Empty:
                if check is not None:
                    check()


def stack_frames(frames: list[np.ndarray]) -> np.ndarray:
    return np.stack(frames)


class ChunkReader:
    """Decodes ``ranges`` (consecutive ``[a, b)`` of one video) into stacked chunks, ahead on its own thread.

    It may be started before the shard that reads it (``ModelWorker.prefetch``): ``key`` says which frames
    it decodes, so a shard adopts it only when its own ranges are the same. ``stage`` turns a chunk's
    decoded frames into the batch the model takes (``np.stack``; on CUDA, into pinned memory, uploaded).
    """

    def __init__(
        self,
        url: str,
        ranges: list[tuple[int, int]],
        storage_options: dict[str, Any] | None = None,
        depth: int = 2,
        stage: Callable[[list[np.ndarray]], np.ndarray] = stack_frames,
        read: Callable[..., Iterator[np.ndarray]] | None = None,
        turn: Ticket | None = None,
    ) -> None:
        self.url, self.ranges, self.so, self.depth, self.stage = url, list(ranges), storage_options or {}, depth, stage
        self._read = read
        self.turn = turn  # the shard's place at the actor's model: when its decoder may start
        self.stop = threading.Event()
        self.queue = BoundedQueue(max(depth, 1), self.stop)
        self._thread: threading.Thread | None = None
        self._serial: Iterator[Chunk] | None = None
        self.cpu_s: float | None = None  # CPU seconds of the decoder thread (where the time goes)

    @property
    def key(self) -> tuple[str, tuple[tuple[int, int], ...]]:
        return self.url, tuple(self.ranges)

    def matches(self, url: str, ranges: list[tuple[int, int]], storage_options: dict[str, Any]) -> bool:
        return self.key == (url, tuple(ranges)) and self.so == storage_options and not self.stop.is_set()

    def chunks(self) -> Iterator[Chunk]:
        """The decode itself, on whichever thread iterates it."""
        if not self.ranges:
            return
        if self._read is None:
            from farm.video import read_frames

            self._read = read_frames
        first, last = self.ranges[0][0], self.ranges[-1][1]
        frames = self._read(self.url, first, last, storage_options=self.so)
        try:
            for a, b in self.ranges:
                got = list(itertools.islice(frames, b - a))
                if len(got) != b - a:
                    raise RuntimeError(f"{self.url}: decoded {len(got)} frames for [{a}, {b})")
                yield a, b, self.stage(got)
        finally:
            frames.close()

    def start(self) -> ChunkReader:
        if self.depth and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"farm-decode[{self.ranges[0][0]}]", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        yield_to_model()
        t0 = time.thread_time()
        try:
            while self.turn is not None and not self.turn.may_decode.wait(_POLL_S):
                if self.stop.is_set():
                    return
            for item in self.chunks():
                self.queue.put(item)
                if self.turn is not None:
                    self.turn.decoded()
            self.cpu_s = time.thread_time() - t0
            self.queue.put(_End())
        except Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised in its thread
            try:
                self.queue.put(_End(e))
            except Stopped:
                return

    def next(self, check: Callable[[], None] | None = None) -> Chunk | None:
        """The next chunk, None after the last; raises the decoder's error in the caller's thread."""
        if not self.depth:
            if self._serial is None:
                self._serial = self.chunks()
            return next(self._serial, None)
        self.start()
        item = self.queue.get(check)
        if isinstance(item, _End):
            self.stop.set()
            if item.error is not None:
                raise item.error
            return None
        return item

    def close(self) -> None:
        """Stop decoding and join the thread (it closes its decoder itself)."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._serial is not None:
            self._serial.close()


class Turns:
    """An actor's model, one shard at a time, in the driver's order (a line of tickets).

    In order, because the driver counts the first shard it sent as the one rendering and a later one as
    queued (which it may move to an idle actor), while Ray may start their calls' threads either way round:
    until a shard's model calls begin, one the driver sent before it goes ahead of it. A shard waiting in
    line decodes ahead, but only once the shard before it has its first chunk: two decoders starting at
    once slow the one whose chunk the model is waiting for."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._line: list[Ticket] = []

    def take(self, order: int = 0) -> Ticket:
        """A place in line by ``order`` behind the shard whose calls began (leave it with ``Ticket.leave``,
        whatever happens)."""
        ticket = Ticket(self, order)
        with self._cond:
            at = next((i for i, t in enumerate(self._line) if not t.holding and t.order > order), len(self._line))
            self._line.insert(at, ticket)
            self._update()
        return ticket

    def _update(self) -> None:
        for i, t in enumerate(self._line):
            if i == 0 or self._line[i - 1].first_chunk:
                t.may_decode.set()
        self._cond.notify_all()


class Ticket:
    """One shard's place in ``Turns``: ``wait`` for the model, ``leave`` when its calls are done."""

    def __init__(self, turns: Turns, order: int) -> None:
        self.turns, self.order = turns, order
        self.may_decode = threading.Event()
        self.first_chunk = False
        self.holding = False  # its model calls began: nothing goes ahead of it any more

    def decoded(self) -> None:
        """Its first chunk is decoded: the shard after it may start decoding."""
        if not self.first_chunk:
            with self.turns._cond:
                self.first_chunk = True
                self.turns._update()

    def wait(self, check: Callable[[], None] | None = None) -> None:
        """Until it is this shard's turn; ``check`` (an abort) is called while it waits and may raise."""
        with self.turns._cond:
            while self.turns._line[0] is not self:
                if check is not None:
                    check()
                self.turns._cond.wait(_POLL_S)
            self.holding = True

    def leave(self) -> None:
        with self.turns._cond:
            if self in self.turns._line:
                self.turns._line.remove(self)
                self.turns._update()


class Consumer(Protocol):
    """A stage behind the model: ``write`` each item in order, then ``finish`` (its result), or ``discard``."""

    def write(self, item: Any) -> None: ...

    def finish(self) -> Any: ...

    def discard(self) -> None: ...


class Pipeline:
    """Runs one shard: ``for a, b, batch in pipe.chunks(): ...; pipe.emit(item)``, then ``pipe.finish()``.

    Use it as a context manager: leaving it early (an exception, an abort) stops every stage, joins every
    thread and discards what the consumers had written."""

    def __init__(self, reader: ChunkReader, consumers: dict[str, Consumer], depth: int = 2) -> None:
        self.reader, self.consumers, self.depth = reader, consumers, depth
        self.stop = threading.Event()
        self.queues = {name: BoundedQueue(max(depth, 1), self.stop) for name in consumers}
        self.results: dict[str, Any] = {}
        self.cpu_s: dict[str, float] = {}  # CPU seconds of each consumer's thread (where the time goes)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._finished = False

    def __enter__(self) -> Pipeline:
        if self.depth:
            self.reader.start()
            for name, consumer in self.consumers.items():
                t = threading.Thread(target=self._consume, args=(name, consumer), name=f"farm-write[{name}]")
                t.daemon = True
                t.start()
                self._threads.append(t)
        return self

    def fail(self, e: BaseException) -> None:
        with self._lock:
            if self._error is None:
                self._error = e
        self.stop.set()

    def check(self) -> None:
        """Raise the first error of any stage (in the caller's thread)."""
        if self._error is not None:
            raise self._error

    def _consume(self, name: str, consumer: Consumer) -> None:
        yield_to_model()
        q, t0 = self.queues[name], time.thread_time()
        try:
            while True:
                item = q.get()
                if isinstance(item, _End):
                    self.results[name] = consumer.finish()
                    self.cpu_s[name] = time.thread_time() - t0
                    return
                consumer.write(item)
        except Stopped:
            consumer.discard()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by check()
            self.fail(e)
            consumer.discard()

    def chunks(self) -> Iterator[Chunk]:
        while True:
            self.check()
            try:
                item = self.reader.next(self.check)
            except Stopped:
                self.check()
                raise
            if item is None:
                return
            yield item

    def emit(self, item: Any) -> None:
        """Hand one model output to every consumer (blocks while a queue is full)."""
        if not self.depth:
            for consumer in self.consumers.values():
                consumer.write(item)
            return
        for name in self.consumers:
            try:
                self.queues[name].put(item)
            except Stopped:
                self.check()
                raise

    def finish(self) -> dict[str, Any]:
        """Wait for every consumer to write its last item and finish; their results by name."""
        if not self.depth:
            for name, consumer in self.consumers.items():
                self.results[name] = consumer.finish()
        else:
            for name in self.consumers:
                try:
                    self.queues[name].put(_End())
                except Stopped:
                    self.check()
                    raise
            for t in self._threads:
                t.join()
            self.check()
        self._finished = True
        return self.results

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stop.set()
        self.reader.close()
        for t in self._threads:
            t.join()
        if not self.depth and not self._finished:
            for consumer in self.consumers.values():
                consumer.discard()


class StagedBatch(np.ndarray):
    """A host batch (``uint8 [T, H, W, 3]``, in pinned memory) whose copy to the device is under way.

    It is the numpy batch every model takes, so nothing changes for models that ignore it; models that
    take ``device`` read the copy with ``actors.base.device_frames``. A slice or view (an out-of-memory half)
    carries no copy: it is uploaded the plain way."""

    device_copy: Any = None
    ready: Any = None  # CUDA event recorded after the copy on the upload stream
    pinned: Any = None  # the pinned host tensor (kept alive until the copy is done)

    def __array_finalize__(self, obj: Any) -> None:
        self.device_copy = self.ready = self.pinned = None


class CudaStager:
    """On CUDA, the decoder thread's last step: stack a chunk's frames into pinned host memory and start its
    ``non_blocking`` copy to the device on a side stream, so the next batch uploads while the model computes
    the current one."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch, self.device = torch, torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(device=self.device)

    def __call__(self, frames: list[np.ndarray]) -> np.ndarray:
        torch = self.torch
        pinned = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, pin_memory=True)
        host = pinned.numpy()
        np.stack(frames, out=host)
        with torch.cuda.stream(self.stream):
            copy = pinned.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        batch = host.view(StagedBatch)
        batch.device_copy, batch.ready, batch.pinned = copy, ready, pinned
        return batch
