"""Convert a llama-architecture GGUF file into a Hugging Face checkpoint directory.

tierflow streams layer weights from Hugging Face style checkpoints (``config.json`` +
``model.safetensors`` + tokenizer files). Small models are often distributed only as
llama.cpp GGUF files, so this module turns such a file into that layout once, up front.

Design (metadata in ``gguf_meta``, tensors in ``gguf_tensors``, output dir in ``gguf_output``)
----------------------------------------------------------------------------------------------
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
* **Atomic, idempotent output.** Written into a hidden sibling of ``out_dir`` and renamed
  into place, reused when the marker matches; ``gguf_output`` owns that directory's life.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from gguf import GGUFReader

from tierflow.errors import CheckpointError, ConfigError, UnsupportedModelError
from tierflow.convert.gguf_meta import _open_gguf, _read_field, build_generation_config, build_llama_config
from tierflow.convert.gguf_output import (CONFIG_FILENAME, MARKER_FILENAME, WEIGHTS_FILENAME,
                                          check_out_dir_replaceable, is_complete_conversion, make_parent_dir,
                                          new_staging_dir, publish, remove_orphaned_outputs)
from tierflow.convert.gguf_tensors import (SUPPORTED_DTYPES, TensorPlan, plan_tensors, unpermute_rotary_rows,
                                         write_safetensors)

__all__ = ["SUPPORTED_DTYPES", "convert_gguf", "unpermute_rotary_rows"]

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILENAME = "generation_config.json"
_MARKER_FORMAT_VERSION = 1


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
    remove_orphaned_outputs(out_dir)

    if is_complete_conversion(out_dir, fingerprint):
        logger.debug("%s already holds a conversion of %s (%s); reusing it", out_dir, gguf_path, dtype)
        return out_dir
    check_out_dir_replaceable(out_dir)

    started_s = time.perf_counter()
    reader = _open_gguf(gguf_path)
    config = build_llama_config(reader, dtype=dtype)
    plans = plan_tensors(reader, config)

    make_parent_dir(out_dir)
    staging_dir, staging_lock = new_staging_dir(out_dir)
    try:
        _write_checkpoint(staging_dir, gguf_path, reader, plans, config, torch_dtype, fingerprint, progress)
        publish(staging_dir, out_dir, fingerprint)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    finally:
        os.close(staging_lock)           # after the rename or the removal: never an orphan while in use
    logger.info(
        "converted %s to %s (%s, %d tensors) in %.1f s",
        gguf_path.name, out_dir, dtype, len(plans), time.perf_counter() - started_s,
    )
    return out_dir


# --------------------------------------------------------------------------- config


# --------------------------------------------------------------------------- tensor plan


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


# --------------------------------------------------------------------------- GGUF access


def _resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return SUPPORTED_DTYPES[dtype]
    except (KeyError, TypeError):
        raise ConfigError(
            f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {dtype!r}"
        ) from None
