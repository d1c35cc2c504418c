"""Measured routing: what an expert cache of any size would hit, from one run's router picks.

The planner prices a mixture-of-experts sweep by the routed experts its expert cache misses.
Without measurements it assumes uniform routing — a cached expert is hit as often as the cache
is a share of all experts — which real routers beat: consecutive tokens pick alike, and some
experts are popular. ``RoutingStats`` records, per MoE layer, the LRU *stack distance* of every
expert request (Mattson et al., 1970): how many distinct experts of that layer were used since
this expert's last use (none yet: a cold request). An LRU part of C experts per layer — how
``stages/experts.ExpertStage`` splits its cache — hits exactly the requests whose distance is
below C (distances taken against the recency before the sweep: the stage evicts when the
layer is done), so one run gives the hit rate of every cache size at once (``hit_rate``), and
``ExpertCosts.hit_curve`` carries it into the cost model in place of the uniform share.

The expert stage records one ``observe`` per layer per sweep, of the experts the router picked
(each once). The curve is that of pure LRU: the stage's read-ahead of what the next layer used
last time turns some of the misses it predicts into hits, so the measured curve is a floor.
Pure (no torch, no I/O): ``tiers/probe/profile.py`` reads and writes its JSON (``load_routing``,
``save_routing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

ROUTING_VERSION = 1


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """Expert requests of a run by LRU stack distance, over all MoE layers."""

    num_experts: int                       # experts per MoE layer
    requests: int = 0
    cold: int = 0                          # requests of an expert its layer had not used before
    reuse: tuple[int, ...] = ()            # reuse[d]: requests at stack distance d (d distinct experts since)

    def hits(self, cached_experts: int) -> int:
        """The requests of this run an LRU part of ``cached_experts`` experts per layer would hit."""
        return sum(self.reuse[:max(0, cached_experts)])

    def hit_rate(self, cached_experts: int) -> float:
        """The steady-state share of requests such a cache hits: over the requests that were not
        an expert's first (a run's cold misses happen once, whatever its length), and 1.0 for a
        cache of every expert (the stage then reads them all at open). 0.0 with no reuse measured."""
        if cached_experts >= self.num_experts:
            return 1.0
        reused = self.requests - self.cold
        return self.hits(cached_experts) / reused if reused else 0.0

    def curve(self) -> tuple[float, ...]:
        """``hit_rate(c)`` for c = 0 .. num_experts."""
        return tuple(self.hit_rate(c) for c in range(self.num_experts + 1))

    def to_json(self) -> dict[str, Any]:
        return {"version": ROUTING_VERSION, "num_experts": self.num_experts, "requests": self.requests,
                "cold": self.cold, "reuse": list(self.reuse)}

    @staticmethod
    def from_json(document: Any, where: str = "the routing statistics") -> "RoutingStats":
        """Parse a document ``to_json`` wrote; ValueError naming ``where`` and what is wrong."""
        if not isinstance(document, dict) or document.get("version") != ROUTING_VERSION:
            raise ValueError(f"{where}: expected a JSON object with \"version\": {ROUTING_VERSION} (as "
                             "RoutingStats.write writes it)")
        try:
            experts, requests, cold = (int(document[k]) for k in ("num_experts", "requests", "cold"))
            reuse = tuple(int(x) for x in document["reuse"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: a field is missing or not a whole number ({exc})") from None
        if experts < 1 or len(reuse) > experts or min((requests, cold, *reuse)) < 0 or cold + sum(reuse) != requests:
            raise ValueError(f"{where}: the counts do not add up (requests {requests}, cold {cold}, reuse "
                             f"{sum(reuse)} over {len(reuse)} distances, {experts} experts)")
        return RoutingStats(experts, requests, cold, reuse)


@dataclass(slots=True)
class RoutingRecorder:
    """Stack distances as the expert stage sees requests (one recency list per layer)."""

    num_experts: int
    _recent: dict[int, list[int]] = field(default_factory=dict)   # layer → its experts, most recent first
    _reuse: list[int] = field(default_factory=list)
    _cold: int = 0
    _requests: int = 0

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """One layer's picks in one sweep. Their distances are taken against the recency before
        the sweep (the cache evicts only when the layer is done, so each pick finds what the
        previous sweeps left); then they become the most recent, the last one first."""
        recent = self._recent.setdefault(layer, [])
        picked = list(dict.fromkeys(experts))          # each once, in order
        position = {expert: i for i, expert in enumerate(recent)}
        for expert in picked:
            self._requests += 1
            distance = position.get(expert)
            if distance is None:
                self._cold += 1
                continue
            if distance >= len(self._reuse):
                self._reuse.extend([0] * (distance + 1 - len(self._reuse)))
            self._reuse[distance] += 1
        chosen = set(picked)
        recent[:] = picked[::-1] + [e for e in recent if e not in chosen]

    def statistics(self) -> RoutingStats:
        return RoutingStats(self.num_experts, self._requests, self._cold, tuple(self._reuse))
