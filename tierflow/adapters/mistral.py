"""Mistral: Llama's decoder where, when ``sliding_window`` is set, every layer sees only the
last ``sliding_window`` tokens (transformers' MistralForCausalLM ignores ``layer_types``)."""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import SLIDING_ATTENTION, ModelSpec
from tierflow.adapters.decoder import DecoderAdapter, DecoderStyle, decoder_name_rules
from tierflow.adapters.rope import ROPE_TYPES
from tierflow.adapters.spec import config_value, read_spec


class MistralAdapter(DecoderAdapter):
    architectures = ("MistralForCausalLM",)
    model_types = ("mistral",)
    style = DecoderStyle()
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        window = config_value(config, {"sliding_window": 4096}, "sliding_window")
        layers = int(config.get("num_hidden_layers", 0))
        sliding = {} if window is None else {"sliding_window": int(window),
                                             "layer_types": (SLIDING_ATTENTION,) * layers}
        return read_spec(config, "Mistral", rope_types=tuple(t for t in ROPE_TYPES if t != "longrope"),
                         architecture=self.architectures[0], attention_bias=False, mlp_bias=False,
                         hidden_act=config.get("hidden_act", "silu"), **sliding)
