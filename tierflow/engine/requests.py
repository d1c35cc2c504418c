"""What the engine keeps per request: its tokens, sampling state, KV handle and outcome."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tierflow.config import SamplingParams
from tierflow.errors import ConfigError
from tierflow.engine.prompts import Detokenizer


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    kv: Any                                   # SequenceKV, or PagedSequenceKV with a paged KV cache
    detok: Detokenizer
    generator: torch.Generator | None
    score: bool = False                       # return prompt logits instead of generating
    output_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0
    finished_s: float = 0.0
    cached_tokens: int = 0                    # prompt tokens whose KV came from the prefix cache
    remembered_blocks: int = 0                # full KV blocks offered to the prefix cache so far

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def token(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


def deadline_after(timeout_s: float | None) -> float | None:
    """The loop time ``timeout_s`` from now (None: no deadline); ConfigError for a bad value."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a number of seconds > 0 or None, got {timeout_s!r}")
    return asyncio.get_running_loop().time() + timeout_s
