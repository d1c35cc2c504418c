"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE.

Attention, norms and the layer skeleton are the dense decoder's; what changes is the MLP of
the MoE layers. Its router is part of the layer unit (with the shared expert, where there is
one), while every routed expert is a unit of its own in the checkpoint index, with names
mapped by ``expert_rules``. ``feed_forward`` runs the router, asks the sweep's expert
provider (``SweepContext.experts``) for exactly the experts its tokens picked — the stage
behind it reads only those — and combines their outputs as transformers does: softmax in
float32, top-k, optional renormalisation, experts in ascending order, each token's outputs
added with its routing weight.

The host must learn which experts were picked (it asks for their weights), and that is the
layer's only wait for the device: one stable sort of the token-slots by expert, each
expert's count (a scatter-add: ``bincount`` on CUDA reads the input's minimum and maximum
back to size its result, two more waits), and one ``tolist`` of the counts, which names the
picked experts and sizes each one's group. Splitting the sorted slots by those host-side
sizes, gathering rows with ``index_select`` and adding back with ``index_add_`` wait for
nothing (a per-expert ``torch.where(top_i == e)`` would be a ``nonzero``: one more wait per
expert).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from tierflow.adapters.base import EXPERT, LAYER, SLIDING_ATTENTION, ModelSpec, NameRule, SweepContext, UnitWeights
from tierflow.adapters.decoder import ACTIVATIONS, DecoderAdapter, DecoderStyle, decoder_name_rules
from tierflow.adapters.qwen import qwen_layers
from tierflow.adapters.rope import ROPE_TYPES
from tierflow.adapters.spec import read_spec
from tierflow.errors import UnsupportedModelError

_ROPE_TYPES = tuple(t for t in ROPE_TYPES if t != "longrope")
_EXPERT_TENSORS = ("gate_proj", "up_proj", "down_proj")


def moe_rules(style: DecoderStyle, block: str, expert_names: Mapping[str, str], shared: bool) -> tuple[NameRule, ...]:
    """The dense decoder's names, plus the router (``{block}.gate``), the routed experts
    (``{block}.experts.E.<name>``, local names gate_proj / up_proj / down_proj) and the shared
    expert (``{block}.shared_expert.*`` as shared_*, and its gate)."""
    layer = rf"model\.layers\.(\d+)\.{re.escape(block)}"
    rules = [*decoder_name_rules(style), NameRule(rf"{layer}\.gate\.weight", LAYER, "router")]
    rules += [NameRule(rf"{layer}\.experts\.(\d+)\.{re.escape(name)}\.weight", EXPERT, local)
              for name, local in expert_names.items()]
    if shared:
        rules += [NameRule(rf"{layer}\.shared_expert\.{local}\.weight", LAYER, f"shared_{local}")
                  for local in _EXPERT_TENSORS]
        rules.append(NameRule(rf"{layer}\.shared_expert_gate\.weight", LAYER, "shared_expert_gate"))
    return tuple(rules)


def sparse_layers(config: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE's MoE layers: every ``decoder_sparse_step``-th, except ``mlp_only_layers``."""
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


class MoEAdapter(DecoderAdapter):
    """A decoder whose MoE layers route each token to ``experts_per_token`` of ``num_experts``."""

    routing_in_float32 = True     # Mixtral weighs expert outputs in float32; Qwen casts to the activations'

    def feed_forward_shapes(self, spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
        if layer not in spec.moe_layers:
            return super().feed_forward_shapes(spec, layer)
        h, s = spec.hidden_size, spec.shared_expert_intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"router": (spec.num_experts, h)}
        if s:
            shapes |= {"shared_gate_proj": (s, h), "shared_up_proj": (s, h), "shared_down_proj": (h, s),
                       "shared_expert_gate": (1, h)}
        return shapes

    def expected_expert_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        h, i = spec.hidden_size, spec.moe_intermediate_size
        return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def feed_forward(self, spec: ModelSpec, layer: int, w: UnitWeights, h: torch.Tensor,
                     ctx: SweepContext) -> torch.Tensor:
        if layer not in spec.moe_layers:
            return super().feed_forward(spec, layer, w, h, ctx)
        logits = F.linear(h, w["router"])                                  # [n, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, spec.experts_per_token, dim=-1)  # [n, k]
        if spec.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if not self.routing_in_float32:
            top_w = top_w.to(logits.dtype)
        act = ACTIVATIONS[spec.hidden_act]

        def expert(e: UnitWeights, x: torch.Tensor) -> torch.Tensor:
            return F.linear(act(F.linear(x, e["gate_proj"])) * F.linear(x, e["up_proj"]), e["down_proj"])

        out = combine_experts(spec, layer, h, top_i, top_w, ctx, expert)
        if spec.shared_expert_intermediate_size:
            shared = F.linear(act(F.linear(h, w["shared_gate_proj"])) * F.linear(h, w["shared_up_proj"]),
                              w["shared_down_proj"])
            out = out + torch.sigmoid(F.linear(h, w["shared_expert_gate"])) * shared
        return out


def combine_experts(spec: ModelSpec, layer: int, h: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor,
                    ctx: SweepContext, expert: Callable[[UnitWeights, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Each token's routed experts' outputs (``expert(weights, rows)``), weighted by ``top_w`` and
    added up in ascending expert order, as transformers does. ``top_i`` / ``top_w`` [n, k]: each
    token's picks and weights. Asks ``ctx.experts`` for exactly the picked experts."""
    if ctx.experts is None:
        raise RuntimeError("a mixture-of-experts layer ran without an expert provider in its sweep context")
    slots = top_i.flatten()                      # token t's j-th pick at t * k + j
    order = torch.argsort(slots, stable=True)    # grouped by expert, tokens ascending within each
    counts = torch.zeros(spec.num_experts, dtype=torch.long, device=h.device)
    counts.scatter_add_(0, slots, torch.ones_like(slots))
    sizes = counts.tolist()                      # the layer's one wait for the device
    experts = ctx.experts(layer, [e for e, size in enumerate(sizes) if size])
    out = torch.zeros_like(h)
    groups = zip(order.div(spec.experts_per_token, rounding_mode="floor").split(sizes),
                 top_w.flatten().index_select(0, order).split(sizes))
    for index, (tokens, weight) in enumerate(groups):
        if sizes[index]:
            y = expert(experts[index], h.index_select(0, tokens))
            out.index_add_(0, tokens, (y * weight[:, None]).to(out.dtype))
    return out


def _check_moe(spec: ModelSpec) -> ModelSpec:
    if not 0 < spec.experts_per_token <= spec.num_experts:
        raise UnsupportedModelError(f"{spec.architecture}: num_experts_per_tok={spec.experts_per_token} must be "
                                    f"between 1 and the number of experts ({spec.num_experts})")
    return spec


def _every_layer_slides(window: int | None, layers: int) -> dict[str, Any]:
    return {} if not window else {"sliding_window": int(window), "layer_types": (SLIDING_ATTENTION,) * layers}


def _experts(config: Mapping[str, Any], *keys: str) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    raise UnsupportedModelError(f"config.json has none of {list(keys)}: the number of experts is unknown")


class MixtralAdapter(MoEAdapter):
    architectures = ("MixtralForCausalLM",)
    model_types = ("mixtral",)
    style = DecoderStyle()
    name_rules = moe_rules(style, "block_sparse_moe", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"},
                           shared=False)

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        layers = int(config.get("num_hidden_layers", 0))
        return _check_moe(read_spec(
            config, "Mixtral", architecture=self.architectures[0], rope_types=_ROPE_TYPES, attention_bias=False,
            mlp_bias=False, hidden_act=config.get("hidden_act", "silu"),
            num_experts=_experts(config, "num_local_experts"),
            experts_per_token=int(config.get("num_experts_per_tok", 2)),
            moe_intermediate_size=int(config["intermediate_size"]), norm_topk_prob=True,
            moe_layers=tuple(range(layers)), **_every_layer_slides(config.get("sliding_window"), layers)))


def _qwen_moe_spec(config: Mapping[str, Any], family: str, architecture: str, **features: Any) -> ModelSpec:
    """The fields Qwen2-MoE and Qwen3-MoE read alike: experts, the sparse layers, top-k."""
    layers = int(config.get("num_hidden_layers", 0))
    return _check_moe(read_spec(
        config, family, architecture=architecture, rope_types=_ROPE_TYPES, mlp_bias=False,
        hidden_act=config.get("hidden_act", "silu"),
        num_experts=_experts(config, "num_experts", "num_local_experts"),
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)), moe_layers=sparse_layers(config, layers),
        **features))


class Qwen2MoeAdapter(MoEAdapter):
    architectures = ("Qwen2MoeForCausalLM",)
    model_types = ("qwen2_moe",)
    style = DecoderStyle(qkv_bias=True)
    name_rules = moe_rules(style, "mlp", {name: name for name in _EXPERT_TENSORS}, shared=True)
    routing_in_float32 = False

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        if config.get("qkv_bias") is False:
            raise UnsupportedModelError("Qwen2-MoE without q/k/v biases (qkv_bias: false) is not supported")
        return _qwen_moe_spec(
            config, "Qwen2-MoE", self.architectures[0], attention_bias=False,
            experts_per_token=int(config.get("num_experts_per_tok", 4)),
            shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
            **qwen_layers(config, int(config.get("num_hidden_layers", 0))))


class Qwen3MoeAdapter(MoEAdapter):
    architectures = ("Qwen3MoeForCausalLM",)
    model_types = ("qwen3_moe",)
    style = DecoderStyle(qk_norm=True)
    name_rules = moe_rules(style, "mlp", {name: name for name in _EXPERT_TENSORS}, shared=False)
    routing_in_float32 = False

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        window = config.get("sliding_window") if config.get("use_sliding_window") else None
        return _qwen_moe_spec(config, "Qwen3-MoE", self.architectures[0],
                              experts_per_token=int(config.get("num_experts_per_tok", 8)),
                              **_every_layer_slides(window, int(config.get("num_hidden_layers", 0))))
