"""The upload stage: host staging buffer → device staging slot.

On CPU the device *is* the host, so the upload is the identity and the compute reads the
staging buffer in place. The CUDA uploader (copy stream, pinned slots, events bridged to
asyncio) implements the same two calls.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Uploader(Protocol):
    async def upload(self, host_buffer: torch.Tensor, slot: int) -> torch.Tensor:
        """Make ``host_buffer`` available on the device; returns the device-side buffer."""
        ...

    def statistics(self) -> dict[str, float]: ...


class SameDevice:
    """CPU mode: nothing to move."""

    async def upload(self, host_buffer: torch.Tensor, slot: int) -> torch.Tensor:
        return host_buffer

    def statistics(self) -> dict[str, float]:
        return {"upload_bytes": 0.0, "upload_s": 0.0}
