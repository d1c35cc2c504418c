"""The contiguous store's sliding-window rings: a sliding layer holds its window plus one chunk,
whatever the context, and attention still sees every key of every query's window — checked
against a full copy of the keys for chunks of every size (a chunk longer than planned widens the
ring), after truncation, and end to end against transformers for a window narrower than the
prompt with small prefill chunks (Mistral: every layer slides; gpt-oss: alternating, with sinks)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.adapters.kv import first_visible
from tierflow.testing import build_random_checkpoint, oracle_greedy, oracle_logits
from tierflow.tiers.kv.contiguous import SequenceKV

WINDOW, CHUNK, HEADS, DIM = 8, 4, 2, 3


def _check_layer(kv: SequenceKV, layer: int, reference: torch.Tensor, start: int) -> None:
    """What attention gets for queries from ``start`` equals the reference keys it needs."""
    end = reference.shape[1]
    blocks = kv.blocks(layer, first_visible(start, WINDOW))
    covered = []
    for keys, values, first in blocks:
        assert torch.equal(keys, reference[:, first:first + keys.shape[1]])
        assert torch.equal(values, -reference[:, first:first + keys.shape[1]])
        covered += range(first, first + keys.shape[1])
    assert covered == sorted(covered) and covered[-1] == end - 1
    assert covered[0] <= first_visible(start, WINDOW)          # every key of the first query's window
    low = kv.held_from(layer)
    assert torch.equal(kv.read(layer, low, end)[0], reference[:, low:end])


def test_a_sliding_layer_holds_its_window_plus_a_chunk():
    rng = random.Random(0)
    kv = SequenceKV(2, HEADS, DIM, dtype=torch.float32, device=torch.device("cpu"), block_tokens=4,
                    windows=[WINDOW, None], max_chunk_tokens=CHUNK)
    reference = torch.empty(HEADS, 0, DIM)
    for step in range(60):
        n = 10 if step == 30 else rng.randint(1, CHUNK)          # one chunk longer than planned
        k = torch.randn(n, HEADS, DIM)
        start = reference.shape[1]
        reference = torch.cat((reference, k.transpose(0, 1)), dim=1)
        for layer in (0, 1):
            kv.append(layer, k, -k)
            _check_layer(kv, layer, reference, start)
        if step == 45:                                           # rejected tokens: back by up to a chunk
            kv.truncate(reference.shape[1] - 3)
            reference = reference[:, :-3]
    assert kv._keys[0].shape[1] <= 20                 # window - 1 + the longest chunk, in whole steps of 4
    assert kv._keys[1].shape[1] >= reference.shape[1]                   # a full-attention layer keeps all
    assert kv.held_from(0) > 0 and kv.held_from(1) == 0
    with pytest.raises(ValueError, match="are stored"):
        kv.read(0, 0, 4)


HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}
PROMPT = [(i * 37) % 500 + 1 for i in range(40)]


@pytest.mark.parametrize("family", ["mistral", "gpt_oss"])
def test_rings_match_transformers(tmp_path, family):
    extra = dict(head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}) if family == "gpt_oss" else {}
    path = build_random_checkpoint(tmp_path / family, family, sliding_window=WINDOW, **extra)
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=8,
                          profile=HARDWARE)

    async def main():
        async with await Engine.open(path, config) as engine:
            logits = await engine.logits(PROMPT)
            out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=24, ignore_eos=True))
            return logits, list(out.token_ids)

    logits, tokens = asyncio.run(main())
    expected = oracle_logits(path, PROMPT)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    assert tokens == oracle_greedy(path, PROMPT, 24)
