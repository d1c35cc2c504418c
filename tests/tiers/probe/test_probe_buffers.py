"""The probe says what its disk figure was read into: the page layout of its buffers."""

from __future__ import annotations

import asyncio
import functools

import torch

from tierflow.tiers.probe import probe as probe_mod
from tierflow.tiers.probe.measure import measure_disk, ring_layout
from tierflow.tiers.probe.cache import ProbeCache
from tierflow.tiers.probe.probe import probe
from tierflow.tiers.io.staging import BufferLayout

from tierflow.adapters import adapter_for
from tierflow.tiers.plan.costmodel import costs_from_spec

MiB = 2**20
SMALL_DISK = dict(file_bytes=8 * MiB, seconds=0.2)
TINY_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
               "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": False}


def tiny_costs():
    adapter = adapter_for(TINY_CONFIG)
    return costs_from_spec(adapter.spec_from_config(TINY_CONFIG), adapter, "float32", name="tiny")


def test_measure_disk_reports_the_layout_of_its_buffers(tmp_path):
    figures = asyncio.run(measure_disk(tmp_path, chunk_bytes=4 * MiB, in_flight=2, **SMALL_DISK))
    b = figures.buffers
    assert b["buffers"] == 2 and b["block_bytes"] == 8 * MiB
    assert isinstance(b["layout"], str) and b["layout"]
    if b["source"] == "pagemap":
        assert 1 <= b["pieces_per_block"] <= 2048 and 0.0 <= b["huge_fraction"] <= 1.0


def test_ring_layout_reports_the_worst_buffer():
    good = BufferLayout(8 * MiB, 8 * MiB, 1.0, 4.0, 4, False, "pagemap")
    bad = BufferLayout(8 * MiB, 8 * MiB, 0.0, 300.0, 402, False, "pagemap")
    out = ring_layout([good, bad])
    assert out["layout"] == bad.describe() and out["pieces_per_block"] == 152.0 and out["huge_fraction"] == 0.5


def test_probe_provenance_carries_the_buffer_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(probe_mod, "measure_disk", functools.partial(measure_disk, **SMALL_DISK))
    _, provenance = asyncio.run(probe(torch.device("cpu"), torch.float32, tiny_costs(), tmp_path,
                                      cache=ProbeCache(tmp_path / "probe.json")))
    assert "layout" in provenance["disk"]["buffers"]
    _, again = asyncio.run(probe(torch.device("cpu"), torch.float32, tiny_costs(), tmp_path,
                                 cache=ProbeCache(tmp_path / "probe.json")))
    assert again["disk"]["source"] == "cache" and again["disk"]["buffers"] == provenance["disk"]["buffers"]
