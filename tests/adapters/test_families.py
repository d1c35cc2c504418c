"""Every dense family against transformers (fully in memory) on tiny random checkpoints:
logits of every prompt position and 32 greedy tokens, resident and with every decoder layer
streamed from disk, and with the KV cache in blocks on disk for the families whose attention
differs most (a sliding window; Gemma 2's soft-capping; Gemma 3's local rope)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.adapters import adapter_for, supported_architectures
from tierflow.errors import UnsupportedModelError
from tierflow.testing import build_random_checkpoint, oracle_greedy, oracle_logits, streaming_budget

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, tie_word_embeddings=False,
             initializer_range=0.2)
# name -> (family, builder kwargs). Windows of 8 tokens against a 40-token prompt, so the
# window decides what most queries see; Gemma 2's caps are small enough to bend its scores.
FAMILIES = {
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, initializer_range=0.2)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=32)),                       # head_dim != hidden / heads
    "mistral": ("mistral", dict(sliding_window=None)),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "gemma2": ("gemma2", dict(GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    "gemma3": ("gemma3_text", dict(GEMMA, layer_types=[SLIDING, SLIDING, FULL], rope_parameters={
        SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}})),
    "phi3-partial-window": ("phi3", dict(sliding_window=8, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # the 40-token prompt and its 32 greedy tokens stay within the original 80 positions
    "phi3-longrope": ("phi3", dict(max_position_embeddings=192, original_max_position_embeddings=80, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
        "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 11.0, 16.0]})),
}
PROMPT = [(i * 37) % 500 + 1 for i in range(40)]
NEW_TOKENS = 32
SMALL = dict(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=64, max_num_seqs=4)
HARDWARE = {"version": 1, "hardware": {"device": "cpu", "device_memory_bytes": 2**34, "host_memory_bytes": 2**34,
                                       "disk_read_gbps": 3.0, "decode_gbps": 20.0, "prefill_tflops": 0.1}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_random_checkpoint(root / name, family, seed=i, **kw)
            for i, (name, (family, kw)) in enumerate(FAMILIES.items())}


@pytest.fixture(scope="module")
def oracle(checkpoints):
    """transformers' logits and greedy tokens, computed once per (model, prompt)."""
    cache: dict[tuple[str, int], tuple[torch.Tensor, list[int]]] = {}

    def get(name: str, prompt: list[int] = PROMPT) -> tuple[torch.Tensor, list[int]]:
        key = (name, hash(tuple(prompt)))
        if key not in cache:
            path = checkpoints[name]
            cache[key] = oracle_logits(path, prompt), oracle_greedy(path, prompt, NEW_TOKENS)
        return cache[key]

    return get


def _relative_error(logits: torch.Tensor, expected: torch.Tensor) -> float:
    return ((logits - expected).abs().max() / expected.abs().max()).item()


async def _run(path, config, prompt=PROMPT):
    async with await Engine.open(path, config) as engine:
        logits = await engine.logits(prompt)
        out = await engine.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        return engine, logits, list(out.token_ids), engine.stats(), engine.pipeline_statistics()


@pytest.mark.parametrize("placement", ["resident", "streamed"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_matches_transformers(checkpoints, oracle, name, placement):
    path = checkpoints[name]
    config = EngineConfig(**SMALL)
    if placement == "streamed":
        config = EngineConfig(**SMALL, device_memory_bytes=streaming_budget(path, config))
    engine, logits, tokens, stats, _ = asyncio.run(_run(path, config))

    expected_logits, expected_tokens = oracle(name)
    assert _relative_error(logits, expected_logits) <= 1e-5
    assert tokens == expected_tokens
    assert len(set(tokens)) > 1           # the model does not just repeat one token
    if placement == "resident":
        assert set(engine.plan.tiers) == {"device"} and stats.bytes_streamed == 0
    else:
        assert set(engine.plan.tiers[1:-1]) == {"disk"}, engine.plan.tiers
        assert stats.bytes_streamed > 0


def test_longrope_prompt_past_the_original_length(checkpoints, oracle):
    """A 90-token prompt prefilled in one sweep is past longrope's original 80 positions from
    the start: the long factors apply to the whole sequence, as in transformers."""
    prompt = [(i * 11) % 500 + 3 for i in range(90)]
    config = EngineConfig(**(SMALL | dict(prefill_chunk_tokens=128)))
    _, logits, tokens, _, _ = asyncio.run(_run(checkpoints["phi3-longrope"], config, prompt))
    expected_logits, expected_tokens = oracle("phi3-longrope", prompt)
    assert _relative_error(logits, expected_logits) <= 1e-5
    assert tokens == expected_tokens


@pytest.mark.parametrize("prompt_tokens,chunk", [(70, 64), (90, 64)])
def test_longrope_sequence_crossing_the_original_length_fails_clearly(checkpoints, oracle, prompt_tokens, chunk):
    """Growing past the original 80 positions after a short-factor sweep (by decoding, or by a
    later prefill chunk) would need the whole sequence recomputed: that request fails with a
    named error, and the engine goes on serving."""
    prompt = [(i * 11) % 500 + 3 for i in range(prompt_tokens)]

    async def main():
        async with await Engine.open(checkpoints["phi3-longrope"], EngineConfig(**(SMALL | dict(
                prefill_chunk_tokens=chunk)))) as engine:
            with pytest.raises(UnsupportedModelError, match="original_max_position_embeddings=80"):
                await engine.generate(prompt, SamplingParams(max_new_tokens=16, ignore_eos=True))
            out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
            return list(out.token_ids)

    assert asyncio.run(main()) == oracle("phi3-longrope")[1]


@pytest.mark.parametrize("name,change", [
    ("qwen2-window", {"use_sliding_window": False, "layer_types": [FULL] * 3}),
    ("mistral-window", {"sliding_window": None}),
    ("phi3-partial-window", {"sliding_window": None}),
    ("gemma2", {"sliding_window": 4096}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma3", {"sliding_window": 4096}),
])
def test_the_tested_features_change_the_logits(checkpoints, oracle, tmp_path, name, change):
    """The window and the caps of these checkpoints are not no-ops: transformers' logits move
    by far more than the tolerance when one is switched off — so the comparisons above check them."""
    source = checkpoints[name]
    for item in source.iterdir():
        os.symlink(item, tmp_path / item.name)
    config = json.loads((source / "config.json").read_text()) | change
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _relative_error(oracle_logits(tmp_path, PROMPT), oracle(name)[0]) > 1e-3


@pytest.mark.parametrize("name", ["mistral-window", "gemma2", "gemma3"])
def test_kv_blocks_on_disk_match_transformers(checkpoints, oracle, tmp_path, name):
    """600 tokens: two full 256-token KV blocks per layer on disk plus the tail; decoding
    skips the blocks wholly outside the window and soft-caps what it sees."""
    prompt = [(i * 37) % 500 + 1 for i in range(600)]
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=1024, prefill_chunk_tokens=256,
                          profile=HARDWARE, kv_cache_dir=tmp_path, kv_device_bytes=0, kv_host_bytes=0)
    _, logits, tokens, _, stats = asyncio.run(_run(checkpoints[name], config, prompt))

    pools = stats.kv_blocks.by_tier()
    assert {tier for tier, pool in pools.items() if pool.capacity} == {"disk"}
    expected_logits, expected_tokens = oracle(name, prompt)
    assert _relative_error(logits, expected_logits) <= 1e-5
    assert tokens == expected_tokens


def test_every_family_is_registered():
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert arch in supported_architectures()
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM.*Phi3ForCausalLM"):
        adapter_for({"architectures": ["GPT2LMHeadModel"]})


def _config(checkpoints, name, **change):
    return json.loads((checkpoints[name] / "config.json").read_text()) | change


@pytest.mark.parametrize("name,change,message", [
    ("qwen2-tied", {"rope_parameters": {"rope_type": "proportional", "factor": 4.0, "rope_theta": 1e4}},
     "proportional"),
    ("qwen3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
    ("mistral", {"hidden_act": "gelu_new"}, "gelu_new"),
    ("gemma2", {"use_bidirectional_attention": True}, "bidirectional"),
    ("gemma3", {"use_bidirectional_attention": True}, "bidirectional"),
    ("gemma3", {"rope_parameters": {SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                    FULL: {"rope_type": "default", "rope_theta": 1e6}}}, "sliding layers"),
    ("gemma3", {"layer_types": [SLIDING, "chunked_attention", FULL]}, "chunked_attention"),
    ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 3,
                                           "long_factor": [1.0] * 8}}, "short_factor as a list of 8"),
    ("phi3-partial-window", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "dynamic"),
])
def test_unsupported_variants_are_named(checkpoints, name, change, message):
    config = _config(checkpoints, name, **change)
    with pytest.raises(UnsupportedModelError, match=message):
        adapter_for(config).spec_from_config(config)


def test_family_specs_read_their_configs(checkpoints):
    qwen2 = adapter_for(c := _config(checkpoints, "qwen2-window")).spec_from_config(c)
    assert [qwen2.window(i) for i in range(3)] == [None, 8, 8]          # max_window_layers=1
    gemma2 = adapter_for(c := _config(checkpoints, "gemma2")).spec_from_config(c)
    assert gemma2.attention_scale == pytest.approx(24 ** -0.5) and gemma2.attn_logit_softcap == 2.0
    assert [gemma2.window(i) for i in range(3)] == [8, None, 8] and gemma2.final_logit_softcap == 5.0
    gemma3 = adapter_for(c := _config(checkpoints, "gemma3")).spec_from_config(c)
    assert gemma3.rope_local_theta == 10000.0 and gemma3.rope_theta == 1e6
    assert dict(gemma3.rope_scaling or {})["rope_type"] == "linear"
    phi3 = adapter_for(c := _config(checkpoints, "phi3-partial-window")).spec_from_config(c)
    assert phi3.partial_rotary_factor == 0.5 and phi3.window(2) == 8


def test_older_config_keys_read_as_transformers_reads_them():
    """config.json files written before transformers 5 spell rope settings and layer patterns
    differently (rope_theta / rope_scaling / rope_local_base_freq / sliding_window_pattern);
    the spec agrees with what transformers derives from them."""
    from transformers import Gemma3TextConfig, Phi3Config

    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=512)
    gemma = dict(sizes, num_hidden_layers=6, head_dim=16, rope_theta=1e6, rope_local_base_freq=2e4,
                 rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=512, sliding_window_pattern=3)
    hf = Gemma3TextConfig(**gemma)
    spec = adapter_for(c := dict(gemma, architectures=["Gemma3ForCausalLM"])).spec_from_config(c)
    assert spec.layer_types == tuple(hf.layer_types) and spec.sliding_window == 512
    assert spec.rope_local_theta == hf.rope_parameters[SLIDING]["rope_theta"] == 2e4
    assert spec.rope_theta == hf.rope_parameters[FULL]["rope_theta"]
    assert dict(spec.rope_scaling or {})["factor"] == hf.rope_parameters[FULL]["factor"] == 8.0

    phi = dict(sizes, num_hidden_layers=2, rope_theta=1e4, partial_rotary_factor=0.5, max_position_embeddings=1024,
               original_max_position_embeddings=256,
               rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4})
    hf = Phi3Config(**phi)
    spec = adapter_for(c := dict(phi, architectures=["Phi3ForCausalLM"])).spec_from_config(c)
    assert spec.partial_rotary_factor == hf.rope_parameters["partial_rotary_factor"] == 0.5
    scaling = dict(spec.rope_scaling or {})
    assert scaling["rope_type"] == hf.rope_parameters["rope_type"] == "longrope"
    assert scaling["original_max_position_embeddings"] == hf.rope_parameters["original_max_position_embeddings"]
