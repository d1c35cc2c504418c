"""What a sweep needs to run on a CUDA device: its streams and timeline, and its small uploads.

``DevicePath`` carries the compute stream, the device timeline, the weight uploader and the
units computed on the host (a host-resident embedding), and sums the device's busy time over
sweeps; ``HostStaging`` is the pinned memory a sweep's small host → device copies go through.
The sweep runner (``compute.SweepRunner``) drives them; on the CPU it has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from tierflow.adapters import UnitWeights
from tierflow.pipeline.cuda import DeviceTimeline
from tierflow.pipeline.device import DeviceOps
from tierflow.stages.upload import StreamUploader
from tierflow.tiers.io.reader import aligned_empty

if TYPE_CHECKING:
    from tierflow.stages.compute import SweepBatch


@dataclass(slots=True)
class DevicePath:
    """What a sweep needs to run on a CUDA device."""
    ops: DeviceOps
    compute: Any                                   # the compute stream
    timeline: DeviceTimeline
    uploader: StreamUploader | None = None
    host_units: dict[int, UnitWeights] = field(default_factory=dict)   # computed on the host (the embedding)
    gpu_busy_s: float = 0.0                        # device time inside units' kernels, summed over sweeps
    gpu_span_s: float = 0.0                        # device time from each sweep's first kernel to its last

    staging: "HostStaging | None" = None          # pinned host memory the sweep's small uploads go through

    def upload(self, tensor: torch.Tensor) -> torch.Tensor:
        """In the compute worker, using the compute stream: ``tensor`` (host) on the device,
        through pinned memory, in stream order — the host does not wait for the copy."""
        if self.staging is None:
            self.staging = HostStaging(self.ops)
        return self.ops.to_device(self.staging.put(tensor), non_blocking=True)

    def to_device(self, batch: "SweepBatch") -> "SweepBatch":
        """The batch's positions, logit rows and token ids on the device: one copy."""
        parts = (batch.positions, batch.logit_rows, batch.token_ids)
        packed = self.upload(torch.cat([p.to(torch.int64) for p in parts]))
        positions, logit_rows, token_ids = packed.split([len(p) for p in parts])
        return replace(batch, positions=positions, logit_rows=logit_rows, token_ids=token_ids)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()


class HostStaging:
    """Pinned host memory for a sweep's small host → device copies (the batch's token ids and
    positions, a host-resident embedding's rows). Copies from it are asynchronous, so a region
    is reused only in a later sweep: each sweep ends by waiting for its logits, after every copy
    it enqueued. A sweep that needs more than the buffer holds gets a larger one; the old one
    is given back at the next sweep."""

    def __init__(self, ops: DeviceOps, nbytes: int = 1 << 20) -> None:
        self.ops = ops
        self._buffer = self._pinned(nbytes)
        self._offset = 0
        self._retired: list[torch.Tensor] = []

    def _pinned(self, nbytes: int) -> torch.Tensor:
        buffer = aligned_empty(nbytes)
        self.ops.pin(buffer)
        return buffer

    def begin_sweep(self) -> None:
        """The previous sweep's copies have all completed (its logits are on the host)."""
        self._offset = 0
        for buffer in self._retired:
            self.ops.unpin(buffer)
        self._retired.clear()

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        start = -(-self._offset // 64) * 64
        if start + nbytes > self._buffer.numel():
            self._retired.append(self._buffer)
            self._buffer = self._pinned(max(2 * self._buffer.numel(), -(-nbytes // 4096) * 4096))
            start = 0
        self._offset = start + nbytes
        view = self._buffer[start:start + nbytes].view(tensor.dtype).view(tensor.shape)
        view.copy_(tensor)
        return view

    def close(self) -> None:
        self.begin_sweep()
        self.ops.unpin(self._buffer)
