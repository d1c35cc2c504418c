"""The decoder shared by the dense families: a table of what differs (``DecoderStyle``), one
generic name table built from it, and the forward functions of every unit.

A family is its architectures, a ``DecoderStyle`` (fused projections, q/k norms, Gemma's
norms and scaled embedding, ...) and a ``spec_from_config`` that reads its config.json keys
into a ``ModelSpec`` (with ``adapters.spec.read_spec``); everything else lives here. The
forward functions mirror transformers operation for operation (RMSNorm in float32, rotary
tables in float32 cast to the activation dtype, SDPA attention), so results match it to
rounding. Sequences of one sweep are packed along the token axis: projections and the MLP
run once over all of them, attention runs per sequence over that sequence's own KV: the
handle (``adapters.kv.AttentionKV``, whatever stores it) stores the new keys and values and
gives the blocks from the first one the layer's sliding window still sees, and
``attention.attend_kv`` picks the kernel from their shape (one SDPA call, or the online
softmax over blocks), with the layer's window and soft-cap. Moving blocks between tiers is
the kv stages' business, not the adapter's.

Families with another feed-forward (mixtures of experts) subclass ``DecoderAdapter`` and
override ``feed_forward`` and ``feed_forward_shapes``; attention, norms and the name table
stay shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from tierflow.adapters.attention import attend_kv
from tierflow.adapters.base import EMBED, HEAD, LAYER, SLIDING_ATTENTION, ModelSpec, NameRule, SweepContext, UnitWeights
from tierflow.adapters.rope import RopeTables, longrope_crossings
from tierflow.errors import TierflowError
from tierflow.adapters.kv import AttentionKV, first_visible

# local name -> checkpoint path under model.layers.N (projections may also carry a .bias)
LAYER_PATHS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "qkv_proj": "self_attn.qkv_proj", "o_proj": "self_attn.o_proj",
    "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
    "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "gate_up_proj": "mlp.gate_up_proj",
    "down_proj": "mlp.down_proj",
    "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
    "pre_feedforward_layernorm": "pre_feedforward_layernorm",
    "post_feedforward_layernorm": "post_feedforward_layernorm",
}
ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True, slots=True)
class DecoderStyle:
    """How a family's layers differ from Llama's (constant per family, not per checkpoint)."""

    qkv_bias: bool = False           # q/k/v projections have biases, o_proj none (Qwen2)
    fused_qkv: bool = False          # one qkv_proj: rows q, then k, then v (Phi-3)
    fused_gate_up: bool = False      # one gate_up_proj: rows gate, then up (Phi-3)
    qk_norm: bool = False            # RMSNorm of each query/key head before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False     # norms after attention and around the MLP (Gemma 2 / 3)
    offset_norm: bool = False        # RMSNorm scales by (1 + weight), in float32 (Gemma)
    scaled_embedding: bool = False   # embeddings times sqrt(hidden_size) in the activation dtype (Gemma)

    def layer_tensors(self) -> tuple[str, ...]:
        names = ["qkv_proj"] if self.fused_qkv else ["q_proj", "k_proj", "v_proj"]
        names += ["o_proj", "down_proj", "input_layernorm", "post_attention_layernorm"]
        names += ["gate_up_proj"] if self.fused_gate_up else ["gate_proj", "up_proj"]
        names += ["q_norm", "k_norm"] if self.qk_norm else []
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if self.sandwich_norms else []
        return tuple(names)


def decoder_name_rules(style: DecoderStyle) -> tuple[NameRule, ...]:
    """The checkpoint names of a family in the Hugging Face layout, as data."""
    rules = [NameRule(r"model\.embed_tokens\.weight", EMBED, "embed")]
    for local in style.layer_tensors():
        path = rf"model\.layers\.(\d+)\.{re.escape(LAYER_PATHS[local])}"
        rules.append(NameRule(rf"{path}\.weight", LAYER, local))
        if local.endswith("_proj"):
            rules.append(NameRule(rf"{path}\.bias", LAYER, f"{local}.bias"))
    rules += [NameRule(r"model\.norm\.weight", HEAD, "norm"), NameRule(r"lm_head\.weight", HEAD, "lm_head")]
    return tuple(rules)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def offset_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalise and scale by (1 + weight) in float32, then cast."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of ``x`` [n, heads, D]; the rest pass through."""
    dims = cos.shape[-1]
    if dims == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :dims], x[..., dims:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


class DecoderAdapter:
    """A dense decoder family. Subclasses set ``architectures``, ``model_types`` (config.json's
    ``model_type`` of those architectures), ``style`` (and from them ``name_rules``) and
    implement ``spec_from_config``."""

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    style = DecoderStyle()
    name_rules: tuple[NameRule, ...] = decoder_name_rules(DecoderStyle())
    ignored_names: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def __init__(self) -> None:
        self._rope = RopeTables()

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        raise NotImplementedError

    # -- shapes ------------------------------------------------------------------------------

    def expected_shapes(self, spec: ModelSpec, unit: int) -> dict[str, tuple[int, ...]]:
        h, d = spec.hidden_size, spec.head_dim
        kind = spec.unit_kind(unit)
        if kind == EMBED:
            return {"embed": (spec.vocab_size, h)}
        if kind == HEAD:
            return {"norm": (h,), "lm_head": (spec.vocab_size, h)}
        q, kv = spec.num_heads * d, spec.num_kv_heads * d
        style = self.style
        shapes: dict[str, tuple[int, ...]] = {"o_proj": (h, q), "input_layernorm": (h,),
                                              "post_attention_layernorm": (h,)}
        projections = {"qkv_proj": q + 2 * kv} if style.fused_qkv else {"q_proj": q, "k_proj": kv, "v_proj": kv}
        shapes |= {name: (rows, h) for name, rows in projections.items()}
        if spec.attention_bias or style.qkv_bias:
            shapes |= {f"{name}.bias": (rows,) for name, rows in projections.items()}
        if spec.attention_bias:
            shapes["o_proj.bias"] = (h,)
        if style.qk_norm:
            shapes |= {"q_norm": (d,), "k_norm": (d,)}
        if style.sandwich_norms:
            shapes |= {"pre_feedforward_layernorm": (h,), "post_feedforward_layernorm": (h,)}
        return shapes | self.feed_forward_shapes(spec, unit - 1)

    def feed_forward_shapes(self, spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
        h, i = spec.hidden_size, spec.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"down_proj": (h, i)}
        ups = {"gate_up_proj": 2 * i} if self.style.fused_gate_up else {"gate_proj": i, "up_proj": i}
        shapes |= {name: (rows, h) for name, rows in ups.items()}
        if spec.mlp_bias:
            shapes |= {f"{name}.bias": (rows,) for name, rows in ups.items()} | {"down_proj.bias": (h,)}
        return shapes

    # -- forward -----------------------------------------------------------------------------

    def make_context(self, spec: ModelSpec, positions: torch.Tensor, seq_slices: tuple[slice, ...],
                     seq_starts: tuple[int, ...], kv: tuple[AttentionKV, ...], logit_rows: torch.Tensor,
                     dtype: torch.dtype) -> SweepContext:
        rope = self._rope.tables(spec, positions, seq_slices, seq_starts, dtype)
        local = None
        if spec.rope_local_theta is not None:
            local = self._rope.tables(spec, positions, seq_slices, seq_starts, dtype, local=True)
        return SweepContext(positions=positions, seq_slices=seq_slices, seq_starts=seq_starts, kv=kv,
                            rope=rope, logit_rows=logit_rows, rope_local=local,
                            refused=MappingProxyType(longrope_crossings(spec, seq_slices, seq_starts)))

    def forward_unit(self, spec: ModelSpec, unit: int, weights: UnitWeights, hidden: torch.Tensor,
                     ctx: SweepContext) -> torch.Tensor:
        kind = spec.unit_kind(unit)
        if kind == EMBED:
            x = F.embedding(hidden, weights["embed"])
            if self.style.scaled_embedding:   # the scale is rounded to the weights' dtype first, as in transformers
                x = x * torch.tensor(spec.hidden_size ** 0.5).to(weights["embed"].dtype)
            return x
        if kind == HEAD:
            logits = F.linear(self.norm(spec, hidden[ctx.logit_rows], weights["norm"]), weights["lm_head"])
            if spec.final_logit_softcap is not None:
                logits = torch.tanh(logits / spec.final_logit_softcap) * spec.final_logit_softcap
            return logits.float()
        return self.layer(spec, unit - 1, weights, hidden, ctx)

    def norm(self, spec: ModelSpec, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return (offset_rms_norm if self.style.offset_norm else rms_norm)(x, weight, spec.rms_norm_eps)

    def layer(self, spec: ModelSpec, layer: int, w: UnitWeights, x: torch.Tensor, ctx: SweepContext) -> torch.Tensor:
        sandwich = self.style.sandwich_norms
        out = self.attention(spec, layer, w, self.norm(spec, x, w["input_layernorm"]), ctx)
        if sandwich:
            out = self.norm(spec, out, w["post_attention_layernorm"])
        x = x + out
        h = self.norm(spec, x, w["pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"])
        n = x.shape[0]
        step = ctx.mlp_chunk_tokens or n
        if step >= n:
            out = self.feed_forward(spec, layer, w, h, ctx)
        else:
            out = torch.empty_like(x)
            for start in range(0, n, step):   # bounds the [tokens, intermediate] activations
                out[start:start + step] = self.feed_forward(spec, layer, w, h[start:start + step], ctx)
        if sandwich:
            out = self.norm(spec, out, w["post_feedforward_layernorm"])
        return x + out

    def feed_forward(self, spec: ModelSpec, layer: int, w: UnitWeights, h: torch.Tensor,
                     ctx: SweepContext) -> torch.Tensor:
        act = ACTIVATIONS[spec.hidden_act]
        if self.style.fused_gate_up:
            gate, up = F.linear(h, w["gate_up_proj"], w.get("gate_up_proj.bias")).chunk(2, dim=-1)
        else:
            gate = F.linear(h, w["gate_proj"], w.get("gate_proj.bias"))
            up = F.linear(h, w["up_proj"], w.get("up_proj.bias"))
        return F.linear(act(gate) * up, w["down_proj"], w.get("down_proj.bias"))

    def attention(self, spec: ModelSpec, layer: int, w: UnitWeights, h: torch.Tensor,
                  ctx: SweepContext) -> torch.Tensor:
        n, d = h.shape[0], spec.head_dim
        q_rows, kv_rows = spec.num_heads * d, spec.num_kv_heads * d
        if self.style.fused_qkv:
            qkv = F.linear(h, w["qkv_proj"], w.get("qkv_proj.bias"))
            q, k, v = qkv[:, :q_rows], qkv[:, q_rows:q_rows + kv_rows], qkv[:, q_rows + kv_rows:]
        else:
            q = F.linear(h, w["q_proj"], w.get("q_proj.bias"))
            k = F.linear(h, w["k_proj"], w.get("k_proj.bias"))
            v = F.linear(h, w["v_proj"], w.get("v_proj.bias"))
        q = q.reshape(n, spec.num_heads, d)
        k, v = k.reshape(n, spec.num_kv_heads, d), v.reshape(n, spec.num_kv_heads, d)
        if self.style.qk_norm:
            q, k = self.norm(spec, q, w["q_norm"]), self.norm(spec, k, w["k_norm"])
        window = spec.window(layer)
        sliding = bool(spec.layer_types) and spec.layer_types[layer] == SLIDING_ATTENTION
        cos, sin = ctx.rope_local if sliding and ctx.rope_local is not None else ctx.rope
        cos, sin = cos[:, None, :], sin[:, None, :]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        options: dict[str, Any] = dict(scale=spec.attention_scale, window=window, softcap=spec.attn_logit_softcap)
        if spec.attention_sinks:
            options["sinks"] = w["sinks"]
        attn = torch.empty(n, spec.num_heads * d, dtype=h.dtype, device=h.device)
        for index, (rows, start, kv) in enumerate(zip(ctx.seq_slices, ctx.seq_starts, ctx.kv)):
            if index in ctx.refused or kv.failure is not None:
                attn[rows] = 0
                continue
            try:
                kv.append(layer, k[rows], v[rows])
                attn[rows] = attend_kv(q[rows], kv.blocks(layer, first_visible(start, window)), start,
                                       tree=ctx.trees.get(index), **options)
            except TierflowError as exc:            # this sequence's KV failed (a spill fault): only it fails
                kv.fail(exc)
                attn[rows] = 0
        return F.linear(attn, w["o_proj"], w.get("o_proj.bias"))
