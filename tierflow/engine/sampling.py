"""Per-request sampling: greedy, temperature, top-k, top-p, each request with its own
generator so that a seeded request samples the same tokens whatever else shares its sweep.

Before sampling, ``nonfinite_rows`` finds the logit rows nothing can be sampled from (a NaN, a
+inf, or no finite value at all: damaged weights, or float16 overflow), so that their requests
fail instead of decoding token 0 forever; it costs one ``isfinite`` pass over the logits the
sampler already holds on the host, and more only when that pass finds something."""

from __future__ import annotations

import torch

from tierflow.config import SamplingParams
from tierflow.outputs import TokenLogprob


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from float32 ``logits`` [vocab] (on the CPU)."""
    if params.greedy:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, params), 1, generator=generator))


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampling (not greedy) request draws from: float32 ``logits`` [vocab]
    after temperature, top-k and top-p (what ``sample`` draws from, and what speculative
    decoding's acceptance rule compares proposals with)."""
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p   # keep the first token always
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.softmax(scores, dim=-1)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under float32 ``logits`` [vocab] (the model's own distribution:
    before temperature, top-k and top-p, as OpenAI's ``logprobs`` report it) and the ``top``
    most likely tokens' (most likely first)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    best = torch.topk(logprobs, min(top, logprobs.numel())) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), pairs)


def nonfinite_rows(logits: torch.Tensor) -> dict[int, str]:
    """The rows of host ``logits`` [rows, vocab] that cannot be sampled from, each with what it
    holds: a NaN, a +inf (softmax turns it into NaN), or no finite value (all -inf). A row with
    some -inf among finite values (masked tokens) is fine."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return {}
    nan, posinf, some_finite = logits.isnan().sum(-1), logits.isposinf().sum(-1), finite.any(-1)
    found = {}
    for row in range(logits.shape[0]):
        if nan[row] or posinf[row] or not some_finite[row]:
            found[row] = (f"{int(nan[row])} NaN and {int(posinf[row])} +inf of {logits.shape[-1]} logits"
                          if nan[row] or posinf[row] else f"all {logits.shape[-1]} logits -inf")
    return found
