"""The device memory of ``SimulatedCuda`` (the model: ``simulated_cuda``'s docstring): allocation on
the calling thread's stream with reserved and peak bytes, each block's last use and write by every
stream, from which a race or a use after free is recorded as a hazard, and the host ranges pinned
as ``cudaHostRegister`` would pin them. A base class of ``SimulatedCuda``, apart because the
allocator's bookkeeping is a job of its own; the state it reads (``_blocks``, ``_pins``,
``_lock``, the counters) is set up by ``SimulatedCuda.__init__``."""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

from tierflow.testing.simulated_streams import SimulatedStream
from tierflow.testing.simulated_torch import _DeviceTensor


class _Block:
    """One device storage: where it was allocated, and its last use by each stream."""
    __slots__ = ("nbytes", "stream", "uses", "recorded", "what")

    def __init__(self, nbytes: int, stream: "SimulatedStream", what: str) -> None:
        self.nbytes, self.stream, self.what = nbytes, stream, what
        self.uses: dict[SimulatedStream, tuple[int, int]] = {}     # stream → (last use, last write)
        self.recorded: set[SimulatedStream] = set()


class DeviceMemory:
    """Device memory and pinned host memory of ``SimulatedCuda`` (its base class)."""

    # -- memory --------------------------------------------------------------------------------

    def empty(self, nbytes: int) -> torch.Tensor:
        # not zeros: stale bytes must show
        return self._adopt(torch.full((nbytes,), 0xAB, dtype=torch.uint8), "empty")

    def alloc(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(tuple(shape), dtype=dtype)
        if t.is_floating_point():
            t.fill_(float("nan"))           # uninitialised device memory: never zeros
        return self._adopt(t, "alloc")

    def to_device(self, tensor: torch.Tensor, *, non_blocking: bool = False) -> torch.Tensor:
        """A device copy of host ``tensor`` on the calling thread's stream (the legacy default
        stream when it uses none): complete when this returns, or with ``non_blocking`` (from
        pinned memory only) in that stream's order."""
        if isinstance(tensor, _DeviceTensor):
            raise AssertionError("to_device() of a tensor already on the simulated device")
        if not non_blocking:
            self._sync("to_device(): a blocking copy from the host")
        elif not self._is_pinned(tensor):
            self._sync("to_device(non_blocking=True) from pageable host memory")
        stream = self._current()
        if getattr(stream, "_thread", None) is not None:
            stream.drain()
        copy = self._adopt(tensor.detach().clone(), "to_device")
        self._use(copy, True, "to_device")
        return copy

    def record_stream(self, tensor: torch.Tensor, stream: SimulatedStream) -> None:
        block = self._block(tensor)
        if block is None:
            raise AssertionError("record_stream() of a tensor that is not in device memory")
        block.recorded.add(stream)

    def memory_reserved(self) -> int:
        return self.reserved

    def max_memory_reserved(self) -> int:
        return self.peak_reserved

    def reset_peak_memory(self) -> None:
        self.peak_reserved = self.reserved

    def _adopt(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor``'s memory becomes device memory, allocated on the calling thread's stream."""
        with torch._C.DisableTorchFunctionSubclass():
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and ptr not in self._blocks:
            with self._lock:
                self._blocks[ptr] = _Block(nbytes, self._current(), what)
                self.reserved += nbytes
                self.peak_reserved = max(self.peak_reserved, self.reserved)
            weakref.finalize(storage, self._freed, ptr)
        return tensor if isinstance(tensor, self._tensor) else tensor.as_subclass(self._tensor)

    def _block(self, tensor: torch.Tensor) -> _Block | None:
        with torch._C.DisableTorchFunctionSubclass():
            return self._blocks.get(tensor.untyped_storage().data_ptr())

    def _freed(self, ptr: int) -> None:
        with self._lock:
            block = self._blocks.pop(ptr, None)
            if block is None:
                return
            self.reserved -= block.nbytes
            for stream, (seq, _) in block.uses.items():
                if stream is block.stream or stream in block.recorded or self._ordered(stream, seq, block.stream):
                    continue
                self.hazards.append(
                    f"use after free: a device block of {block.nbytes} bytes ({block.what}, allocated on "
                    f"{block.stream.name}) was freed while {stream.name} had not finished using it (position {seq}, "
                    f"done {stream.completed}); without record_stream or an event the caching allocator gives it "
                    f"to the next allocation on {block.stream.name} at once")

    @staticmethod
    def _ordered(other: SimulatedStream, seq: int, stream: SimulatedStream) -> bool:
        """Whether ``other``'s work up to ``seq`` is done, or ``stream`` waited for it."""
        return other.completed >= seq or stream.clock.get(other, 0) >= seq

    def _use(self, tensor: torch.Tensor, wrote: bool, what: str, seq: int | None = None) -> None:
        block = self._block(tensor)
        if block is None:
            return
        stream = self._current()
        seq = self._position(stream) if seq is None else seq
        with self._lock:
            for other, (used, written) in block.uses.items():
                last = used if wrote else written          # a write conflicts with any use, a read with a write
                if other is stream or not last or self._ordered(other, last, stream):
                    continue
                self.hazards.append(
                    f"race: {what} on {stream.name} {'writes' if wrote else 'reads'} a device block ({block.what}, "
                    f"{block.nbytes} bytes) that {other.name} {'used' if wrote else 'wrote'} at position {last} "
                    f"(done {other.completed}), with no event ordering the two")
            written = seq if wrote else block.uses.get(stream, (0, 0))[1]
            block.uses[stream] = (seq, written)

    # -- pinned memory -------------------------------------------------------------------------

    def pin(self, buffer: torch.Tensor) -> None:
        from tierflow.pipeline.device import pinned_range

        ptr, nbytes = pinned_range(buffer)
        if not nbytes:                   # nothing to register (TorchCuda makes no call)
            self.pinned.append(ptr)
            return
        if ptr % 4096:
            raise AssertionError(f"cudaHostRegister of {nbytes} bytes at {ptr:#x}: not page-aligned")
        for start, size in self._pins.items():
            if start < ptr + nbytes and ptr < start + size:
                raise AssertionError(f"cudaHostRegister of {ptr:#x}..{ptr + nbytes:#x}: overlaps a registered range "
                                     "(cudaErrorHostMemoryAlreadyRegistered)")
        self._pins[ptr] = nbytes
        self.pinned.append(ptr)

    def unpin(self, buffer: torch.Tensor) -> None:
        ptr = buffer.data_ptr()
        if not buffer.numel():
            self.unpinned.append(ptr)
            return
        if self._pins.pop(ptr, None) is None:
            raise AssertionError(f"cudaHostUnregister of {ptr:#x}: not registered")
        self.unpinned.append(ptr)

    def _is_pinned(self, tensor: torch.Tensor) -> bool:
        with torch._C.DisableTorchFunctionSubclass():
            ptr, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        return any(start <= ptr and ptr + nbytes <= start + size for start, size in self._pins.items())
