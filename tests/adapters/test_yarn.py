"""YaRN rope against transformers: the inverse frequencies and the attention factor of
``ROPE_INIT_FUNCTIONS["yarn"]`` bit for bit on real configs' rope settings (Qwen, Qwen-MoE,
Llama, Mistral, Gemma 2 / 3 configs), and tiny random Qwen2 / Qwen3 / Gemma 3 checkpoints with
yarn rope through the Engine (logits and greedy tokens) at positions well past
``original_max_position_embeddings``."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams
from tierflow.adapters import model_from_config
from tierflow.adapters.rope import attention_factor, rope_inv_freq
from tierflow.errors import CheckpointError, UnsupportedModelError
from tierflow.testing import build_random_checkpoint, oracle_greedy, oracle_logits

SLIDING, FULL = "sliding_attention", "full_attention"
SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=128, vocab_size=512)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
# name -> (family, the config.json keys beside SIZES)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt-oss": ("qwen2", dict(head_dim=64, max_position_embeddings=131072, rope_parameters=GPT_OSS_ROPE)),
    # Qwen2.5's advice for long contexts, in the older rope_scaling spelling (no truncate: true)
    "qwen2.5": ("qwen2", dict(head_dim=128, max_position_embeddings=32768, rope_theta=1e6, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})),
    "mscale": ("llama", dict(head_dim=64, max_position_embeddings=163840, rope_parameters={
        "rope_type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 32, "beta_slow": 1,
        "original_max_position_embeddings": 4096, "rope_theta": 10000.0})),
    "attention-factor": ("qwen3", dict(head_dim=32, max_position_embeddings=8192, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "attention_factor": 0.75, "beta_fast": 8, "beta_slow": 0.5,
        "original_max_position_embeddings": 1024, "rope_theta": 500000.0})),
    # transformers takes a top-level original_max_position_embeddings over the rope object's
    "top-level-original": ("mistral", dict(max_position_embeddings=4096, original_max_position_embeddings=256,
                                           rope_scaling={"type": "yarn", "factor": 16.0,
                                                         "original_max_position_embeddings": 1024})),
    # without either, the original length is max_position_embeddings; a null truncate does not truncate
    "no-original": ("qwen2", dict(max_position_embeddings=2048, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "truncate": None, "rope_theta": 10000.0})),
    "qwen2-moe": ("qwen2_moe", dict(MOE, shared_expert_intermediate_size=64, max_position_embeddings=131072,
                                    rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 32768})),
    "qwen3-moe": ("qwen3_moe", dict(MOE, head_dim=128, max_position_embeddings=131072, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 1e6})),
    "gemma2": ("gemma2", dict(head_dim=16, max_position_embeddings=8192, original_max_position_embeddings=512,
                              rope_parameters={"rope_type": "yarn", "factor": 16.0, "beta_fast": 16,
                                               "truncate": False, "rope_theta": 10000.0})),
    # Gemma 3: one rope object per layer type; yarn on the full-attention layers
    "gemma3": ("gemma3_text", dict(head_dim=32, max_position_embeddings=32768, layer_types=[SLIDING, FULL],
                                   rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                                    FULL: {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6,
                                                           "original_max_position_embeddings": 4096}})),
    # the older spelling, which transformers nests too: the top-level original length is not used
    "gemma3-older": ("gemma3_text", dict(head_dim=32, max_position_embeddings=32768, sliding_window_pattern=2,
                                         original_max_position_embeddings=1024, rope_theta=1e6,
                                         rope_local_base_freq=1e4, rope_scaling={"rope_type": "yarn", "factor": 4.0})),
}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
CONFIG_CLASSES = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "llama": "LlamaConfig",
                  "mistral": "MistralConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
                  "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}


def _config_json(name: str) -> dict[str, Any]:
    family, keys = CONFIGS[name]
    return dict(SIZES, architectures=[ARCHITECTURES[family]], model_type=family, **json.loads(json.dumps(keys)))


def _transformers_yarn(name: str) -> tuple[torch.Tensor, float]:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if name == "gpt-oss":
        config = transformers.GptOssConfig()            # the family's own defaults are gpt-oss's rope
        assert config.rope_parameters == GPT_OSS_ROPE and config.head_dim == 64
    else:
        config = getattr(transformers, CONFIG_CLASSES[CONFIGS[name][0]]).from_dict(_config_json(name))
    if name.startswith("gemma3"):
        return ROPE_INIT_FUNCTIONS["yarn"](config, layer_type=FULL)
    return ROPE_INIT_FUNCTIONS["yarn"](config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inverse_frequencies_and_attention_factor_equal_transformers(name):
    """Bit for bit: tierflow does transformers' float32 operations in the same order."""
    _, spec = model_from_config(_config_json(name))
    expected_inv_freq, expected_factor = _transformers_yarn(name)
    inv_freq = rope_inv_freq(spec)
    assert inv_freq.dtype == expected_inv_freq.dtype == torch.float32
    assert torch.equal(inv_freq, expected_inv_freq)
    assert attention_factor(spec) == expected_factor
    # and yarn is not a no-op on these configs: some frequencies are divided by the factor
    theta, dim = spec.rope_theta, inv_freq.shape[0] * 2
    plain = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    assert not torch.equal(inv_freq, plain) and torch.equal(inv_freq[0], plain[0])


def test_the_settings_change_the_frequencies():
    """truncate, beta_fast / beta_slow, mscale and the original length each move the result,
    so the cases above check them."""
    base = _config_json("gpt-oss")

    def result(**change: Any) -> tuple[torch.Tensor, float]:
        config = dict(base, rope_parameters=dict(GPT_OSS_ROPE, **change))
        _, spec = model_from_config(config)
        return rope_inv_freq(spec), attention_factor(spec)

    inv_freq, factor = result()
    for change in ({"truncate": True}, {"beta_fast": 16.0}, {"beta_slow": 2.0},
                   {"original_max_position_embeddings": 2048}):
        assert not torch.equal(result(**change)[0], inv_freq), change
    assert result(mscale=1.0, mscale_all_dim=0.5)[1] != factor and result(mscale=1.0)[1] == factor


# Tiny checkpoints whose original length (16) the 40-token prompt and its 32 tokens pass far beyond.
CHECKPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("qwen2", dict(tie_word_embeddings=True, initializer_range=0.2, rope_scaling={
        "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16})),
    "qwen3": ("qwen3", dict(head_dim=32, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 0.5, "truncate": False, "mscale": 1.0,
        "mscale_all_dim": 0.5, "original_max_position_embeddings": 16, "rope_theta": 100.0})),
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8, initializer_range=0.2,
                                   tie_word_embeddings=False, layer_types=[SLIDING, FULL], rope_parameters={
                                       SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                       FULL: {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1000.0,
                                              "original_max_position_embeddings": 16}})),
}
PROMPT = [(i * 37) % 500 + 1 for i in range(40)]
NEW_TOKENS = 32
SMALL = dict(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=64, max_num_seqs=4)


def _as_rope_scaling(path: Path) -> None:
    """Rewrite config.json in the pre-transformers-5 spelling: rope_theta and rope_scaling
    {"type": "yarn", ...}, as Qwen2.5's files have it."""
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_type"} | {"type": "yarn"}
    (path / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("yarn")
    paths = {name: build_random_checkpoint(root / name, family, seed=i, num_layers=2, max_position_embeddings=128,
                                           **kw)
             for i, (name, (family, kw)) in enumerate(CHECKPOINTS.items())}
    _as_rope_scaling(paths["qwen2"])
    return paths


async def _run(path: Path) -> tuple[torch.Tensor, list[int]]:
    async with await Engine.open(path, EngineConfig(**SMALL)) as engine:
        logits = await engine.logits(PROMPT)
        out = await engine.generate(PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        return logits, list(out.token_ids)


def _relative_error(logits: torch.Tensor, expected: torch.Tensor) -> float:
    return ((logits - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_engine_matches_transformers_past_the_original_length(checkpoints, tmp_path, name):
    path = checkpoints[name]
    config = json.loads((path / "config.json").read_text())
    rope = config.get("rope_scaling") or config["rope_parameters"]
    assert (rope.get(FULL) or rope)["original_max_position_embeddings"] == 16 < len(PROMPT)
    logits, tokens = asyncio.run(_run(path))

    expected = oracle_logits(path, PROMPT)
    assert _relative_error(logits, expected) <= 1e-5
    assert tokens == oracle_greedy(path, PROMPT, NEW_TOKENS)
    assert len(set(tokens)) > 1

    # the same weights with plain rope give other logits: the comparison above checks yarn
    for item in path.iterdir():
        if item.name != "config.json":
            os.symlink(item, tmp_path / item.name)
    (tmp_path / "config.json").write_text(json.dumps(_plain_rope(config)))
    assert _relative_error(oracle_logits(tmp_path, PROMPT), expected) > 1e-3


def _plain_rope(config: dict[str, Any]) -> dict[str, Any]:
    """config.json with its yarn rope object made plain rope of the same base."""
    config = json.loads(json.dumps(config))
    if "rope_scaling" in config:
        del config["rope_scaling"]
        return config
    nested = FULL in config["rope_parameters"]
    rope = config["rope_parameters"][FULL] if nested else config["rope_parameters"]
    plain = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    config["rope_parameters"] = dict(config["rope_parameters"], **{FULL: plain}) if nested else plain
    return config


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "original_max_position_embeddings": 16, "rope_theta": 1e4},
    {"rope_type": "yarn", "factor": None, "rope_theta": 1e4},
])
def test_yarn_without_a_factor_is_a_checkpoint_error(rope):
    config = dict(_config_json("no-original"), rope_parameters=rope)
    with pytest.raises(CheckpointError, match=r"rope_parameters of rope type 'yarn' lacks \['factor'\]"):
        model_from_config(config)


@pytest.mark.parametrize("key,value", [("truncate", "no"), ("beta_fast", -1), ("mscale", "1"),
                                       ("mscale_all_dim", [1.0]), ("beta_slow", True)])
def test_yarn_settings_of_the_wrong_type_are_named(key, value):
    config = dict(_config_json("gpt-oss"), rope_parameters=dict(GPT_OSS_ROPE, **{key: value}))
    with pytest.raises(CheckpointError, match=f"rope_parameters.{key} must be"):
        model_from_config(config)


@pytest.mark.parametrize("truncate", [False, None])
def test_gemma3_yarn_that_transformers_would_truncate_anyway_is_refused(truncate):
    """transformers' Gemma 3 reads truncate from the outer, per-layer-type object: it always
    truncates, whatever the full-attention object says."""
    config = _config_json("gemma3")
    config["rope_parameters"][FULL]["truncate"] = truncate
    with pytest.raises(UnsupportedModelError, match=f"yarn rope with truncate {truncate!r}"):
        model_from_config(config)
