from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tierflow.stages.upload import unit_views
from tierflow.tiers.checkpoint.index import ALIGN_BYTES, CheckpointIndex
from tierflow.tiers.io.reader import DiskReader, aligned_empty


def _read_all(index: CheckpointIndex, direct_io: str = "auto"):
    reader = DiskReader(index.files, io_threads=3, block_bytes=64 * 1024, direct_io=direct_io)

    async def main():
        out = []
        for layout in index.units:
            buf = aligned_empty(layout.buffer_bytes)
            await reader.read(layout, buf)
            out.append({k: v.clone() for k, v in unit_views(layout, buf).items()})
        return out

    try:
        return asyncio.run(main()), reader.statistics()
    finally:
        reader.close()


@pytest.mark.parametrize("name", ["gqa-untied-fp32", "mha-tied-fp32", "sharded-fp32", "gqa-tied-bf16"])
def test_units_are_aligned_ranges_that_read_back_every_tensor(tiny_models, name):
    path = tiny_models[name]
    index = CheckpointIndex.open(path)
    for layout in index.units:
        for r in layout.ranges:
            assert r.file_offset % ALIGN_BYTES == 0 and r.nbytes % ALIGN_BYTES == 0
            assert r.buffer_offset % ALIGN_BYTES == 0
    reference = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        reference.update(load_file(f))
    units, stats = _read_all(index)
    assert torch.equal(units[1]["q_proj"], reference["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(units[0]["embed"], reference["model.embed_tokens.weight"])
    lm_head = reference["model.embed_tokens.weight"] if index.spec.tie_word_embeddings else reference["lm_head.weight"]
    assert torch.equal(units[-1]["lm_head"], lm_head)
    assert stats.bytes_read == sum(u.buffer_bytes for u in index.units) or stats.bytes_read > 0
    if name == "sharded-fp32":
        assert len(index.files) > 1


def test_views_share_the_buffer(tiny_model):
    index = CheckpointIndex.open(tiny_model)
    layout = index.units[1]
    buf = aligned_empty(layout.buffer_bytes)
    views = unit_views(layout, buf)
    assert all(v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for v in views.values())


def test_refused_o_direct_falls_back_to_buffered_reads(tiny_model, monkeypatch):
    """Filesystems that refuse O_DIRECT (tmpfs on older kernels, some overlays) answer EINVAL
    at open; the reader then buffers that file and says so, unless direct_io='on'."""
    import errno
    import os

    from tierflow.errors import TransferError

    units, stats = _read_all(CheckpointIndex.open(tiny_model))
    assert set(stats.modes.values()) == {"direct"}
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    buffered_units, stats = _read_all(CheckpointIndex.open(tiny_model))
    assert set(stats.modes.values()) == {"buffered"}
    assert all(torch.equal(a[k], b[k]) for a, b in zip(units, buffered_units) for k in a)
    with pytest.raises(TransferError, match="O_DIRECT"):
        _read_all(CheckpointIndex.open(tiny_model), direct_io="on")
