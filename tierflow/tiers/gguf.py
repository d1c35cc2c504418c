"""Convert a llama-architecture GGUF file into a Hugging Face checkpoint directory.

tierflow streams layer weights from Hugging Face style checkpoints (``config.json`` +
``model.safetensors`` + tokenizer files). Small models are often distributed only as
llama.cpp GGUF files, so this module turns such a file into that layout once, up front.

Design
------
* **Plan before writing.** The GGUF metadata is turned into a ``LlamaForCausalLM``
  ``config.json`` and every tensor is mapped to its Hugging Face name and checked
  against the shape that config implies *before* a single byte is written, so a
  malformed or unsupported file fails fast with a precise message.
* **Streaming weights.** Every tensor's size is known from the plan, so the safetensors
  header is written first and each tensor is then dequantised (``gguf.quants.dequantize``),
  fixed up, converted to the target dtype and appended one at a time. Peak memory is
  one dequantised tensor, not the whole model.
* **Rotary permutation.** llama.cpp's ``convert_hf_to_gguf.py`` reorders the rows of
  ``attn_q`` / ``attn_k`` within every head from the Hugging Face "rotate half" layout
  (``[x0..x(d/2-1), y0..y(d/2-1)]``) to GGML's interleaved pairs (``[x0, y0, x1, y1, ...]``).
  :func:`unpermute_rotary_rows` undoes that; for ``attn_k`` the head count used is the
  number of *key/value* heads, exactly like llama.cpp's ``permute(w, n_head, n_head_kv)``
  and transformers' ``LlamaTensorProcessor``.
* **Tokenizer.** transformers already knows how to rebuild a fast tokenizer (and the
  chat template) from GGUF metadata, so it is used as is and saved next to the weights.
* **Atomic, idempotent output.** Everything is written into a hidden temporary sibling
  of ``out_dir`` that is renamed into place at the end; on any failure it is removed.
  The last file written is a marker (:data:`MARKER_FILENAME`) recording the source
  path, size, mtime and dtype; a later call with the same source and dtype returns at
  once. A stale tierflow conversion (the GGUF changed, or another dtype) is replaced;
  a directory that tierflow did not write is never touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from tierflow.errors import (
    CheckpointError,
    ConfigError,
    ShapeMismatchError,
    UnsupportedModelError,
)

__all__ = ["MARKER_FILENAME", "SUPPORTED_DTYPES", "convert_gguf", "unpermute_rotary_rows"]

logger = logging.getLogger(__name__)

MARKER_FILENAME = "tierflow-conversion.json"
WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
GENERATION_CONFIG_FILENAME = "generation_config.json"
_MARKER_FORMAT_VERSION = 1
_SUPPORTED_ARCHITECTURE = "llama"

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


# --------------------------------------------------------------------------- public API


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Convert the llama-architecture GGUF file ``gguf_path`` into a HF checkpoint in ``out_dir``.

    ``out_dir`` receives ``model.safetensors`` (weights in ``dtype``, ``"float32"`` or
    ``"bfloat16"``), ``config.json`` (``LlamaForCausalLM``), ``generation_config.json``,
    the fast tokenizer files with the chat template, and the marker
    :data:`MARKER_FILENAME`. If ``out_dir`` already holds a complete conversion of the
    same file in the same dtype, it is returned immediately. ``progress`` shows a
    transient progress bar on stderr.

    Returns ``out_dir``. Raises :class:`~tierflow.errors.CheckpointError` (or its
    subclasses :class:`~tierflow.errors.UnsupportedModelError` and
    :class:`~tierflow.errors.ShapeMismatchError`) when the file cannot be converted, and
    :class:`~tierflow.errors.ConfigError` for an unknown ``dtype``.
    """
    torch_dtype = _resolve_dtype(dtype)
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    fingerprint = _source_fingerprint(gguf_path, dtype)

    if _is_complete_conversion(out_dir, fingerprint):
        logger.debug("%s already holds a conversion of %s (%s); reusing it", out_dir, gguf_path, dtype)
        return out_dir
    _check_out_dir_replaceable(out_dir)

    started_s = time.perf_counter()
    reader = _open_gguf(gguf_path)
    config = build_llama_config(reader, dtype=dtype)
    plans = plan_tensors(reader, config)

    _make_parent_dir(out_dir)
    staging_dir = _new_sibling_dir(out_dir, "partial")
    try:
        _write_checkpoint(staging_dir, gguf_path, reader, plans, config, torch_dtype, fingerprint, progress)
        _publish(staging_dir, out_dir, fingerprint)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    logger.info(
        "converted %s to %s (%s, %d tensors) in %.1f s",
        gguf_path.name, out_dir, dtype, len(plans), time.perf_counter() - started_s,
    )
    return out_dir


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


# --------------------------------------------------------------------------- config


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


# --------------------------------------------------------------------------- tensor plan


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


# --------------------------------------------------------------------------- writing


def _write_checkpoint(
    staging_dir: Path,
    gguf_path: Path,
    reader: GGUFReader,
    plans: Sequence[TensorPlan],
    config: dict[str, Any],
    torch_dtype: torch.dtype,
    fingerprint: dict[str, Any],
    progress: bool,
) -> None:
    try:
        with _progress_bar(progress, total=len(plans), description=f"Converting {gguf_path.name}") as advance:
            write_safetensors(staging_dir / WEIGHTS_FILENAME, plans, torch_dtype, on_tensor_written=advance)
        _write_json(staging_dir / CONFIG_FILENAME, config)
        _write_json(staging_dir / GENERATION_CONFIG_FILENAME, build_generation_config(reader, config))
        chat_template = _read_field(reader, "tokenizer.chat_template", default=None)
        _write_tokenizer(gguf_path, staging_dir, config, chat_template=chat_template)
        _write_json(staging_dir / MARKER_FILENAME, fingerprint)
    except OSError as error:
        raise CheckpointError(
            f"could not write the converted checkpoint under {staging_dir.parent}: {error}; "
            "check free disk space and write permissions"
        ) from error


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


def _write_tokenizer(
    gguf_path: Path, out_dir: Path, config: dict[str, Any], *, chat_template: str | None
) -> None:
    """Rebuild the fast tokenizer (and chat template) from the GGUF with transformers."""
    from transformers import AutoTokenizer  # heavy import, only needed here

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise UnsupportedModelError(
            f"transformers could not rebuild the tokenizer stored in {gguf_path.name}: {error}"
        ) from error
    eos_token_id = config["eos_token_id"]
    if eos_token_id is not None and tokenizer.eos_token_id != eos_token_id:
        raise CheckpointError(
            f"the rebuilt tokenizer ends sequences with token id {tokenizer.eos_token_id} but the GGUF "
            f"declares eos_token_id {eos_token_id}; the tokenizer metadata is inconsistent"
        )
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(str(out_dir))
    _make_tokenizer_config_portable(out_dir / "tokenizer_config.json", chat_template)


def _make_tokenizer_config_portable(path: Path, chat_template: str | None) -> None:
    """Let readers other than transformers 5 use the files too.

    transformers 5 names the class ``TokenizersBackend`` (older releases and other
    tools know ``PreTrainedTokenizerFast``, which transformers 5 keeps as an alias) and
    keeps the chat template only in ``chat_template.jinja``; it is also copied into
    ``tokenizer_config.json``, where older readers look for it.
    """
    tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template and "chat_template" not in tokenizer_config:
        tokenizer_config["chat_template"] = chat_template
    _write_json(path, tokenizer_config)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextmanager
def _progress_bar(enabled: bool, *, total: int, description: str) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callback; a transient rich bar on stderr when ``enabled``."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task_id = bar.add_task(description, total=total)
        yield lambda: bar.advance(task_id)


# --------------------------------------------------------------------------- output dir


def _source_fingerprint(gguf_path: Path, dtype: str) -> dict[str, Any]:
    try:
        stat = gguf_path.stat()
    except FileNotFoundError as error:
        raise CheckpointError(f"GGUF file {gguf_path} does not exist; pass the path of a .gguf file") from error
    except OSError as error:
        raise CheckpointError(f"cannot read GGUF file {gguf_path}: {error}") from error
    if not gguf_path.is_file():
        raise CheckpointError(f"expected a GGUF file at {gguf_path}, found a directory or special file")
    return {
        "converter": __name__,
        "format_version": _MARKER_FORMAT_VERSION,
        "source_path": str(gguf_path),
        "source_size_bytes": stat.st_size,
        "source_mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
    }


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((out_dir / MARKER_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete_conversion(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    marker = _read_marker(out_dir)
    if marker is None or any(marker.get(key) != value for key, value in fingerprint.items()):
        return False
    return (out_dir / WEIGHTS_FILENAME).is_file() and (out_dir / CONFIG_FILENAME).is_file()


def _check_out_dir_replaceable(out_dir: Path) -> None:
    """``out_dir`` may be replaced only if it is absent, empty or an earlier tierflow conversion."""
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; choose another output directory")
    if _read_marker(out_dir) is not None or not any(out_dir.iterdir()):
        return
    raise CheckpointError(
        f"{out_dir} already exists and is not a tierflow conversion (no {MARKER_FILENAME}); "
        "remove it or choose another output directory"
    )


def _make_parent_dir(out_dir: Path) -> None:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CheckpointError(f"cannot create the output directory's parent {out_dir.parent}: {error}") from error


def _new_sibling_dir(out_dir: Path, purpose: str) -> Path:
    sibling = out_dir.parent / f".{out_dir.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        sibling.mkdir()
    except OSError as error:
        raise CheckpointError(f"cannot create a temporary directory in {out_dir.parent}: {error}") from error
    return sibling


def _publish(staging_dir: Path, out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Move the finished ``staging_dir`` to ``out_dir``, replacing a stale conversion."""
    stale_dir: Path | None = None
    if out_dir.exists():
        if _is_complete_conversion(out_dir, fingerprint):  # a concurrent conversion won the race
            shutil.rmtree(staging_dir, ignore_errors=True)
            return
        _check_out_dir_replaceable(out_dir)
        stale_dir = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out_dir.rename(stale_dir)
    try:
        staging_dir.rename(out_dir)
    except OSError as error:
        if _is_complete_conversion(out_dir, fingerprint):
            shutil.rmtree(staging_dir, ignore_errors=True)
            return
        raise CheckpointError(f"cannot move the finished conversion into {out_dir}: {error}") from error
    finally:
        if stale_dir is not None:
            shutil.rmtree(stale_dir, ignore_errors=True)


# --------------------------------------------------------------------------- GGUF access


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


def _resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return SUPPORTED_DTYPES[dtype]
    except (KeyError, TypeError):
        raise ConfigError(
            f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {dtype!r}"
        ) from None
