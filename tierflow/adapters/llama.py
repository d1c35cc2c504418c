"""Llama family: Llama 2 / 3 / 3.1 / 3.2 (rope_scaling "llama3" and "linear"), SmolLM2,
tied or untied embeddings, GQA or MHA, optional attention / MLP biases.

The forward functions mirror transformers' LlamaModel operation for operation (RMSNorm in
float32, rotary tables computed in float32 and cast to the activation dtype, SDPA
attention), so results match it to rounding. Sequences of one sweep are packed along the
token axis: projections and the MLP run once over all of them, attention runs per
sequence over that sequence's own KV.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from tierflow.adapters.attention import attend_blocks
from tierflow.adapters.base import EMBED, HEAD, LAYER, ModelSpec, NameRule, SweepContext, UnitWeights
from tierflow.errors import TierflowError, UnsupportedModelError

_PROJECTIONS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_NORMS = ("input_layernorm", "post_attention_layernorm")
_ROPE_TYPES = (None, "default", "linear", "llama3")


def _layer_rules() -> tuple[NameRule, ...]:
    rules = [NameRule(rf"model\.layers\.(\d+)\.{path.replace('.', chr(92) + '.')}\.{kind}", LAYER,
                      local if kind == "weight" else f"{local}.bias")
             for local, path in _PROJECTIONS.items() for kind in ("weight", "bias")]
    rules += [NameRule(rf"model\.layers\.(\d+)\.{norm}\.weight", LAYER, norm) for norm in _NORMS]
    return tuple(rules)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies (float32, CPU), with the checkpoint's rope scaling applied."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rope_config(config: Mapping[str, Any]) -> tuple[float, Mapping[str, Any] | None]:
    params = config.get("rope_parameters")
    if isinstance(params, Mapping):        # transformers >= 5 folds theta and scaling together
        kind = params.get("rope_type", params.get("type"))
        return float(params.get("rope_theta", config.get("rope_theta", 10000.0))), (
            None if kind in (None, "default") else dict(params))
    scaling = config.get("rope_scaling")
    return float(config.get("rope_theta", 10000.0)), (dict(scaling) if scaling else None)


class LlamaAdapter:
    architectures = ("LlamaForCausalLM",)
    name_rules = (NameRule(r"model\.embed_tokens\.weight", EMBED, "embed"),
                  *_layer_rules(),
                  NameRule(r"model\.norm\.weight", HEAD, "norm"),
                  NameRule(r"lm_head\.weight", HEAD, "lm_head"))
    ignored_names = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def __init__(self) -> None:
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            theta, scaling = _rope_config(config)
            eos = config.get("eos_token_id")
            spec = ModelSpec(
                architecture=config["architectures"][0], hidden_size=hidden,
                num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate_size=int(config["intermediate_size"]), vocab_size=int(config["vocab_size"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            )
        except KeyError as exc:
            raise UnsupportedModelError(f"config.json lacks the key {exc.args[0]!r} that a Llama config needs") from exc
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {config['hidden_act']!r} is not supported; Llama uses 'silu'")
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
        if kind not in _ROPE_TYPES:
            raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported; supported: "
                                        f"{[k for k in _ROPE_TYPES if k]}")
        return spec

    def expected_shapes(self, spec: ModelSpec, unit: int) -> dict[str, tuple[int, ...]]:
        h, d, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
        kind = spec.unit_kind(unit)
        if kind == EMBED:
            return {"embed": (spec.vocab_size, h)}
        if kind == HEAD:
            return {"norm": (h,), "lm_head": (spec.vocab_size, h)}
        q, kv = spec.num_heads * d, spec.num_kv_heads * d
        shapes: dict[str, tuple[int, ...]] = {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
            "input_layernorm": (h,), "post_attention_layernorm": (h,)}
        if spec.attention_bias:
            shapes |= {"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.bias": (h,)}
        if spec.mlp_bias:
            shapes |= {"gate_proj.bias": (i,), "up_proj.bias": (i,), "down_proj.bias": (h,)}
        return shapes

    def make_context(self, spec: ModelSpec, positions: torch.Tensor, seq_slices: tuple[slice, ...],
                     seq_starts: tuple[int, ...], kv: tuple[Any, ...], logit_rows: torch.Tensor,
                     dtype: torch.dtype) -> SweepContext:
        device = positions.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(spec).to(device)
        freqs = positions.float()[:, None] * self._inv_freq[device][None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return SweepContext(positions=positions, seq_slices=seq_slices, seq_starts=seq_starts, kv=kv,
                            rope=(emb.cos().to(dtype), emb.sin().to(dtype)), logit_rows=logit_rows)

    def forward_unit(self, spec: ModelSpec, unit: int, weights: UnitWeights, hidden: torch.Tensor,
                     ctx: SweepContext) -> torch.Tensor:
        kind = spec.unit_kind(unit)
        if kind == EMBED:
            return F.embedding(hidden, weights["embed"])
        if kind == HEAD:
            h = rms_norm(hidden[ctx.logit_rows], weights["norm"], spec.rms_norm_eps)
            return F.linear(h, weights["lm_head"]).float()
        return self._layer(spec, unit - 1, weights, hidden, ctx)

    def _layer(self, spec: ModelSpec, layer: int, w: UnitWeights, x: torch.Tensor,
               ctx: SweepContext) -> torch.Tensor:
        n, d = x.shape[0], spec.head_dim
        h = rms_norm(x, w["input_layernorm"], spec.rms_norm_eps)
        q = F.linear(h, w["q_proj"], w.get("q_proj.bias")).view(n, spec.num_heads, d)
        k = F.linear(h, w["k_proj"], w.get("k_proj.bias")).view(n, spec.num_kv_heads, d)
        v = F.linear(h, w["v_proj"], w.get("v_proj.bias")).view(n, spec.num_kv_heads, d)
        cos, sin = ctx.rope[0][:, None, :], ctx.rope[1][:, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        attn = torch.empty(n, spec.num_heads * d, dtype=x.dtype, device=x.device)
        for index, (rows, start, kv) in enumerate(zip(ctx.seq_slices, ctx.seq_starts, ctx.kv)):
            if index in ctx.failures:
                attn[rows] = 0
                continue
            try:
                stored = kv.append(layer, k[rows], v[rows])
                if isinstance(stored, tuple):       # the whole KV, contiguous: one fused SDPA call
                    attn[rows] = attend(q[rows], *stored, start)
                else:                               # KV blocks (paged, possibly on disk): online softmax
                    attn[rows] = attend_blocks(q[rows], stored, start)
            except TierflowError as exc:            # this sequence's KV failed (a spill fault): only it fails
                ctx.failures[index] = exc
                attn[rows] = 0
        x = x + F.linear(attn, w["o_proj"], w.get("o_proj.bias"))
        h = rms_norm(x, w["post_attention_layernorm"], spec.rms_norm_eps)
        step = ctx.mlp_chunk_tokens or n
        if step >= n:
            return x + _mlp(w, h)
        out = torch.empty_like(x)
        for start in range(0, n, step):   # bounds the [tokens, intermediate] activations
            out[start:start + step] = _mlp(w, h[start:start + step])
        return x + out


def _mlp(w: UnitWeights, h: torch.Tensor) -> torch.Tensor:
    gate = F.silu(F.linear(h, w["gate_proj"], w.get("gate_proj.bias")))
    return F.linear(gate * F.linear(h, w["up_proj"], w.get("up_proj.bias")), w["down_proj"], w.get("down_proj.bias"))


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of ``q`` [n, H, D] (positions start..start+n-1) over ``keys`` /
    ``values`` [KVH, start+n, D]; returns [n, H*D]."""
    n, num_heads, d = q.shape
    query = q.transpose(0, 1)[None]
    if n == 1 or start == 0:
        out = F.scaled_dot_product_attention(query, keys[None], values[None], is_causal=n > 1,
                                             enable_gqa=num_heads != keys.shape[0])
    else:
        q_pos = torch.arange(start, start + n, device=q.device)[:, None]
        mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= q_pos
        out = F.scaled_dot_product_attention(query, keys[None], values[None], attn_mask=mask,
                                             enable_gqa=num_heads != keys.shape[0])
    return out[0].transpose(0, 1).reshape(n, num_heads * d)
