"""Model families, keyed by the architecture name in config.json.

``model_from_config`` is the one way from a parsed config.json to a family and a ModelSpec:
it checks the types of the keys the families read (``spec.check_config``), picks the family
by ``architectures`` (or, where config.json lists none, by a ``model_type`` that names exactly
one family, as transformers' Auto classes do), and reads the spec; every problem is a
``CheckpointError`` (``UnsupportedModelError`` for what no family runs) naming the file.
"""

from __future__ import annotations

from typing import Any, Mapping

from tierflow.adapters.base import Adapter, ModelSpec, SweepContext, UnitWeights
from tierflow.adapters.gemma import Gemma2Adapter, Gemma3Adapter
from tierflow.adapters.gpt_oss import GptOssAdapter
from tierflow.adapters.llama import LlamaAdapter
from tierflow.adapters.mistral import MistralAdapter
from tierflow.adapters.moe import MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter
from tierflow.adapters.phi3 import Phi3Adapter
from tierflow.adapters.qwen import Qwen2Adapter, Qwen3Adapter
from tierflow.adapters.qwen3_next import Qwen3NextAdapter
from tierflow.adapters.spec import check_config
from tierflow.errors import CheckpointError, UnsupportedModelError

FAMILIES: tuple[type, ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma2Adapter, Gemma3Adapter,
                              Phi3Adapter, MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter, GptOssAdapter,
                              Qwen3NextAdapter)
ADAPTERS: Mapping[str, type] = {arch: family for family in FAMILIES for arch in family.architectures}
# model_type → family, for the model types that name exactly one family
MODEL_TYPES: Mapping[str, type] = {
    kind: family for family in FAMILIES for kind in family.model_types
    if [f for f in FAMILIES if kind in f.model_types] == [family]}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(ADAPTERS))


def adapter_for(config: Mapping[str, Any], source: str = "config.json") -> Adapter:
    """The adapter for a config.json (``source``: its path, for messages): by the first
    supported name in ``architectures``; where that list is absent or empty, by
    ``model_type``; else UnsupportedModelError naming the supported architectures."""
    archs = config.get("architectures") or []
    for arch in archs:
        if isinstance(arch, str) and arch in ADAPTERS:
            return ADAPTERS[arch]()
    kind = config.get("model_type")
    if not archs and isinstance(kind, str) and kind in MODEL_TYPES:
        return MODEL_TYPES[kind]()
    supported = ", ".join(supported_architectures())
    if archs:
        raise UnsupportedModelError(
            f"{source}: architecture {archs!r} is not supported; supported architectures: {supported}. "
            "Use a checkpoint of one of these families.")
    found = f"its model_type is {kind!r}, which names no supported family" if kind is not None else \
        "it has no model_type either"
    raise UnsupportedModelError(
        f"{source} lists no 'architectures' and {found}; supported architectures: {supported}. If the checkpoint "
        'is one of these, add its class to config.json, e.g. "architectures": ["LlamaForCausalLM"].')


def model_from_config(config: Mapping[str, Any], source: str = "config.json") -> tuple[Adapter, ModelSpec]:
    """The family and the ModelSpec of a parsed config.json (``source``: its path). Raises
    ``CheckpointError`` (or its subclass ``UnsupportedModelError``) naming ``source``."""
    check_config(config, source)
    adapter = adapter_for(config, source)
    try:
        return adapter, adapter.spec_from_config(config)
    except CheckpointError as exc:
        if source in str(exc):
            raise
        raise type(exc)(f"{source}: {exc}", settings=exc.settings) from exc


__all__ = ["ADAPTERS", "MODEL_TYPES", "Adapter", "ModelSpec", "SweepContext", "UnitWeights", "adapter_for",
           "model_from_config", "supported_architectures"]
