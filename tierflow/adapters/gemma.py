"""Gemma 2 and Gemma 3 (text): the shared decoder with Gemma's differences switched on.

* embeddings times sqrt(hidden_size), the scale rounded to the activation dtype first;
* RMSNorm scaling by (1 + weight) in float32, and a norm after attention and on both sides
  of the MLP (``sandwich_norms``); a gelu (tanh approximation) gated MLP;
* the softmax scale is ``query_pre_attn_scalar ** -0.5``, not ``head_dim ** -0.5``;
* layers alternate between a sliding window and full attention (``layer_types``);
* Gemma 2 soft-caps attention scores and the final logits (cap * tanh(x / cap));
* Gemma 3 norms each query and key head before rotary, gives sliding layers their own rope
  base (``rope_local_base_freq``, or ``rope_parameters["sliding_attention"]``) and scales the
  rope of full-attention layers (e.g. "linear", "yarn"). Its rope parameters are one object per
  layer type, and transformers' yarn reads ``truncate`` from the outer object, which never holds
  it: it always truncates, so a Gemma 3 yarn whose ``truncate`` is not true is refused (tierflow
  would honour it and differ). Like transformers' Gemma3ForCausalLM, it
  applies no attention soft-cap (``attn_logit_softcapping`` is not used by Gemma 3) but does
  apply ``final_logit_softcapping`` when set.

Bidirectional attention (``use_bidirectional_attention``, embedding models) is rejected.
"""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import FULL_ATTENTION, SLIDING_ATTENTION, ModelSpec
from tierflow.adapters.decoder import DecoderAdapter, DecoderStyle, decoder_name_rules
from tierflow.adapters.rope import check_rope, rope_config, rope_kind
from tierflow.adapters.spec import config_value, read_spec
from tierflow.errors import UnsupportedModelError

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_GEMMA2 = {"head_dim": 256, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
           "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "max_position_embeddings": 8192}
_GEMMA3 = {"head_dim": 256, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
           "final_logit_softcapping": None, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0,
           "rope_local_base_freq": 10_000.0}


def _layer_types(config: Mapping[str, Any], pattern: int) -> tuple[str, ...]:
    """``layer_types``, or transformers' default: every ``pattern``-th layer full, the rest sliding."""
    types = config.get("layer_types")
    if types:
        return tuple(types)
    layers = int(config.get("num_hidden_layers", 0))
    return tuple(SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(layers))


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def _gemma_features(config: Mapping[str, Any], defaults: Mapping[str, Any], family: str,
                    pattern: int) -> dict[str, Any]:
    if config.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{family} with use_bidirectional_attention (an embedding model) is not "
                                    "supported; tierflow runs causal language models")
    window = config_value(config, defaults, "sliding_window")
    return dict(sliding_window=None if window is None else int(window), layer_types=_layer_types(config, pattern),
                attention_scale=float(config_value(config, defaults, "query_pre_attn_scalar")) ** -0.5,
                final_logit_softcap=_optional(config_value(config, defaults, "final_logit_softcapping")),
                hidden_act=config.get("hidden_activation") or "gelu_pytorch_tanh", mlp_bias=False)


class Gemma2Adapter(DecoderAdapter):
    architectures = ("Gemma2ForCausalLM",)
    model_types = ("gemma2",)
    style = DecoderStyle(sandwich_norms=True, offset_norm=True, scaled_embedding=True)
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        features = _gemma_features(config, _GEMMA2, "Gemma 2", pattern=2)
        softcap = _optional(config_value(config, _GEMMA2, "attn_logit_softcapping"))
        return read_spec(config, "Gemma 2", _GEMMA2, rope_types=_ROPE_TYPES, architecture=self.architectures[0],
                         attn_logit_softcap=softcap, **features)


class Gemma3Adapter(DecoderAdapter):
    architectures = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    style = DecoderStyle(qk_norm=True, sandwich_norms=True, offset_norm=True, scaled_embedding=True)
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        features = _gemma_features(config, _GEMMA3, "Gemma 3", pattern=int(config.get("sliding_window_pattern", 6)))
        params = config.get("rope_parameters")
        if isinstance(params, Mapping) and FULL_ATTENTION in params:      # transformers >= 5: one entry per layer type
            rope = rope_config(config, params.get(FULL_ATTENTION) or {}, default_theta=_GEMMA3["rope_theta"])
            local = params.get(SLIDING_ATTENTION) or {}
            local_theta = float(local.get("rope_theta") or _GEMMA3["rope_local_base_freq"])
            if rope_kind(local) != "default":
                raise UnsupportedModelError(f"Gemma 3: rope scaling {rope_kind(local)!r} of the sliding layers is "
                                            "not supported; only their base frequency may differ")
        else:
            # transformers nests these per layer type too: a top-level original length is not the rope's
            outer = {k: v for k, v in config.items() if k != "original_max_position_embeddings"}
            rope = rope_config(outer, default_theta=_GEMMA3["rope_theta"])
            local_theta = float(config.get("rope_local_base_freq") or _GEMMA3["rope_local_base_freq"])
        check_rope(rope_kind(rope[1]), _ROPE_TYPES)
        if rope_kind(rope[1]) == "yarn" and (rope[1] or {}).get("truncate", True) is not True:
            raise UnsupportedModelError(f"Gemma 3: yarn rope with truncate {(rope[1] or {})['truncate']!r} is not "
                                        "supported: transformers' Gemma 3 ignores truncate and always truncates; "
                                        "remove the key to run the model as transformers does")
        return read_spec(config, "Gemma 3", _GEMMA3, rope_types=_ROPE_TYPES, architecture=self.architectures[0],
                         rope=rope, rope_local_theta=local_theta, **features)
