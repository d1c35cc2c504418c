"""Resolving what an engine runs with: the device, the compute dtype, the tokenizer and the
tokens that end a sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tierflow.errors import ConfigError
from tierflow.engine.planning import DTYPES
from tierflow.tiers.checkpoint.index import CheckpointIndex


def resolve_device(device: str) -> torch.device:
    """"cpu", "cuda", "cuda:N", or "auto" (the current CUDA device when one is visible)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"EngineConfig.device={device!r} but no CUDA device is visible (torch "
                          f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); use device='cpu' "
                          "or 'auto'")
    resolved = torch.device("cuda", torch.cuda.current_device()) if device in ("auto", "cuda") else torch.device(device)
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"EngineConfig.device={device!r}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), numbered from 0")
    return resolved


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    resolved = DTYPES.get(checkpoint_dtype, torch.float32)
    if resolved == torch.float16 and device.type == "cpu":
        return torch.float32     # fp16 matmuls are very slow on most CPUs
    return resolved


def load_tokenizer(directory: Path) -> Any:
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)


def eos_ids(index: CheckpointIndex, tokenizer: Any) -> frozenset[int]:
    ids = set(index.spec.eos_token_ids)
    gen = index.directory / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
