"""Sampling a sweep's logits: each sequence's tokens, their logprobs, and the sequences that fail.

``sample_sweep`` runs in the compute worker after a sweep. It walks the logits rows the sweep
returned, in the order the batch asked for them (``Driver._batch``: a scoring request's every
position, a proposal's every verified position, else a sampled sequence's last), and for each
sequence samples one token (``sampling.sample``), verifies its speculative proposal
(``speculative.verify``), or keeps its prompt logits. A row holding a NaN or an infinity fails
only its own sequence, with a ``RequestError`` that says which token it was and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from tierflow.engine.requests import Request
from tierflow.engine.sampling import nonfinite_rows, sample, token_logprob
from tierflow.engine.speculative import Candidates, Verdict, verify
from tierflow.errors import NonFiniteRow, RequestError
from tierflow.outputs import TokenLogprob
from tierflow.pipeline.batcher import SweepPlan


@dataclass(frozen=True, slots=True)
class Sampled:
    """What sampling a sweep's logits gave, per sequence of its plan."""

    tokens: tuple[tuple[int, ...] | None, ...]   # the tokens to append (None: nothing sampled, or failed):
                                                 # one, or after verifying proposals the accepted ones and the model's own
    logprobs: tuple[tuple[TokenLogprob, ...], ...]   # of those tokens, for requests that ask for logprobs
    failures: Mapping[int, RequestError]    # sequence index → why (its logits were not finite)
    verdicts: Mapping[int, Verdict] = field(default_factory=dict)   # sequence index → what verifying its proposal kept


def sample_sweep(plan: SweepPlan, reqs: list[Request], logits: torch.Tensor,
                 drafts: Mapping[int, Candidates]) -> Sampled:
    """Runs in the compute worker: each sequence's tokens (None: nothing sampled) — one
    sampled token, or what verifying its proposal kept — and the sequences whose logits hold
    a NaN or an infinity, which fail."""
    tokens: list[tuple[int, ...] | None] = []
    logprobs: list[tuple[TokenLogprob, ...]] = []
    failures: dict[int, RequestError] = {}
    verdicts: dict[int, Verdict] = {}
    row = 0
    logits = logits.cpu()
    bad = nonfinite_rows(logits)
    for index, (item, req) in enumerate(zip(plan.seqs, reqs)):
        rows = range(row, row + (item.num_tokens if req.score else item.num_draft + 1 if item.sample else 0))
        row = rows.stop
        chosen: tuple[int, ...] | None = None
        if item.num_draft and not req.score:
            # only the rows the walk samples from matter: a rejected candidate's row is one plain
            # decoding never computes
            candidates = drafts[req.id]
            try:
                verdicts[index] = verify(logits[rows.start:rows.stop], candidates.tokens, req.params,
                                         req.generator, parents=None if candidates.is_chain else candidates.parents,
                                         bad={r - rows.start for r in rows if r in bad})
                chosen = verdicts[index].tokens
            except NonFiniteRow as exc:       # the row predicting the next kept position
                failures[index] = _nonfinite_error(req, item.known_end + exc.depth, bad[rows.start + exc.row],
                                                   exc.depth)
        elif any(r in bad for r in rows):
            first = next(r for r in rows if r in bad)
            position = item.start + item.num_tokens + first - rows.start if not req.score \
                else item.start + first - rows.start + 1
            failures[index] = _nonfinite_error(req, position, bad[first])
        elif req.score:
            req.logits.append(logits[rows.start:rows.stop])
        elif item.sample:
            chosen = (sample(logits[rows.start], req.params, req.generator),)
        tokens.append(chosen)
        # each token's row: the one after the path it extends (0, then each accepted candidate's)
        after = (0, *(i + 1 for i in verdicts[index].path)) if index in verdicts else range(len(chosen or ()))
        logprobs.append(tuple(token_logprob(logits[rows.start + r], token, req.params.logprobs)
                              for r, token in zip(after, chosen))
                        if chosen is not None and req.params.logprobs is not None else ())
    return Sampled(tuple(tokens), tuple(logprobs), failures, verdicts)


def _nonfinite_error(req: Request, position: int, found: str, ahead: int = 0) -> RequestError:
    """``ahead``: verified speculative tokens before the output token the logits predict."""
    what = (f"the logits predicting position {position} (prompt logits)" if req.score else
            f"the logits of output token {len(req.output_ids) + ahead} (position {position} of the sequence)")
    return RequestError(
        f"the model produced non-finite logits: {what} hold {found}, so no token can be chosen. The "
        "checkpoint's weights are damaged (NaN or inf in them: download it again), or float16 overflowed: "
        "open the engine with EngineConfig(dtype='float32') or 'bfloat16'", settings=("dtype",))
