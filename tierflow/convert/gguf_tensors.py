"""GGUF tensors → Hugging Face names, checked shapes, and a streamed safetensors file."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from tierflow.errors import CheckpointError, ShapeMismatchError, UnsupportedModelError

SUPPORTED_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "F32", torch.bfloat16: "BF16"}
_SAFETENSORS_HEADER_ALIGNMENT_BYTES = 8

# GGUF tensor names -> Hugging Face Llama parameter names.
_GLOBAL_TENSOR_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSOR_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ATTENTION_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output")
_MLP_PROJECTIONS = ("ffn_gate", "ffn_up", "ffn_down")


def unpermute_rotary_rows(weight: np.ndarray, head_count: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (weight or bias).

    llama.cpp stores, inside each head, row ``2*i`` = HF row ``i`` and row ``2*i + 1`` =
    HF row ``i + head_dim/2``. ``head_count`` is the number of query heads for
    ``attn_q`` and the number of key/value heads for ``attn_k``.
    """
    row_count = weight.shape[0]
    if head_count <= 0 or row_count % (2 * head_count) != 0:
        raise ShapeMismatchError(
            f"cannot undo the rotary permutation: {row_count} rows do not split into "
            f"{head_count} heads of an even head dimension; the GGUF head counts do not "
            "match its tensors, so the file is probably corrupt"
        )
    half_head_dim = row_count // head_count // 2
    per_pair = weight.reshape(head_count, half_head_dim, 2, *weight.shape[1:])
    return per_pair.swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class TensorPlan:
    """How one GGUF tensor becomes one safetensors entry."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]  # Hugging Face (row-major, outermost first) order
    rotary_head_count: int | None  # set for attn_q / attn_k: rows to un-permute
    tensor: ReaderTensor


def plan_tensors(reader: GGUFReader, config: dict[str, Any]) -> list[TensorPlan]:
    """Map every GGUF tensor to its HF name and check names and shapes against ``config``."""
    expected_shapes = _expected_hf_shapes(config)
    plans: list[TensorPlan] = []
    for tensor in reader.tensors:
        hf_name, rotary_head_count = _map_tensor_name(tensor.name, config)
        if hf_name not in expected_shapes:
            raise UnsupportedModelError(
                f"GGUF tensor {tensor.name!r} (-> {hf_name!r}) has no place in a LlamaForCausalLM "
                f"with {config['num_hidden_layers']} layers; the file is not a plain llama model"
            )
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if shape != expected_shapes[hf_name]:
            raise ShapeMismatchError(
                f"GGUF tensor {tensor.name!r} has shape {list(shape)} but the GGUF metadata implies "
                f"{list(expected_shapes[hf_name])} for {hf_name!r}; the file is inconsistent"
            )
        plans.append(TensorPlan(tensor.name, hf_name, shape, rotary_head_count, tensor))
    _check_all_present(plans, expected_shapes)
    return plans


def _map_tensor_name(gguf_name: str, config: dict[str, Any]) -> tuple[str, int | None]:
    stem, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise UnsupportedModelError(f"unexpected GGUF tensor name {gguf_name!r} (expected '*.weight' or '*.bias')")
    if stem in _GLOBAL_TENSOR_NAMES:
        return f"{_GLOBAL_TENSOR_NAMES[stem]}.{suffix}", None
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_TENSOR_NAMES:
        raise UnsupportedModelError(
            f"GGUF tensor {gguf_name!r} is not part of a llama model (expected token_embd, output_norm, "
            f"output or blk.N.{{{', '.join(_LAYER_TENSOR_NAMES)}}})"
        )
    _, layer_index, gguf_module = parts
    hf_name = f"model.layers.{int(layer_index)}.{_LAYER_TENSOR_NAMES[gguf_module]}.{suffix}"
    rotary_head_count = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }.get(gguf_module)
    return hf_name, rotary_head_count


def _expected_hf_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden = config["hidden_size"]
    intermediate = config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    layer_shapes: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    if config["attention_bias"]:
        layer_shapes |= {
            "self_attn.q_proj.bias": (q_rows,),
            "self_attn.k_proj.bias": (kv_rows,),
            "self_attn.v_proj.bias": (kv_rows,),
            "self_attn.o_proj.bias": (hidden,),
        }
    if config["mlp_bias"]:
        layer_shapes |= {
            "mlp.gate_proj.bias": (intermediate,),
            "mlp.up_proj.bias": (intermediate,),
            "mlp.down_proj.bias": (hidden,),
        }
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for layer_index in range(config["num_hidden_layers"]):
        for suffix, shape in layer_shapes.items():
            shapes[f"model.layers.{layer_index}.{suffix}"] = shape
    return shapes


def _check_all_present(plans: Sequence[TensorPlan], expected_shapes: dict[str, tuple[int, ...]]) -> None:
    seen: set[str] = set()
    for plan in plans:
        if plan.hf_name in seen:
            raise CheckpointError(f"the GGUF holds two tensors for {plan.hf_name!r}; the file is corrupt")
        seen.add(plan.hf_name)
    missing = sorted(set(expected_shapes) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"the GGUF lacks {len(missing)} tensor(s) a llama model needs: {shown}; the file is "
            "truncated or not a complete llama model"
        )


def write_safetensors(
    path: Path,
    plans: Sequence[TensorPlan],
    torch_dtype: torch.dtype,
    *,
    on_tensor_written: Callable[[], None] | None = None,
) -> None:
    """Write the planned tensors to a safetensors file, one tensor in memory at a time."""
    header_bytes = _safetensors_header(plans, torch_dtype)
    with path.open("wb") as sink:
        sink.write(header_bytes)
        for plan in plans:
            _write_tensor(sink, plan, torch_dtype)
            if on_tensor_written is not None:
                on_tensor_written()
        sink.flush()
        os.fsync(sink.fileno())


def _safetensors_header(plans: Sequence[TensorPlan], torch_dtype: torch.dtype) -> bytes:
    item_size_bytes = torch.empty((), dtype=torch_dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset_bytes = 0
    for plan in plans:
        size_bytes = math.prod(plan.shape) * item_size_bytes
        header[plan.hf_name] = {
            "dtype": _SAFETENSORS_DTYPE_NAMES[torch_dtype],
            "shape": list(plan.shape),
            "data_offsets": [offset_bytes, offset_bytes + size_bytes],
        }
        offset_bytes += size_bytes
    header_json = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_json += b" " * (-len(header_json) % _SAFETENSORS_HEADER_ALIGNMENT_BYTES)
    return struct.pack("<Q", len(header_json)) + header_json


def _write_tensor(sink: BinaryIO, plan: TensorPlan, torch_dtype: torch.dtype) -> None:
    values = dequantize_tensor(plan)
    tensor = torch.from_numpy(np.ascontiguousarray(values)).to(torch_dtype)
    if torch_dtype == torch.bfloat16:
        payload = tensor.view(torch.int16).numpy().tobytes()
    else:
        payload = tensor.numpy().tobytes()
    sink.write(payload)


def dequantize_tensor(plan: TensorPlan) -> np.ndarray:
    """Dequantise one GGUF tensor to float32 in HF layout (rotary permutation undone)."""
    tensor = plan.tensor
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise UnsupportedModelError(
            f"tensor {plan.gguf_name!r} uses quantisation {_quant_name(tensor.tensor_type)}, which "
            f"the installed gguf package cannot dequantise ({error}); upgrade gguf or re-quantise "
            "the model with a common type such as Q8_0"
        ) from error
    values = np.asarray(values, dtype=np.float32).reshape(plan.shape)
    if not values.flags.writeable:  # F32 tensors are read-only views of the memory-mapped file
        values = values.copy()
    if plan.rotary_head_count is not None:
        values = unpermute_rotary_rows(values, plan.rotary_head_count)
    return values


def _quant_name(tensor_type: GGMLQuantizationType | int) -> str:
    return getattr(tensor_type, "name", str(tensor_type))
