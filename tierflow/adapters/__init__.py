"""Model families, keyed by the architecture name in config.json."""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import Adapter, ModelSpec, SweepContext, UnitWeights
from tierflow.adapters.llama import LlamaAdapter
from tierflow.errors import UnsupportedModelError

ADAPTERS: Mapping[str, type] = {arch: LlamaAdapter for arch in LlamaAdapter.architectures}


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
