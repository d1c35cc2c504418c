"""Model families, keyed by the architecture name in config.json."""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import Adapter, ModelSpec, SweepContext, UnitWeights
from tierflow.adapters.gemma import Gemma2Adapter, Gemma3Adapter
from tierflow.adapters.llama import LlamaAdapter
from tierflow.adapters.mistral import MistralAdapter
from tierflow.adapters.moe import MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter
from tierflow.adapters.phi3 import Phi3Adapter
from tierflow.adapters.qwen import Qwen2Adapter, Qwen3Adapter
from tierflow.errors import UnsupportedModelError

FAMILIES: tuple[type, ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma2Adapter, Gemma3Adapter,
                              Phi3Adapter, MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter)
ADAPTERS: Mapping[str, type] = {arch: family for family in FAMILIES for arch in family.architectures}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(ADAPTERS))


def adapter_for(config: Mapping[str, Any]) -> Adapter:
    """The adapter for a config.json, or UnsupportedModelError naming the supported list."""
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in ADAPTERS:
            return ADAPTERS[arch]()
    found = archs or config.get("model_type") or "nothing (config.json has no 'architectures')"
    raise UnsupportedModelError(
        f"architecture {found!r} is not supported; supported architectures: "
        f"{', '.join(supported_architectures())}. Use a checkpoint of one of these families."
    )


__all__ = ["ADAPTERS", "Adapter", "ModelSpec", "SweepContext", "UnitWeights", "adapter_for",
           "supported_architectures"]
