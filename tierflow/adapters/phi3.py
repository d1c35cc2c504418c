"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share ``Phi3ForCausalLM``): Llama's decoder with one
fused ``qkv_proj`` (rows q, k, v) and one fused ``gate_up_proj`` (rows gate, up), rotary on
the first ``partial_rotary_factor`` of each head, an optional sliding window over every
layer, and "longrope" scaling (``su`` and ``yarn`` in Phi-3 configs mean longrope, as in
transformers; see ``rope`` for when the long factors apply).
"""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import SLIDING_ATTENTION, ModelSpec
from tierflow.adapters.decoder import DecoderAdapter, DecoderStyle, decoder_name_rules
from tierflow.adapters.rope import check_rope, rope_config, rope_kind
from tierflow.adapters.spec import config_value, read_spec
from tierflow.errors import UnsupportedModelError

_DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
             "sliding_window": None}


def _longrope(config: Mapping[str, Any], scaling: Mapping[str, Any], rotary_dims: int) -> dict[str, Any]:
    original = (config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                or _DEFAULTS["original_max_position_embeddings"])
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or len(factors) != rotary_dims // 2:
            found = len(factors) if isinstance(factors, list) else factors
            raise UnsupportedModelError(f"Phi-3 longrope needs {key} as a list of {rotary_dims // 2} numbers "
                                        f"(half the rotary dims), found {found!r}")
    return {**scaling, "rope_type": "longrope", "original_max_position_embeddings": int(original)}


class Phi3Adapter(DecoderAdapter):
    architectures = ("Phi3ForCausalLM",)
    model_types = ("phi3",)
    style = DecoderStyle(fused_qkv=True, fused_gate_up=True)
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        theta, scaling = rope_config(config)
        params = config.get("rope_parameters") or {}
        partial = float(params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
        if rope_kind(scaling) in ("su", "yarn", "longrope"):
            heads = int(config.get("num_attention_heads", 1))
            head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
            scaling = _longrope(config, scaling or {}, int(head_dim * partial))
        check_rope(rope_kind(scaling))
        window = config_value(config, _DEFAULTS, "sliding_window")
        layers = int(config.get("num_hidden_layers", 0))
        sliding = {} if window is None else {"sliding_window": int(window),
                                             "layer_types": (SLIDING_ATTENTION,) * layers}
        return read_spec(config, "Phi-3", _DEFAULTS, architecture=self.architectures[0], rope=(theta, scaling),
                         partial_rotary_factor=partial, attention_bias=False, mlp_bias=False,
                         hidden_act=config.get("hidden_act", "silu"), **sliding)
