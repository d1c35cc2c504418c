"""Llama family: Llama 2 / 3 / 3.1 / 3.2 (rope_scaling "llama3", "linear" and "yarn"), SmolLM2,
tied or untied embeddings, GQA or MHA, optional attention / MLP biases.

Llama is the plain case of the shared decoder (``decoder.DecoderStyle()`` with no options);
this module only reads its config.json.
"""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.attention import attend
from tierflow.adapters.base import ModelSpec
from tierflow.adapters.decoder import DecoderAdapter, DecoderStyle, decoder_name_rules, rms_norm, rotate_half
from tierflow.adapters.rope import rope_inv_freq
from tierflow.adapters.spec import read_spec
from tierflow.errors import UnsupportedModelError

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class LlamaAdapter(DecoderAdapter):
    architectures = ("LlamaForCausalLM",)
    model_types = ("llama",)
    style = DecoderStyle()
    name_rules = decoder_name_rules(style)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {config['hidden_act']!r} is not supported; Llama uses 'silu'")
        return read_spec(config, "Llama", rope_types=_ROPE_TYPES, architecture=self.architectures[0])


__all__ = ["LlamaAdapter", "attend", "rms_norm", "rope_inv_freq", "rotate_half"]
