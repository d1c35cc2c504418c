"""The routed experts of a mixture-of-experts model: what one costs to read, to cache and to
compute (``ExpertCosts``, with the expert cache's hit rate from measured routing's curve or
under uniform routing) and ``expert_costs``, which sizes it from the shapes its family
expects. Pure: no torch, no I/O.

Routed experts in a packed format (gpt-oss's MXFP4, ``PACKED_TENSORS``) are read and cached as
they are stored — ``ExpertStage`` keeps a read buffer whose tensors need no cast as read — so an
expert's disk, PCIe and cache bytes are its packed bytes (uint8 blocks and scales, its biases in
the checkpoint's dtype), while its matmuls multiply the unpacked weights (two per block byte).
The compute dequantizes them right before those matmuls: it reads the packed bytes, writes the
weights in the compute dtype and reads them again, so its roofline counts all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from tierflow.tiers.plan.reads import ALIGN


@dataclass(frozen=True, slots=True)
class ExpertCosts:
    """The routed experts of a mixture-of-experts model: not units of the sweep, but read (or
    found in the expert cache) when the router picks them."""

    moe_layers: int          # layers with routed experts
    num_experts: int         # routed experts per MoE layer
    per_token: int           # experts each token is routed to
    stream_bytes: int        # one expert's read (as stored: checkpoint dtype or packed; aligned)
    resident_bytes: int      # what one cached expert holds (its read, or its weights cast to the compute dtype)
    matmul_params: int       # one expert's weights (unpacked: what its matmuls multiply)
    compute_bytes: int = 0   # bytes its compute moves per use (0: resident_bytes; packed: also the unpacked weights)
    expert_format: str = ""  # "": the checkpoint's float dtype; a key of PACKED_TENSORS: stored packed
    # measured routing (``routing.RoutingStats.curve``): the hit rate of a cache of c experts per
    # layer, c = 0 .. num_experts; () assumes uniform routing
    hit_curve: tuple[float, ...] = ()

    def hit_rate(self, cache_bytes: int, distinct: float | None = None) -> float:
        """The share of routed experts an expert cache of ``cache_bytes`` holds when asked: from the
        measured curve at the experts per layer it holds (split as the expert stage splits it),
        else, under uniform routing, the cache's share of all experts. ``distinct``: the experts
        a sweep's tokens pick per layer (a prefill's many): a cache of C per layer holds at most
        C of them, whatever the curve measured one token at a time says."""
        if not self.all_resident_bytes:
            return 1.0
        per_layer = min(self.num_experts, cache_bytes // max(1, self.resident_bytes) // max(1, self.moe_layers))
        if self.hit_curve:
            hit = self.hit_curve[min(per_layer, len(self.hit_curve) - 1)]
            return min(hit, per_layer / distinct) if distinct else hit
        return min(1.0, cache_bytes / self.all_resident_bytes)

    @property
    def use_bytes(self) -> int:
        """Bytes one use of an expert moves through the compute (its roofline's weight bytes)."""
        return self.compute_bytes or self.resident_bytes

    @property
    def all_resident_bytes(self) -> int:
        return self.moe_layers * self.num_experts * self.resident_bytes

    def distinct(self, tokens: int) -> float:
        """Expected distinct experts of one layer that ``tokens`` tokens are routed to, when
        routing is uniform: E·(1 − (1 − k/E)^tokens)."""
        e, k = self.num_experts, self.per_token
        return e * (1.0 - (1.0 - k / e) ** max(0, tokens))


# Expert formats stored packed: per tensor-name suffix, (bytes an element takes, weights it holds).
# MXFP4 (adapters/mxfp4.py): ``*_blocks`` uint8, two FP4 values a byte; ``*_scales`` uint8, one
# exponent per 32 values (no weight of its own). Other expert tensors (biases) are in the float dtype.
PACKED_TENSORS: dict[str, dict[str, tuple[int, int]]] = {"mxfp4": {"_blocks": (1, 2), "_scales": (1, 0)}}


def expert_costs(spec: Any, adapter: Any, checkpoint_dtype_bytes: int, dtype_bytes: int,
                 stream_bytes: int | None = None, element_bytes: Mapping[str, int] | None = None,
                 cast: bool | None = None) -> ExpertCosts | None:
    """Costs of one routed expert from the shapes its family expects (None for a dense model).

    ``element_bytes``: each expert tensor's bytes per element where the checkpoint is at hand
    (default: a packed format's own, else ``checkpoint_dtype_bytes``). ``cast``: whether its
    float tensors need converting to the compute dtype (default: the sizes differ); a cached
    expert holds its read buffer when they do not, else its weights in the compute dtype (a
    packed tensor as it is)."""
    if not getattr(spec, "num_experts", 0):
        return None
    shapes = adapter.expected_expert_shapes(spec)
    packed = PACKED_TENSORS.get(getattr(spec, "expert_format", ""), {})
    stored, weights, floats = {}, {}, {}
    for name, shape in shapes.items():
        form = next((v for suffix, v in packed.items() if name.endswith(suffix)), None)
        n = math.prod(shape)
        stored[name] = n * (element_bytes or {}).get(name, form[0] if form else checkpoint_dtype_bytes)
        weights[name] = n * form[1] if form else (n if len(shape) == 2 else 0)
        floats[name] = 0 if form else n
    payload = sum(-(-b // ALIGN) * ALIGN for b in stored.values())
    read = payload if stream_bytes is None else stream_bytes
    cast = checkpoint_dtype_bytes != dtype_bytes if cast is None else cast
    held = sum(floats[name] * dtype_bytes if floats[name] else stored[name] for name in shapes) if cast else read
    matmul = sum(weights.values())
    unpacked = held + 2 * matmul * dtype_bytes if packed else 0    # read packed, write and read the weights
    return ExpertCosts(len(spec.moe_layers), spec.num_experts, spec.experts_per_token, read, held, matmul,
                       unpacked, spec.expert_format if packed else "")
