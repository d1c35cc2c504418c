"""GGUF metadata → a Hugging Face ``LlamaForCausalLM`` config.json and generation config."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor

from tierflow.errors import CheckpointError, ShapeMismatchError, UnsupportedModelError

_SUPPORTED_ARCHITECTURE = "llama"


def build_llama_config(reader: GGUFReader, *, dtype: str) -> dict[str, Any]:
    """Build a ``LlamaForCausalLM`` ``config.json`` dict from the GGUF metadata."""
    architecture = _read_field(reader, "general.architecture", default=None)
    if architecture != _SUPPORTED_ARCHITECTURE:
        raise UnsupportedModelError(
            f"expected a GGUF with general.architecture = {_SUPPORTED_ARCHITECTURE!r}, found "
            f"{architecture!r}; only llama-architecture models can be converted"
        )
    _reject_unsupported_llama_variants(reader)

    hidden_size = int(_read_arch_field(reader, "embedding_length"))
    head_count = int(_read_arch_field(reader, "attention.head_count"))
    kv_head_count = int(_read_arch_field(reader, "attention.head_count_kv", default=head_count))
    head_dim = _head_dim(reader, hidden_size, head_count)
    tensor_names = {tensor.name for tensor in reader.tensors}
    embedding = _find_tensor(reader, "token_embd.weight")
    vocab_size = int(embedding.shape[-1])  # GGUF shapes list the fastest-varying dim first
    rope_theta = _shortest_float(_read_arch_field(reader, "rope.freq_base", default=10000.0))
    rope_parameters = _rope_parameters(reader, rope_theta)

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(_read_arch_field(reader, "feed_forward_length")),
        "num_hidden_layers": int(_read_arch_field(reader, "block_count")),
        "num_attention_heads": head_count,
        "num_key_value_heads": kv_head_count,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _shortest_float(_read_arch_field(reader, "attention.layer_norm_rms_epsilon", default=1e-5)),
        "rope_theta": rope_theta,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": int(_read_arch_field(reader, "context_length", default=2048)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": _read_token_id(reader, "bos"),
        "eos_token_id": _read_token_id(reader, "eos"),
        "pad_token_id": _read_token_id(reader, "padding"),
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if rope_parameters["rope_type"] != "default":
        config["rope_scaling"] = dict(rope_parameters, type=rope_parameters["rope_type"])
    declared_vocab_size = _read_arch_field(reader, "vocab_size", default=None)
    if declared_vocab_size is not None and int(declared_vocab_size) != vocab_size:
        raise ShapeMismatchError(
            f"the GGUF declares vocab_size {declared_vocab_size} but token_embd.weight has "
            f"{vocab_size} rows; the file is inconsistent, re-export it with llama.cpp"
        )
    return config


def build_generation_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """A ``generation_config.json`` dict; every end-of-generation token stops generation."""
    stop_token_ids = [
        token_id
        for token_id in (config["eos_token_id"], _read_token_id(reader, "eot"), _read_token_id(reader, "eom"))
        if token_id is not None
    ]
    unique_stop_token_ids = list(dict.fromkeys(stop_token_ids))
    generation_config: dict[str, Any] = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": unique_stop_token_ids[0] if len(unique_stop_token_ids) == 1 else unique_stop_token_ids,
    }
    if config["pad_token_id"] is not None:
        generation_config["pad_token_id"] = config["pad_token_id"]
    return generation_config


def _reject_unsupported_llama_variants(reader: GGUFReader) -> None:
    expert_count = int(_read_arch_field(reader, "expert_count", default=0) or 0)
    if expert_count > 0:
        raise UnsupportedModelError(
            f"this llama-architecture GGUF is a mixture of experts ({expert_count} experts, e.g. "
            "Mixtral); only dense llama models can be converted"
        )
    if any(tensor.name == "rope_freqs.weight" for tensor in reader.tensors):
        raise UnsupportedModelError(
            "this GGUF carries a rope_freqs.weight tensor (Llama 3.1-style RoPE scaling), which "
            "cannot be expressed faithfully in config.json; convert the original Hugging Face "
            "checkpoint instead"
        )


def _head_dim(reader: GGUFReader, hidden_size: int, head_count: int) -> int:
    key_length = _read_arch_field(reader, "attention.key_length", default=None)
    value_length = _read_arch_field(reader, "attention.value_length", default=None)
    rope_dimension_count = _read_arch_field(reader, "rope.dimension_count", default=None)
    head_dim = int(key_length or rope_dimension_count or hidden_size // head_count)
    if value_length is not None and int(value_length) != head_dim:
        raise UnsupportedModelError(
            f"key head size {head_dim} differs from value head size {value_length}; "
            "LlamaForCausalLM needs them equal"
        )
    if rope_dimension_count is not None and int(rope_dimension_count) != head_dim:
        raise UnsupportedModelError(
            f"RoPE covers {rope_dimension_count} of {head_dim} head dimensions (partial rotary); "
            "LlamaForCausalLM rotates the full head"
        )
    return head_dim


def _rope_parameters(reader: GGUFReader, rope_theta: float) -> dict[str, Any]:
    scaling_type = _read_arch_field(reader, "rope.scaling.type", default="none") or "none"
    if scaling_type == "none":
        return {"rope_type": "default", "rope_theta": rope_theta}
    if scaling_type == "linear":
        factor = _shortest_float(_read_arch_field(reader, "rope.scaling.factor"))
        return {"rope_type": "linear", "rope_theta": rope_theta, "factor": factor}
    raise UnsupportedModelError(
        f"RoPE scaling type {scaling_type!r} is not supported (expected 'none' or 'linear'); "
        "convert the original Hugging Face checkpoint instead"
    )


def _shortest_float(value: float) -> float:
    """GGUF stores floats as float32: write ``1e-05``, not ``9.999999747378752e-06``."""
    return float(str(np.float32(value)))


def _read_token_id(reader: GGUFReader, kind: str) -> int | None:
    value = _read_field(reader, f"tokenizer.ggml.{kind}_token_id", default=None)
    return None if value is None else int(value)


def _open_gguf(gguf_path: Path) -> GGUFReader:
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, struct.error, IndexError, KeyError) as error:
        raise CheckpointError(
            f"{gguf_path} is not a readable GGUF file ({error}); pass a .gguf file written by llama.cpp"
        ) from error
    except OSError as error:
        raise CheckpointError(f"cannot read GGUF file {gguf_path}: {error}") from error
    if reader.byte_order != "I":
        raise UnsupportedModelError(
            f"{gguf_path} is a byte-swapped (big-endian) GGUF; convert it to little-endian with "
            "gguf's gguf_convert_endian script first"
        )
    return reader


_MISSING = object()


def _read_field(reader: GGUFReader, key: str, *, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"the GGUF metadata lacks the required key {key!r}; the file is incomplete")
        return default
    return field.contents()


def _read_arch_field(reader: GGUFReader, key: str, *, default: Any = _MISSING) -> Any:
    return _read_field(reader, f"{_SUPPORTED_ARCHITECTURE}.{key}", default=default)


def _find_tensor(reader: GGUFReader, name: str) -> ReaderTensor:
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    raise CheckpointError(f"the GGUF has no {name!r} tensor; it is not a complete llama model")
