"""How one request samples: ``SamplingParams``."""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from tierflow.errors import SamplingError
from tierflow.config.checks import check_number, check_positive, collection_of, record_from, show, valid_unicode

SEED_RANGE = (-2**63, 2**64 - 1)      # what torch.Generator.manual_seed accepts
MIN_TEMPERATURE = 1e-5                # below it sampling is greedy in all but name
MAX_LOGPROBS = 20                     # the most alternatives per token SamplingParams.logprobs asks for
MIN_TOP_P = 1e-9                      # below 1/vocab every top_p keeps the most likely token alone


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples.

    max_new_tokens: an int >= 1. temperature: 0 is greedy, else a finite number >= 1e-5
    (below that sampling is greedy in all but name: pass 0). top_k: an int, 0 disables it.
    top_p: a finite number in [1e-9, 1], 1.0 disables it (any value below 1/vocab keeps the
    most likely token alone). seed: an int in [-2**63, 2**64 - 1] (torch.Generator's range),
    or None; it makes sampling reproducible per request, whatever else runs in the same sweep.
    stop: strings that end generation (not included in the output): one str, or a list, tuple
    or set of non-empty strings (a set is kept sorted; a mapping is refused, not read for its
    keys). stop_token_ids end it too, as does the model's EOS unless ignore_eos (a bool):
    a list, tuple or set of ints >= 0 (below the model's vocabulary size, which the engine
    checks for each request). logprobs: None, or an int in [0, 20]: each generated token's
    log-probability (under the model's own distribution, before temperature, top-k and top-p)
    and those of the ``logprobs`` most likely tokens at its position come back with it
    (``Completion.logprobs``, ``StreamChunk.logprobs``).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        check_positive("SamplingParams", "max_new_tokens", self.max_new_tokens, error=SamplingError)
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError(f"SamplingParams.logprobs must be None or an int in [0, {MAX_LOGPROBS}], "
                                f"got {show(self.logprobs)}")
        if self.temperature != 0 or isinstance(self.temperature, bool):
            check_number("temperature", self.temperature, low=MIN_TEMPERATURE, zero=True)
        check_number("top_p", self.top_p, low=MIN_TOP_P, high=1.0)
        check_positive("SamplingParams", "top_k", self.top_k, error=SamplingError, minimum=0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SamplingError(f"SamplingParams.seed must be None or an int in [-2**63, 2**64 - 1] (what "
                                f"torch.Generator.manual_seed accepts), got {show(self.seed)}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError(f"SamplingParams.ignore_eos must be a bool (True or False), got {show(self.ignore_eos)}")
        stop = (self.stop,) if isinstance(self.stop, str) else collection_of("stop", self.stop, "non-empty strings")
        if any(not isinstance(s, str) or not s or not valid_unicode(s) for s in stop):
            raise SamplingError(f"SamplingParams.stop must hold non-empty strings of valid Unicode, got "
                                f"{show(self.stop)}")
        ids = collection_of("stop_token_ids", self.stop_token_ids, "ints >= 0")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise SamplingError(f"SamplingParams.stop_token_ids must hold ints >= 0, got {show(self.stop_token_ids)}")
        sets = isinstance(self.stop, Set), isinstance(self.stop_token_ids, Set)
        object.__setattr__(self, "stop", tuple(sorted(stop)) if sets[0] else stop)
        object.__setattr__(self, "stop_token_ids", tuple(sorted(ids)) if sets[1] else ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0



def sampling_params_from(value: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
    """``value`` itself, ``SamplingParams(**value)`` for a mapping, the defaults for None."""
    return record_from(SamplingParams, value, SamplingError, "params")
