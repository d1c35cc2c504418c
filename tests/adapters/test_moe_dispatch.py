"""The MoE layer's dispatch of tokens to experts (``MoEAdapter.feed_forward``) on its own: it
waits for the device once (the ``tolist`` of the per-expert counts), asks the expert provider
for exactly the picked experts in ascending order, and computes what a per-expert loop over
``torch.where(top_i == expert)`` computed, bit for bit, and what every expert applied to every
token and weighed by the router gives, to rounding. The families against transformers' own
MoE classes are tests/adapters/test_moe.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from tierflow.adapters.base import SweepContext
from tierflow.adapters.decoder import ACTIVATIONS
from tierflow.adapters.moe import MixtralAdapter, Qwen2MoeAdapter, Qwen3MoeAdapter

SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
FAMILIES = {
    "mixtral": (MixtralAdapter, MixtralConfig(**SMALL, intermediate_size=48, num_local_experts=8,
                                              num_experts_per_tok=2)),
    "qwen2_moe-shared": (Qwen2MoeAdapter, Qwen2MoeConfig(**SMALL, moe_intermediate_size=48, num_experts=8,
                                                         num_experts_per_tok=2, shared_expert_intermediate_size=40)),
    "qwen3_moe": (Qwen3MoeAdapter, Qwen3MoeConfig(**SMALL, moe_intermediate_size=48, num_experts=8,
                                                  num_experts_per_tok=3, norm_topk_prob=True)),
}


def _layer(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(adapter, spec, the layer's MLP weights, every expert's weights) of a random layer 0."""
    cls, config = FAMILIES[name]
    adapter = cls()
    spec = adapter.spec_from_config(config.to_dict() | {"architectures": [cls.architectures[0]]})
    gen = torch.Generator().manual_seed(seed)

    def random(shape):
        return (torch.randn(shape, generator=gen) * 0.3).to(dtype)

    weights = {local: random(shape) for local, shape in adapter.feed_forward_shapes(spec, 0).items()}
    experts = {e: {local: random(shape) for local, shape in adapter.expected_expert_shapes(spec).items()}
               for e in range(spec.num_experts)}
    return adapter, spec, weights, experts


def _context(experts, asked: list[tuple[int, tuple[int, ...]]]) -> SweepContext:
    def provide(layer, picked):
        asked.append((layer, tuple(picked)))
        return {e: experts[e] for e in picked}

    empty = torch.empty(0)
    return SweepContext(positions=empty, seq_slices=(), seq_starts=(), kv=(), rope=(empty, empty),
                        logit_rows=empty, experts=provide)


def _per_expert_loop(adapter, spec, w, h, experts):
    """The dispatch as it was: the picked experts from a ``tolist``, then each expert's tokens
    from ``torch.where(top_i == expert)`` (a wait for the device per expert)."""
    probs = F.softmax(F.linear(h, w["router"]), dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, spec.experts_per_token, dim=-1)
    if spec.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    if not adapter.routing_in_float32:
        top_w = top_w.to(h.dtype)
    act, out = ACTIVATIONS[spec.hidden_act], torch.zeros_like(h)
    for expert in sorted(set(top_i.flatten().tolist())):
        tokens, slot = torch.where(top_i == expert)
        e = experts[expert]
        y = F.linear(act(F.linear(h[tokens], e["gate_proj"])) * F.linear(h[tokens], e["up_proj"]), e["down_proj"])
        out.index_add_(0, tokens, (y * top_w[tokens, slot, None]).to(out.dtype))
    return out, top_w, top_i


def _shared(spec, w, h):
    if not spec.shared_expert_intermediate_size:
        return 0
    act = ACTIVATIONS[spec.hidden_act]
    shared = F.linear(act(F.linear(h, w["shared_gate_proj"])) * F.linear(h, w["shared_up_proj"]),
                      w["shared_down_proj"])
    return torch.sigmoid(F.linear(h, w["shared_expert_gate"])) * shared


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dispatch_matches_the_per_expert_loop_exactly(name, tokens, dtype):
    adapter, spec, w, experts = _layer(name, dtype)
    h = torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    asked: list[tuple[int, tuple[int, ...]]] = []
    got = adapter.feed_forward(spec, 0, w, h, _context(experts, asked))
    routed, _, top_i = _per_expert_loop(adapter, spec, w, h, experts)
    assert torch.equal(got, routed + _shared(spec, w, h))
    assert asked == [(0, tuple(sorted(set(top_i.flatten().tolist()))))]


@pytest.mark.parametrize("name", FAMILIES)
def test_dispatch_equals_every_expert_on_every_token(name):
    """Dense arithmetic, no dispatch at all: token t's output is the sum over its k picks of the
    routing weight times that expert's MLP of t."""
    adapter, spec, w, experts = _layer(name, torch.float64)
    h = torch.randn(48, spec.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = adapter.feed_forward(spec, 0, w, h, _context(experts, []))
    _, top_w, top_i = _per_expert_loop(adapter, spec, w, h, experts)
    act = ACTIVATIONS[spec.hidden_act]
    every = torch.stack([F.linear(act(F.linear(h, e["gate_proj"])) * F.linear(h, e["up_proj"]), e["down_proj"])
                         for e in experts.values()])                              # [E, n, hidden]
    picked = every[top_i, torch.arange(h.shape[0])[:, None]]                       # [n, k, hidden]
    expected = (picked * top_w[..., None].to(h.dtype)).sum(dim=1) + _shared(spec, w, h)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class DeviceWaits(TorchFunctionMode):
    """Counts the calls that make the host wait for a device's results: reading values back
    (``tolist``, ``item``, ``bool``/``int``/``float``/``index`` of a tensor, ``cpu``, ``numpy``), ops
    whose output size depends on the values (``nonzero``, one-argument ``where``, ``unique``,
    ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``), and
    ``bincount`` (CUDA's reads the input's extremes back to size its result)."""

    WAITS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere, torch.unique,
             torch.Tensor.unique, torch.unique_consecutive, torch.masked_select, torch.Tensor.masked_select,
             torch.bincount, torch.Tensor.bincount}

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._waits(func, args, kwargs):
            self.waits.append(getattr(func, "__name__", repr(func)))
        return func(*args, **kwargs)

    def _waits(self, func, args, kwargs) -> bool:
        if func in self.WAITS:
            return True
        if func in (torch.where, torch.Tensor.where):
            return len(args) + len(kwargs) == 1
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            return kwargs.get("output_size") is None and isinstance(args[1] if len(args) > 1 else None, torch.Tensor)
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if func is torch.Tensor.to:
            return any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))
        return False


def test_the_counter_sees_each_kind_of_wait():
    t = torch.tensor([0, 2, 1, 2])
    with DeviceWaits() as mode:
        t.tolist(), t[0].item(), bool(t[0]), torch.where(t == 2), t.nonzero(), t[t > 0], torch.bincount(t)
        torch.where(t == 2, t, t), t.argsort(stable=True), t.split([1, 3]), t.index_select(0, t)
    assert mode.waits == ["tolist", "item", "__bool__", "where", "nonzero", "__getitem__", "bincount"]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("tokens", [1, 64])
def test_one_wait_for_the_device_per_moe_layer(name, tokens):
    adapter, spec, w, experts = _layer(name)
    h = torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = _context(experts, [])
    with DeviceWaits() as mode:
        adapter.feed_forward(spec, 0, w, h, ctx)
    assert mode.waits == ["tolist"]
    _, _, top_i = _per_expert_loop(adapter, spec, w, h, experts)
    with DeviceWaits() as mode:                  # the loop it replaced: one more wait per picked expert
        _per_expert_loop(adapter, spec, w, h, experts)
    assert mode.waits == ["tolist"] + ["where"] * len(set(top_i.flatten().tolist()))
