"""``SimulatedCuda`` runs the engine's CUDA path on the CPU. Its device tensors are CPU tensors of
a subclass (``_DeviceTensor``), so the simulation sees every torch call that touches device
memory, on any thread, and knows which stream the calling thread is using. It models what a GPU
and PyTorch's caching allocator do and a CPU tensor does not:

- streams run out of order with each other: a copy stream is a thread that lands its copies
  late; the compute stream's kernels run when enqueued, but with ``compute_lag_s`` an event
  recorded after them completes that much later, as a GPU finishes after the host has moved on;
- the legacy default stream (a thread using no stream) is ordered with none of them;
- every use of a device block is logged with its stream and position in that stream; a write
  that is not ordered after another stream's use of the same block (by an event the writer's
  stream waited for, or by that use having completed) is a race, and a block freed while a
  stream other than the one it was allocated on may still use it — no ``record_stream`` for
  that stream, no event — is a use-after-free: the caching allocator hands a freed block to the
  next allocation of its stream at once. The simulation cannot run a kernel late, so instead of
  reading poisoned values it records each such hazard (``hazards``; ``check()`` raises);
- a host synchronisation (``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``, a blocking or
  pageable copy, ``nonzero`` and the calls built on it, ...) on a device tensor is counted
  (``syncs``, ``count_syncs()``);
- ``pin`` checks what ``cudaHostRegister`` checks: byte size, alignment, no double
  registration; a copy between the device and host memory that is not wholly pinned is a sync;
- an engine thread that blocks on an event before binding the device (``bind_thread``) is recorded when
  the device index is not 0: CUDA would have made it a context on GPU 0 (``TorchCuda``'s own
  calls carry a device guard; a thread the engine makes to wait on events binds itself);
- device memory is accounted: ``memory_reserved()`` / ``max_memory_reserved()``.

Limits: tensors a factory makes outside a compute stream's ``using`` block are host tensors
(only ``to_device``/``alloc``/``empty`` make device memory there); in the simulation ``.cpu()``
and ``.to("cpu")`` mean the host, a ``torch.device`` argument means the device.

This module holds the device object with its streams, events, copies and host synchronisations;
its device memory (``simulated_memory``), the interception of torch calls on device tensors
(``simulated_torch``) and the stream and event objects (``simulated_streams``) are modules of
their own, each one part of the model above.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from tierflow.testing.simulated_memory import DeviceMemory, _Block
from tierflow.testing.simulated_streams import SimulatedEvent, SimulatedStream
from tierflow.testing.simulated_torch import TorchCalls, _DeviceTensor, _FactoryMode


class SimulatedCuda(DeviceMemory, TorchCalls):
    """The device path's ``DeviceOps`` on the CPU, for tests of the CUDA scheduling without a GPU
    (what it models, and its limits: this module's docstring).

    Copies on a copy stream run on that stream's thread after ``copy_delay_s`` (so a compute that
    does not wait for its upload's event reads stale bytes); waits, records and copies follow
    CUDA's stream order. Events carry completion times, so the device timeline and the GPU idle
    fraction can be checked. With ``compute_lag_s`` an event recorded by a thread using a stream
    completes that much later: a staging slot is then given back through the event bridge, not
    at once, and a block freed or rewritten before the device is done with it is a hazard.
    ``index`` simulates ``cuda:<index>``."""

    kind = "cuda"

    def __init__(self, copy_delay_s: float = 0.0, compute_lag_s: float = 0.0, *, index: int = 0) -> None:
        self.device = torch.device("cpu")
        self.index = index
        self.unbound: set[str] = set()           # threads that touched cuda:<index> without binding it
        self.copy_delay_s, self.compute_lag_s = copy_delay_s, compute_lag_s
        self._local = threading.local()
        self._lock = threading.RLock()
        self._streams: list[SimulatedStream] = []
        self.default_stream = SimulatedStream("simulated-default-stream", self, threaded=False)
        # completes lagging events, in order (the simulation's own: not a stream the engine made)
        self._lag = SimulatedStream("simulated-lag", self) if compute_lag_s else None
        self._tensor = type("_SimulatedDeviceTensor", (_DeviceTensor,), {"_sim": self})
        self._mode = _FactoryMode(self)
        self._blocks: dict[int, _Block] = {}
        self._pins: dict[int, int] = {}          # data pointer → bytes registered
        self.pinned: list[int] = []              # data pointers of the buffers pinned, then unpinned
        self.unpinned: list[int] = []
        self.copies = 0
        self.hazards: list[str] = []
        self.syncs: list[tuple[str, str]] = []   # (thread, what) of every host synchronisation
        self.reserved = self.peak_reserved = 0

    # -- streams and events --------------------------------------------------------------------

    def _current(self) -> SimulatedStream:
        return getattr(self._local, "stream", None) or self.default_stream

    def _inline(self, stream: SimulatedStream) -> bool:
        return getattr(self._local, "stream", None) is stream

    def _run(self, stream: SimulatedStream, work: Any) -> None:
        if self._inline(stream):
            stream.drain()
            work()
        else:
            stream.submit(work)

    def _position(self, stream: SimulatedStream) -> int:
        """The stream position of work the calling thread does now on ``stream``."""
        thread = getattr(stream, "_thread", None)
        if thread is threading.current_thread():          # queued work, running on the stream's thread
            return getattr(self._local, "seq", stream.enqueued)
        if thread is not None:
            stream.drain()                                # inline work comes after what is queued
        return stream.step(complete=stream is self.default_stream or self._lag is None)

    def stream(self) -> SimulatedStream:
        stream = SimulatedStream(f"simulated-stream-{len(self._streams)}", self)
        self._streams.append(stream)
        return stream

    def record(self, stream: SimulatedStream) -> SimulatedEvent:
        if self._inline(stream):
            stream.drain()
            seq = stream.step(complete=self._lag is None)
            event = SimulatedEvent(self, stream, seq)
            if self._lag is not None:
                due = time.perf_counter() + self.compute_lag_s

                def complete_when_due() -> None:
                    time.sleep(max(0.0, due - time.perf_counter()))
                    event.complete()

                self._lag.submit(complete_when_due)
            else:
                event.complete()
            return event
        with stream.lock:
            event = SimulatedEvent(self, stream, stream.enqueued + 1)
            stream.submit(event.complete)
        return event

    def wait(self, stream: SimulatedStream, event: SimulatedEvent) -> None:

        def work() -> None:
            event._done.wait()
            with self._lock:
                for other, seq in event.clock.items():
                    stream.clock[other] = max(stream.clock.get(other, 0), seq)

        self._run(stream, work)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: SimulatedStream) -> None:
        host = src if not isinstance(src, _DeviceTensor) else dst if not isinstance(dst, _DeviceTensor) else None
        if host is not None and not self._is_pinned(host):
            self._sync(f"an asynchronous copy from or to pageable host memory ({host.numel() * host.element_size()} "
                       "bytes): CUDA stages it through a blocking copy")

        def work() -> None:
            if self.copy_delay_s:
                time.sleep(self.copy_delay_s)
            dst.copy_(src, non_blocking=True)
            self.copies += 1

        self._run(stream, work)

    @contextmanager
    def using(self, stream: SimulatedStream) -> Iterator[SimulatedStream]:
        before = getattr(self._local, "stream", None)
        self._local.stream = stream
        try:
            with self._mode:
                yield stream
        finally:
            self._local.stream = before

    def synchronize(self) -> None:
        # the queued work of every stream runs first (a copy still queued must meet the device as
        # it is, not as if everything had completed), then the lagging events complete
        for stream in self._streams:
            stream.drain()
        if self._lag is not None:
            self._lag.drain()
        for stream in [*self._streams, self.default_stream]:      # everything enqueued has run
            with stream.lock:
                stream.completed = stream.enqueued

    def bind_thread(self) -> None:
        """Make this simulated device the calling thread's current device."""
        self._local.bound = True

    def _touch(self, what: str) -> None:
        """An engine thread ("tierflow-...") blocks on the device: it must have bound it. (Other
        threads — the caller's — reach the device only through guarded calls.)"""
        thread = threading.current_thread().name
        if self.index and thread.startswith("tierflow") and not getattr(self._local, "bound", False):
            self.unbound.add(thread)

    # -- host synchronisation ------------------------------------------------------------------

    def _sync(self, what: str) -> None:
        with self._lock:
            self.syncs.append((threading.current_thread().name, what))

    @contextmanager
    def count_syncs(self) -> Iterator[list[tuple[str, str]]]:
        """The host synchronisations made inside the block: (thread, what) each."""
        first = len(self.syncs)
        found: list[tuple[str, str]] = []
        try:
            yield found
        finally:
            found.extend(self.syncs[first:])

    def check(self) -> None:
        """Raise AssertionError if the run had a hazard or touched the device from an unbound thread."""
        problems = list(self.hazards) + [f"thread {name} touched cuda:{self.index} without binding it: CUDA makes "
                                         "it a context on GPU 0" for name in sorted(self.unbound)]
        if problems:
            raise AssertionError(f"{len(problems)} device hazard(s):\n" + "\n".join(problems[:20]))
