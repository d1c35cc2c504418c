"""Resolving what an engine runs with: the device, the compute dtype, the tokenizer and the
tokens that end a sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tierflow.errors import CheckpointError, ConfigError
from tierflow.engine.planning import DTYPES
from tierflow.tiers.checkpoint.files import read_json
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
    """The tokens that end a sequence: config.json's, generation_config.json's (a
    CheckpointError naming that file when it is not JSON or its eos_token_id is not a token
    id or a list of them) and the tokenizer's."""
    ids = set(index.spec.eos_token_ids)
    gen = index.directory / "generation_config.json"
    if gen.exists():
        doc = read_json(gen)
        eos = doc.get("eos_token_id") if isinstance(doc, dict) else None
        found = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not isinstance(doc, dict) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                for t in found):
            raise CheckpointError(f"{gen}: expected a JSON object whose eos_token_id is a token id (an integer "
                                  f">= 0) or a list of them, found {str(eos if isinstance(doc, dict) else doc)[:80]}; "
                                  "fix or delete generation_config.json")
        ids |= set(found)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
