"""Qwen2 / Qwen2.5 and Qwen3: Llama's decoder with biases on the q/k/v projections (Qwen2) or
an RMSNorm of every query and key head before rotary (Qwen3).

Both may slide a window over the keys: with ``use_sliding_window`` set, the layers that
``layer_types`` marks "sliding_attention" (by default those from ``max_window_layers`` on)
see the last ``sliding_window`` tokens only, as in transformers.
"""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec
from tierflow.adapters.decoder import DecoderAdapter, DecoderStyle, decoder_name_rules
from tierflow.adapters.rope import ROPE_TYPES
from tierflow.adapters.spec import read_spec

_QWEN_ROPE_TYPES = tuple(t for t in ROPE_TYPES if t != "longrope")


def qwen_layers(config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The sliding-window fields of a Qwen config (none unless ``use_sliding_window``)."""
    window = config.get("sliding_window") if config.get("use_sliding_window", False) else None
    if window is None:
        return {}
    types = config.get("layer_types")
    if not types:
        first = int(config.get("max_window_layers", 28))
        types = [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(num_layers)]
    return {"sliding_window": int(window), "layer_types": tuple(types)}


class Qwen2Adapter(DecoderAdapter):
    architectures = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    style = DecoderStyle(qkv_bias=True)
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        # transformers' Qwen2 always has q/k/v biases and never an o_proj or MLP bias
        return read_spec(config, "Qwen2", rope_types=_QWEN_ROPE_TYPES, architecture=self.architectures[0],
                         attention_bias=False, mlp_bias=False,
                         hidden_act=config.get("hidden_act", "silu"),
                         **qwen_layers(config, int(config.get("num_hidden_layers", 0))))


class Qwen3Adapter(DecoderAdapter):
    architectures = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    style = DecoderStyle(qk_norm=True)
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        return read_spec(config, "Qwen3", {"head_dim": 128}, rope_types=_QWEN_ROPE_TYPES,
                         architecture=self.architectures[0], mlp_bias=False,
                         hidden_act=config.get("hidden_act", "silu"),
                         **qwen_layers(config, int(config.get("num_hidden_layers", 0))))
