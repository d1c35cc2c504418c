"""What the engine's device path needs from a device (``DeviceOps``, ``Event``), and
``TorchCuda``, its implementation on one CUDA GPU through torch.

The rest of the CUDA path (``pipeline.cuda``: the event bridge, stream-ordered slot release,
the device timeline) and the stages are written against the Protocols only, so
``tierflow.testing.SimulatedCuda`` can stand in for ``TorchCuda`` on the CPU.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, Sequence

import torch

from tierflow.errors import PinnedMemoryError


class Event(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...

    def elapsed_time(self, end: Any) -> float: ...     # milliseconds from this event to ``end``


class DeviceOps(Protocol):
    """What the engine's device path needs from a device: streams, events recorded on them,
    waits between them, asynchronous host → device copies, and memory."""

    kind: str                       # the hardware profile's device kind ("cuda")
    device: torch.device            # where device tensors live

    def stream(self) -> Any: ...

    def record(self, stream: Any) -> Event: ...

    def wait(self, stream: Any, event: Event) -> None: ...

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> None: ...

    def using(self, stream: Any) -> AbstractContextManager[Any]: ...

    def empty(self, nbytes: int) -> torch.Tensor: ...

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...

    def to_device(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor: ...

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None: ...

    def pin(self, buffer: torch.Tensor) -> None: ...

    def unpin(self, buffer: torch.Tensor) -> None: ...

    def synchronize(self) -> None: ...

    def bind_thread(self) -> None: ...

    def memory_reserved(self) -> int: ...

    def max_memory_reserved(self) -> int: ...

    def reset_peak_memory(self) -> None: ...


def pinned_range(buffer: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) that registering ``buffer`` as pinned memory must cover: all of its
    elements, whatever their size. A buffer that is not contiguous has no such range."""
    if not buffer.is_contiguous():
        raise ValueError("only a contiguous buffer can be pinned: its bytes must be one range")
    return buffer.data_ptr(), buffer.numel() * buffer.element_size()


class TorchCuda:
    """``DeviceOps`` of one CUDA device through torch. Events are made ``blocking`` (a thread
    waiting on one sleeps in the driver) and with timing, for the device timeline. Host
    memory is pinned by registering it (``cudaHostRegister``): the buffer keeps its own
    alignment and size, where torch's pinned allocator would round a 13 GB request up to 16."""

    kind = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def record(self, stream: torch.cuda.Stream) -> "GuardedEvent":
        event = torch.cuda.Event(enable_timing=True, blocking=True)
        event.record(stream)
        return GuardedEvent(event, self.device)

    def wait(self, stream: torch.cuda.Stream, event: "GuardedEvent") -> None:
        stream.wait_event(event.event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def using(self, stream: torch.cuda.Stream) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)

    def to_device(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        """A copy of host ``tensor`` on the device, on the current stream: complete when this
        returns, or (``non_blocking``, from pinned memory) in that stream's order."""
        return tensor.to(self.device, copy=True, non_blocking=non_blocking)

    def record_stream(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)

    def pin(self, buffer: torch.Tensor) -> None:
        ptr, nbytes = pinned_range(buffer)
        if nbytes:
            with torch.cuda.device(self.device):      # registered for this device's context
                _check_cuda(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0), "register")

    def unpin(self, buffer: torch.Tensor) -> None:
        if buffer.numel():
            with torch.cuda.device(self.device):
                _check_cuda(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr()), "unregister")

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def bind_thread(self) -> None:
        """Make this device the calling thread's current one: a thread that makes CUDA calls
        without it would create (and hold memory for) a context on GPU 0."""
        torch.cuda.set_device(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def max_memory_reserved(self) -> int:
        return torch.cuda.max_memory_reserved(self.device)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class GuardedEvent:
    """A CUDA event whose calls run with its device current, from whatever thread makes them:
    a thread that has never set its device would otherwise create a context on GPU 0."""

    __slots__ = ("event", "device")

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event, self.device = event, device

    def query(self) -> bool:
        with torch.cuda.device(self.device):
            return self.event.query()

    def synchronize(self) -> None:
        with torch.cuda.device(self.device):
            self.event.synchronize()

    def elapsed_time(self, end: "GuardedEvent") -> float:
        with torch.cuda.device(self.device):
            return self.event.elapsed_time(end.event)


def _check_cuda(status: Any, what: str) -> None:
    if isinstance(status, tuple):        # some bindings return (error, ...)
        status = status[0]
    code = int(getattr(status, "value", status))
    if code:
        try:      # a failed call leaves a sticky error that the next kernel launch check would report as its own
            torch.cuda.cudart().cudaGetLastError()
        except Exception:  # noqa: BLE001 - clearing is best effort; the error below says what failed
            pass
        raise PinnedMemoryError(f"cudaHost{what.capitalize()} failed with CUDA error {code}: pinning host memory "
                                "needs the RAM to be available (see `ulimit -l` in containers); lower the host "
                                "budgets (EngineConfig.host_memory_bytes, kv_host_bytes) or raise the limit")
