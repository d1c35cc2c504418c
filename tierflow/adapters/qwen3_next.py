"""Qwen3-Next (``Qwen3NextForCausalLM``): a hybrid decoder of Gated DeltaNet linear attention and
gated full attention, every MLP a mixture of many small experts with a gated shared expert.

What differs from Qwen3-MoE, each as transformers' ``modeling_qwen3_next`` computes it:

- ``layer_types`` (by default three "linear_attention" layers, then one "full_attention", from
  ``full_attention_interval``) picks each layer's token mixer. A linear layer
  (``linear_attn.*``) projects q / k / v / z grouped per key head (``in_proj_qkvz``) and the
  per-value-head beta / decay inputs (``in_proj_ba``), runs a causal depthwise convolution with
  SiLU over q / k / v and the gated delta rule (``adapters.delta_rule``), normalises the output
  with a gated RMSNorm (gate z) and projects it out. Its memory of a sequence is a fixed-size
  state — the convolution's last inputs and one matrix per value head — which the sequence's KV
  handle holds (``state`` / ``set_state``): nothing grows with the context, and its KV window is
  0 tokens (``ModelSpec.window``), so no KV tier holds a block for it.
- A full-attention layer's ``q_proj`` gives each head its query and an output gate side by side
  ([heads, 2 * head_dim]); attention's output is multiplied by ``sigmoid(gate)`` before
  ``o_proj``; q and k get Qwen3's per-head RMSNorm; rotary covers ``partial_rotary_factor``
  (0.25) of each 256-dim head.
- Every RMSNorm but the gated one scales by ``1 + weight`` in float32 (Gemma's form).
- The MoE is Qwen-MoE's: softmax router in float32, top-k renormalised (``norm_topk_prob``) and
  cast to the activations' dtype, experts ``mlp.experts.E.*``, and a shared expert weighed by
  ``sigmoid(shared_expert_gate)``.
- The multi-token-prediction head (``mtp.*``) is not used: tierflow decodes one token per sweep; the
  checkpoint index ignores its tensors with a log line.

The adapter only asks the handle for the state and gives the new one back. The paged store keeps
it in pool blocks like KV (``tiers/kv/state.py``): on the device while the device pool has room,
else on host or disk, read ahead by the kv_load stage and written by the kv_spill stage
(checksummed on disk), so a sweep that computes a sequence reads its state and writes it anew; the
contiguous store keeps it in device memory. It is freed with the handle (a preempted sequence is
recomputed, its new handle's state from zeros). A state is the
sequence's whole past, not a function of a block of tokens: it cannot be rolled back (``truncate``
below it fails the sequence, ``adapters.kv.HeldState``), and the prefix cache, which restores KV
blocks, cannot serve these models (``stages/prefix.py`` refuses it by name).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from tierflow.adapters.attention import attend_kv
from tierflow.adapters.base import LAYER, ModelSpec, NameRule, SweepContext, UnitWeights
from tierflow.adapters.decoder import DecoderStyle, apply_rope
from tierflow.adapters.delta_rule import (LinearState, causal_conv, chunk_delta_rule, gated_rms_norm,
                                          recurrent_delta_rule)
from tierflow.adapters.kv import first_visible
from tierflow.adapters.moe import (_EXPERT_TENSORS, _ROPE_TYPES, MoEAdapter, _check_moe, _experts, moe_rules,
                                   sparse_layers)
from tierflow.adapters.rope import rope_config
from tierflow.adapters.spec import Key, _check_keys, read_spec
from tierflow.errors import TierflowError, UnsupportedModelError

LINEAR_ATTENTION = "linear_attention"
_FULL = "full_attention"
# local name → checkpoint path under model.layers.N.linear_attn
_LINEAR_PATHS = {"in_proj_qkvz": "in_proj_qkvz.weight", "in_proj_ba": "in_proj_ba.weight", "conv1d": "conv1d.weight",
                 "dt_bias": "dt_bias", "A_log": "A_log", "linear_norm": "norm.weight", "out_proj": "out_proj.weight"}
# the keys only this family reads, typed as ``adapters.spec`` types the shared ones
LINEAR_KEYS = {key: Key("int", 1) for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                             "linear_value_head_dim", "linear_conv_kernel_dim",
                                             "full_attention_interval")}


def qwen3_next_rules(style: DecoderStyle) -> tuple[NameRule, ...]:
    rules = list(moe_rules(style, "mlp", {name: name for name in _EXPERT_TENSORS}, shared=True))
    rules += [NameRule(rf"model\.layers\.(\d+)\.linear_attn\.{re.escape(path)}", LAYER, local)
              for local, path in _LINEAR_PATHS.items()]
    return tuple(rules)


def _layer_types(config: Mapping[str, Any], layers: int) -> tuple[str, ...]:
    types = config.get("layer_types")
    if not types:
        interval = int(config.get("full_attention_interval") or 4)
        types = [LINEAR_ATTENTION if (i + 1) % interval else _FULL for i in range(layers)]
    unknown = sorted(set(types) - {LINEAR_ATTENTION, _FULL})
    if len(types) != layers or unknown:
        raise UnsupportedModelError(f"Qwen3-Next: layer_types must list {layers} layers of {LINEAR_ATTENTION!r} or "
                                    f"{_FULL!r}, found {len(types)} layers, unknown types {unknown}")
    return tuple(types)


class Qwen3NextAdapter(MoEAdapter):
    architectures = ("Qwen3NextForCausalLM",)
    model_types = ("qwen3_next",)
    style = DecoderStyle(qk_norm=True, offset_norm=True)
    name_rules = qwen3_next_rules(style)
    ignored_names = (*MoEAdapter.ignored_names, r"mtp\..*")
    routing_in_float32 = False

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        _check_keys(config, LINEAR_KEYS, "config.json: ")
        layers = int(config.get("num_hidden_layers", 0))
        types = _layer_types(config, layers)
        params = config.get("rope_parameters") or {}
        partial = float(params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 0.25)
        if config.get("attention_bias"):
            raise UnsupportedModelError("Qwen3-Next with attention_bias: true is not supported (the published "
                                        "models have no attention biases)")
        spec = _check_moe(read_spec(
            config, "Qwen3-Next", {"head_dim": 256, "rope_theta": 10000.0, "max_position_embeddings": 32768},
            rope_types=_ROPE_TYPES, architecture=self.architectures[0], rope=rope_config(config),
            partial_rotary_factor=partial, attention_bias=False, mlp_bias=False,
            hidden_act=config.get("hidden_act", "silu"), num_experts=_experts(config, "num_experts"),
            experts_per_token=int(config.get("num_experts_per_tok", 10)),
            moe_intermediate_size=int(config.get("moe_intermediate_size") or 512),
            shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(config.get("norm_topk_prob", True)), moe_layers=sparse_layers(config, layers)))
        dims = {key: int(config.get(key) or default) for key, default in (
            ("linear_num_key_heads", 16), ("linear_num_value_heads", 32), ("linear_key_head_dim", 128),
            ("linear_value_head_dim", 128), ("linear_conv_kernel_dim", 4))}
        if dims["linear_num_value_heads"] % dims["linear_num_key_heads"]:
            raise UnsupportedModelError(f"Qwen3-Next: {dims['linear_num_value_heads']} linear value heads cannot share "
                                        f"{dims['linear_num_key_heads']} key heads")
        return replace(spec, linear_layers=tuple(i for i, t in enumerate(types) if t == LINEAR_ATTENTION),
                       linear_num_key_heads=dims["linear_num_key_heads"],
                       linear_num_value_heads=dims["linear_num_value_heads"],
                       linear_key_head_dim=dims["linear_key_head_dim"],
                       linear_value_head_dim=dims["linear_value_head_dim"],
                       linear_conv_kernel=dims["linear_conv_kernel_dim"])

    # -- shapes ------------------------------------------------------------------------------

    def expected_shapes(self, spec: ModelSpec, unit: int) -> dict[str, tuple[int, ...]]:
        if spec.unit_kind(unit) != LAYER:
            return super().expected_shapes(spec, unit)
        layer, h = unit - 1, spec.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"input_layernorm": (h,), "post_attention_layernorm": (h,)}
        if layer in spec.linear_layers:
            hk, hv = spec.linear_num_key_heads, spec.linear_num_value_heads
            dk, dv = spec.linear_key_head_dim, spec.linear_value_head_dim
            shapes |= {"in_proj_qkvz": (2 * hk * dk + 2 * hv * dv, h), "in_proj_ba": (2 * hv, h),
                       "conv1d": (spec.linear_conv_channels, 1, spec.linear_conv_kernel), "dt_bias": (hv,),
                       "A_log": (hv,), "linear_norm": (dv,), "out_proj": (h, hv * dv)}
        else:
            q, kv, d = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.head_dim
            shapes |= {"q_proj": (2 * q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                       "q_norm": (d,), "k_norm": (d,)}
        return shapes | self.feed_forward_shapes(spec, layer)

    # -- forward -----------------------------------------------------------------------------

    def attention(self, spec: ModelSpec, layer: int, w: UnitWeights, h: torch.Tensor,
                  ctx: SweepContext) -> torch.Tensor:
        if layer in spec.linear_layers:
            return self.linear_attention(spec, layer, w, h, ctx)
        n, d, heads = h.shape[0], spec.head_dim, spec.num_heads
        q, gate = F.linear(h, w["q_proj"]).view(n, heads, 2 * d).chunk(2, dim=-1)
        gate = gate.reshape(n, heads * d)
        q = self.norm(spec, q, w["q_norm"])
        k = self.norm(spec, F.linear(h, w["k_proj"]).view(n, spec.num_kv_heads, d), w["k_norm"])
        v = F.linear(h, w["v_proj"]).view(n, spec.num_kv_heads, d)
        cos, sin = ctx.rope[0][:, None, :], ctx.rope[1][:, None, :]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attn = torch.zeros(n, heads * d, dtype=h.dtype, device=h.device)
        for index, (rows, start, kv) in enumerate(zip(ctx.seq_slices, ctx.seq_starts, ctx.kv)):
            if index in ctx.refused or kv.failure is not None:
                continue
            try:
                kv.append(layer, k[rows], v[rows])
                attn[rows] = attend_kv(q[rows], kv.blocks(layer, first_visible(start, None)), start)
            except TierflowError as exc:            # this sequence's KV failed (a spill fault): only it fails
                kv.fail(exc)
                attn[rows] = 0
        return F.linear(attn * torch.sigmoid(gate), w["o_proj"])

    def linear_attention(self, spec: ModelSpec, layer: int, w: UnitWeights, h: torch.Tensor,
                         ctx: SweepContext) -> torch.Tensor:
        """Gated DeltaNet over the packed tokens: projections once, then per sequence the
        convolution and the delta rule from that sequence's own state."""
        n = h.shape[0]
        hk, hv = spec.linear_num_key_heads, spec.linear_num_value_heads
        dk, dv, group = spec.linear_key_head_dim, spec.linear_value_head_dim, hv // hk
        qkvz = F.linear(h, w["in_proj_qkvz"]).view(n, hk, 2 * dk + 2 * group * dv)
        q, k, v, z = torch.split(qkvz, [dk, dk, group * dv, group * dv], dim=-1)
        b, a = torch.split(F.linear(h, w["in_proj_ba"]).view(n, hk, 2 * group), [group, group], dim=-1)
        mixed = torch.cat((q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)), dim=-1).t()   # [channels, n]
        beta = b.reshape(n, hv).sigmoid()
        g = -w["A_log"].float().exp() * F.softplus(a.reshape(n, hv).float() + w["dt_bias"])
        conv_weight = w["conv1d"][:, 0]
        out = torch.zeros(n, hv, dv, dtype=h.dtype, device=h.device)
        for index, (rows, kv) in enumerate(zip(ctx.seq_slices, ctx.kv)):
            if index in ctx.refused or kv.failure is not None:
                continue
            try:
                state = kv.state(layer)
            except TierflowError as exc:            # this sequence's state is unusable: only it fails
                kv.fail(exc)
                continue
            tokens = rows.stop - rows.start
            x, conv = causal_conv(mixed[:, rows], conv_weight, None if state is None else state[0])
            qs, ks, vs = torch.split(x.t(), [hk * dk, hk * dk, hv * dv], dim=-1)
            rule = recurrent_delta_rule if state is not None and tokens == 1 else chunk_delta_rule
            out[rows], recurrent = rule(qs.reshape(tokens, hk, dk), ks.reshape(tokens, hk, dk),
                                        vs.reshape(tokens, hv, dv), g[rows], beta[rows],
                                        None if state is None else state[1])
            try:
                kv.set_state(layer, LinearState(conv, recurrent), tokens)
            except TierflowError as exc:            # no block for the new state (or its commit failed)
                kv.fail(exc)
        normed = gated_rms_norm(out.reshape(n * hv, dv), z.reshape(n * hv, dv), w["linear_norm"], spec.rms_norm_eps)
        return F.linear(normed.reshape(n, hv * dv), w["out_proj"])
