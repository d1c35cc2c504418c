"""The streams and events of ``SimulatedCuda`` (the model: ``simulated_cuda``'s docstring): a stream
runs the work queued from other threads in order on its own thread and counts what it has
enqueued and completed; an event completes when its stream reaches it and carries the positions
of the streams it covers, by which the simulation tells ordered uses of a block from races."""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tierflow.testing.simulated_cuda import SimulatedCuda


class SimulatedEvent:
    """An event of ``SimulatedCuda``: completes when its stream reaches it; knows when, and
    which work of which streams it covers."""

    def __init__(self, sim: "SimulatedCuda | None" = None, stream: "SimulatedStream | None" = None,
                 seq: int = 0) -> None:
        self._done = threading.Event()
        self.at = 0.0
        self._sim, self.stream, self.seq = sim, stream, seq
        self.clock: dict[SimulatedStream, int] = dict(stream.clock) if stream is not None else {}
        if stream is not None:
            self.clock[stream] = seq

    def complete(self) -> None:
        if self.stream is not None:
            with self.stream.lock:
                self.stream.completed = max(self.stream.completed, self.seq)
        self.at = time.perf_counter()
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        if self._sim is not None:
            self._sim._touch("event.synchronize")
        self._done.wait()

    def elapsed_time(self, end: "SimulatedEvent") -> float:
        if not (self._done.is_set() and end._done.is_set()):
            raise RuntimeError("elapsed_time of an event that has not completed")
        return (end.at - self.at) * 1e3


class SimulatedStream:
    """A stream of ``SimulatedCuda``: work enqueued from a thread that is not *using* it runs in
    order on the stream's own thread; work from a thread using it (``with ops.using(s)``) runs
    at once in that thread, after the work already queued, as if the kernels had been enqueued
    and completed. ``enqueued`` / ``completed`` count its work; ``clock`` is the position of
    every other stream this one has waited for (through events)."""

    def __init__(self, name: str, sim: "SimulatedCuda | None" = None, *, threaded: bool = True) -> None:
        self.name, self._sim = name, sim
        self.lock = threading.Condition()
        self.enqueued = self.completed = 0
        self.clock: dict[SimulatedStream, int] = {}
        self._queued = 0
        self._queue: Any = queue.SimpleQueue()
        if threaded:
            self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"<stream {self.name}>"

    def _serve(self) -> None:
        if self._sim is not None:
            self._sim._local.stream = self
            self._sim._local.bound = True
        while True:       # a daemon thread: it ends with the process
            seq, work = self._queue.get()
            if self._sim is not None:
                self._sim._local.seq = seq
            try:
                work()
            finally:
                with self.lock:
                    self.completed = max(self.completed, seq)
                    self._queued -= 1
                    self.lock.notify_all()

    def submit(self, work: Any) -> None:
        with self.lock:
            self.enqueued += 1
            self._queued += 1
            seq = self.enqueued
        self._queue.put((seq, work))

    def drain(self) -> None:
        """Wait until the work queued so far has run (work done inline keeps stream order)."""
        with self.lock:
            while self._queued:
                self.lock.wait()

    def step(self, complete: bool) -> int:
        """A position for work done inline; complete at once unless the device lags."""
        with self.lock:
            self.enqueued += 1
            if complete:
                self.completed = self.enqueued
            return self.enqueued
