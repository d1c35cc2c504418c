"""The strict ``SimulatedCuda`` catches what it claims to: each hazard shown on a small case."""

from __future__ import annotations

import threading

import pytest
import torch

from tierflow.pipeline.device import TorchCuda, pinned_range
from tierflow.testing import SimulatedCuda
from tierflow.tiers.io.reader import aligned_empty


def test_pinning_registers_every_byte_of_a_wide_buffer():
    buffer = aligned_empty(8192).view(torch.bfloat16)
    assert pinned_range(buffer) == (buffer.data_ptr(), 8192)        # not numel(): half of it
    ops = SimulatedCuda()
    ops.pin(buffer)
    assert ops._is_pinned(buffer[-16:])                            # the last elements are pinned too
    with pytest.raises(AssertionError, match="overlaps"):
        ops.pin(buffer[:64])                                        # double registration
    with pytest.raises(AssertionError, match="page-aligned"):
        ops.pin(aligned_empty(8192)[8:])
    with pytest.raises(ValueError, match="contiguous"):
        pinned_range(aligned_empty(8192).view(64, 128).t())
    ops.unpin(buffer)


def test_torch_cuda_registers_the_byte_size(monkeypatch):
    calls = []

    class Runtime:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(nbytes)
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Runtime())
    monkeypatch.setattr(torch.cuda, "device", lambda device: _Nothing())
    TorchCuda(torch.device("cuda", 0)).pin(aligned_empty(4096).view(torch.float32))
    assert calls == [4096]


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_block_freed_under_a_lagging_stream_is_a_hazard():
    ops = SimulatedCuda(compute_lag_s=0.5)      # long: the copy runs well before, even on a busy machine
    compute = ops.stream()
    weights = ops.to_device(torch.ones(64))          # allocated on the legacy default stream
    with ops.using(compute):
        (weights * 2).sum()                          # a kernel queued on the compute stream
        ops.record(compute)
    del weights                                      # freed while that kernel may still run
    assert any("use after free" in h for h in ops.hazards)
    ops.hazards.clear()
    protected = ops.to_device(torch.ones(64))
    ops.record_stream(protected, compute)
    with ops.using(compute):
        (protected * 2).sum()
        ops.record(compute)
    del protected
    assert not ops.hazards


def test_a_write_on_another_stream_without_an_event_is_a_race():
    ops = SimulatedCuda(compute_lag_s=0.5)      # long: the copy runs well before, even on a busy machine
    compute, copy = ops.stream(), ops.stream()
    slot = ops.empty(256)
    with ops.using(compute):
        slot.float().sum()
        used = ops.record(compute)
    ops.copy(slot, aligned_empty(256), copy)        # no wait for the compute that read it
    ops.synchronize()
    assert any("race" in h for h in ops.hazards)
    ops.hazards.clear()
    ops.wait(copy, used)
    ops.copy(slot, aligned_empty(256), copy)
    ops.synchronize()
    assert not ops.hazards


def test_host_synchronisations_are_counted():
    ops = SimulatedCuda()
    compute = ops.stream()
    x = ops.to_device(torch.arange(8.0))
    with ops.using(compute), ops.count_syncs() as syncs:
        y = x * 2
        torch.zeros(3, device=x.device)             # a factory naming the device: no sync
        y.sum().item()
        bool((y > 3).any())
        torch.where(y > 3)
        y.cpu()
    assert [what.split(" ")[0] for _, what in syncs] == ["Tensor.item()", "Tensor.__bool__()", "torch.where(condition):",
                                                       "Tensor.cpu()"]


def test_a_thread_that_does_not_bind_cuda_1_is_reported():
    ops = SimulatedCuda(index=1)
    ops.bind_thread()
    event = ops.record(ops.stream())
    worker = threading.Thread(target=event.synchronize, name="tierflow-unbound-waiter")
    worker.start()
    worker.join()
    assert ops.unbound == {"tierflow-unbound-waiter"}
    with pytest.raises(AssertionError, match="unbound-waiter"):
        ops.check()
    ops.unbound.clear()
