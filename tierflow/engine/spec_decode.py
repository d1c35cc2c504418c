"""The driver's bookkeeping for speculative decoding, around each sweep.

Before a sweep, each decoding request's proposer (``proposers.NgramProposer``, or
``DraftProposer`` over the draft's own runtime) proposes up to the tokens and the width the
"auto" shape or the configured one says (``speculative.SpeculationLength``), and the proposal
is flattened into the ``Candidates`` the batcher schedules after the request's last token.
After it, verification has said what the model agrees with (``sweep_sampling``): what was
kept is counted (``speculative.SpeculationCounter``, for ``stats()``), and the KV of the
rejected tokens is rolled back in every tier (``tiers/kv/handle.keep_path``) before the prefix
cache or the next sweep sees it. The decoding itself (proposals, trees, the acceptance rule)
is ``speculative``'s; this module only carries it between the batcher, the proposer and the
sequences' KV.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable, Mapping

import torch

from tierflow.config import SpeculativeConfig
from tierflow.engine.build import Runtime
from tierflow.engine.proposers import DraftProposer, NgramProposer
from tierflow.engine.requests import Request
from tierflow.engine.speculative import Candidates, SpeculationCounter, SpeculationLength
from tierflow.engine.sweep_sampling import Sampled
from tierflow.errors import ConfigError, RequestError
from tierflow.outputs import SpeculativeStats
from tierflow.pipeline.batcher import Batcher, SweepPlan
from tierflow.tiers.kv.handle import KVHandle, keep_path

log = logging.getLogger(__name__)


class SpecDecode:
    """Proposals before a sweep, and what verification kept after it."""

    def __init__(self, rt: Runtime, speculative: SpeculativeConfig, batcher: Batcher) -> None:
        spec = rt.spec
        if spec.linear_layers:
            raise ConfigError(f"speculative decoding cannot serve {spec.architecture}: its linear-attention layers "
                              "fold every token into one state, which cannot be rolled back past rejected tokens; "
                              "open the engine without EngineConfig.speculative", settings=("speculative",))
        self.rt, self.batcher = rt, batcher
        self.proposer = DraftProposer(rt.draft, speculative) if rt.draft is not None else NgramProposer(speculative)
        self.counter = SpeculationCounter(speculative.method)
        self.length = SpeculationLength(rt, speculative, self.counter)

    def statistics(self) -> SpeculativeStats:
        return self.counter.statistics()

    async def propose(self, requests: Iterable[Request]) -> dict[int, Candidates]:
        """Each decoding request's candidates, by request id (none when its proposer has none);
        the batcher schedules those of decoding sequences."""
        wanted, widths = {}, {}
        for req in requests:
            if req.output_ids and not req.done and not req.score and self.batcher.is_decoding(req.id):
                known = req.prompt_ids + req.output_ids
                shape = self.length(len(known))
                wanted[req.id] = (known, min(shape.tokens, req.most_tokens - len(known) - 1), req.most_tokens)
                widths[req.id] = shape.width
        proposals = await self.proposer.propose_all(wanted)
        return {req_id: proposal.candidates(widths[req_id]) for req_id, proposal in proposals.items()}

    async def roll_back(self, plan: SweepPlan, reqs: list[Request], sampled: Sampled, emitted: Counter[int],
                        drafts: Mapping[int, Candidates]) -> list[tuple[Request, RequestError]]:
        """Count what verification kept, and keep only the KV of the last known token and of the
        accepted candidates (no more than were appended), moved to their positions' slots,
        before the prefix cache or the next sweep sees it. Returns the requests whose roll-back
        failed, with why: their KV is not what their tokens say, so they fail."""
        cuts = []
        for index, (item, req) in enumerate(zip(plan.seqs, reqs)):
            if not item.num_draft:
                continue
            verdict = sampled.verdicts.get(index)
            if verdict is not None:
                self.counter.add(drafts[req.id], verdict, emitted[req.id])
            if req.error is None:
                path = verdict.path[:emitted[req.id]] if verdict is not None else ()
                cuts.append((req, item.known_end, path))
        failed = await self.rt.worker.run(self.rt.on_device, _keep_paths, [(req.kv, n, p) for req, n, p in cuts])
        failures = []
        for index, exc in failed.items():
            req = cuts[index][0]
            log.warning("request %d: rolling back its rejected tokens' KV failed: %s", req.id, exc)
            failures.append((req, exc if isinstance(exc, RequestError) else
                             RequestError(f"rolling back the KV of rejected speculative tokens failed: {exc}")))
        return failures


def _keep_paths(cuts: list[tuple[KVHandle, int, tuple[int, ...]]]) -> dict[int, Exception]:
    """Cut each handle back to its known tokens and accepted path; what failed, by index (the
    others are cut all the same)."""
    failed = {}
    with torch.inference_mode():        # the tails it writes were made by the sweeps, in inference mode
        for index, (kv, known, path) in enumerate(cuts):
            try:
                keep_path(kv, known, path)
            except Exception as exc:
                failed[index] = exc
    return failed
