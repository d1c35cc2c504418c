"""The prefix cache's keys: a chain hash of the tokens, started from the model's fingerprint.

Block j's key is sha256(key of block j-1 + the token ids of block j), so one key names the
model and the whole prefix up to the block's end. The model fingerprint hashes config.json,
the compute dtype, and each weight file's name, size and sampled bytes (its first MiB and 16
slices of 64 KiB spread over it): weights changed in place are told apart without reading
the whole checkpoint.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

FORMAT_VERSION = 1
_HEAD_SAMPLE = 2**20
_SAMPLE = 64 * 2**10
_SAMPLES = 16


def model_fingerprint(config: Mapping[str, Any], files: Sequence[str | os.PathLike[str]], dtype: torch.dtype) -> str:
    """A hex digest naming the model whose KV a block holds (see the module docstring)."""
    h = hashlib.sha256(f"tierflow-prefix-v{FORMAT_VERSION}".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{Path(name).name}:{size}".encode())
        with open(name, "rb") as f:
            h.update(f.read(_HEAD_SAMPLE))
            for i in range(_SAMPLES):
                f.seek(size * i // _SAMPLES)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def block_keys(fingerprint: str, token_ids: Sequence[int], block_tokens: int) -> list[str]:
    """The keys of every full block of ``token_ids``, in order."""
    keys, previous = [], bytes.fromhex(fingerprint)
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        digest = hashlib.sha256(previous + array.array("q", token_ids[start:start + block_tokens]).tobytes()).digest()
        keys.append(digest.hex())
        previous = digest
    return keys
