"""gpt-oss (``GptOssForCausalLM``): a mixture-of-experts decoder with attention sinks, YaRN rope,
layers alternating a sliding window and full attention, and experts stored in MXFP4.

What differs from the other MoE families, each as transformers' ``modeling_gpt_oss`` computes it:

- Attention has biases on q, k, v and o, and a learned *sink* per query head
  (``self_attn.sinks``): one more logit in every softmax row, whose probability is dropped.
  The decoder passes it to ``attend_kv``, which folds it into whichever kernel runs (the online
  softmax over blocks on every KV tier, the key tiles, flash-attn through its log-sum-exp).
- Rope is YaRN (``adapters.rope``); ``layer_types`` alternates "sliding_attention" (a window of
  ``sliding_window`` keys) and "full_attention", and the paged KV store keeps a sliding layer's
  ring within its window.
- The RMSNorm multiplies its weight into the float32 normalised activations before casting
  (Llama's casts first).
- The router is a linear layer with a bias; each token takes the top-k *logits* and softmaxes
  those k alone, in the activation dtype.
- An expert is ``gate_up_proj`` [hidden, 2 * intermediate] (gate and up interleaved: even
  columns gate, odd columns up) and ``down_proj`` [intermediate, hidden], each with a bias,
  applied as ``x @ W + b``; its activation is the clamped gated one: gate clamped above at
  ``swiglu_limit``, up clamped to ±limit, ``(up + 1) * gate * sigmoid(alpha * gate)``.
- The checkpoint stacks a layer's experts in one tensor per weight (``mlp.experts.gate_up_proj``
  [experts, ...]); the checkpoint index reads each expert's slice as its own unit. With
  ``quantization_config.quant_method = "mxfp4"`` the expert weights are ``*_blocks`` and
  ``*_scales`` [experts, out, in / 32, (16)] (uint8): they are read as they are, kept packed in the
  expert cache (a quarter of the bf16 bytes, so four times the experts fit), and dequantized
  (``adapters.mxfp4``) on the compute device right before their matmuls. Attention, router,
  embedding and head stay in the float dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from tierflow.adapters.base import EXPERTS, LAYER, SLIDING_ATTENTION, ModelSpec, NameRule, SweepContext, UnitWeights
from tierflow.adapters.decoder import DecoderAdapter, DecoderStyle, decoder_name_rules
from tierflow.adapters.moe import _check_moe, combine_experts
from tierflow.adapters.mxfp4 import BLOCK, dequantize
from tierflow.adapters.rope import ROPE_TYPES
from tierflow.adapters.spec import read_spec
from tierflow.errors import UnsupportedModelError

MXFP4 = "mxfp4"
_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_LAYER = r"model\.layers\.(\d+)"


def gpt_oss_rules() -> tuple[NameRule, ...]:
    """The dense decoder's names, the sinks, the router and the stacked experts (float or MXFP4)."""
    rules = [*decoder_name_rules(DecoderStyle()),
             NameRule(rf"{_LAYER}\.self_attn\.sinks", LAYER, "sinks"),
             NameRule(rf"{_LAYER}\.mlp\.router\.weight", LAYER, "router"),
             NameRule(rf"{_LAYER}\.mlp\.router\.bias", LAYER, "router.bias")]
    for name in _EXPERT_WEIGHTS:
        rules += [NameRule(rf"{_LAYER}\.mlp\.experts\.{name}{suffix}", EXPERTS, f"{name}{suffix}")
                  for suffix in ("", "_bias", "_blocks", "_scales")]
    return tuple(rules)


def _expert_format(config: Mapping[str, Any]) -> str:
    quantization = config.get("quantization_config") or {}
    method = quantization.get("quant_method")
    if method is None:
        return ""
    if method != MXFP4:
        raise UnsupportedModelError(f"gpt-oss with quantization_config.quant_method={method!r} is not supported; "
                                    "tierflow reads the experts in bf16/fp32 or as published in MXFP4")
    return MXFP4


class GptOssAdapter(DecoderAdapter):
    architectures = ("GptOssForCausalLM",)
    model_types = ("gpt_oss",)
    style = DecoderStyle()
    name_rules = gpt_oss_rules()

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec:
        layers = int(config.get("num_hidden_layers", 0))
        window = config.get("sliding_window")
        types = config.get("layer_types") or [SLIDING_ATTENTION if i % 2 == 0 else "full_attention"
                                              for i in range(layers)]
        spec = _check_moe(read_spec(
            config, "gpt-oss", {"rope_theta": 150000.0, "head_dim": 64, "rms_norm_eps": 1e-5,
                                "max_position_embeddings": 131072, "attention_bias": True},
            rope_types=ROPE_TYPES, architecture=self.architectures[0], mlp_bias=False,
            hidden_act="silu", num_experts=int(config.get("num_local_experts") or config.get("num_experts") or 0),
            experts_per_token=int(config.get("num_experts_per_tok", 4)),
            moe_intermediate_size=int(config["intermediate_size"]), moe_layers=tuple(range(layers)),
            sliding_window=None if window is None else int(window),
            layer_types=tuple(types) if window is not None else (),
            expert_format=_expert_format(config), attention_sinks=True,
            # the published checkpoints name no dtype in config.json and hold their float tensors in bf16
            checkpoint_dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            swiglu_limit=float(config.get("swiglu_limit") or 7.0), swiglu_alpha=float(config.get("swiglu_alpha") or 1.702)))
        if spec.expert_format == MXFP4 and (spec.hidden_size % BLOCK or spec.moe_intermediate_size % BLOCK):
            raise UnsupportedModelError(f"gpt-oss in MXFP4 needs hidden_size and intermediate_size divisible by "
                                        f"{BLOCK}, got {spec.hidden_size} and {spec.moe_intermediate_size}")
        return spec

    # -- shapes ------------------------------------------------------------------------------

    def expected_shapes(self, spec: ModelSpec, unit: int) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(spec, unit)
        if spec.unit_kind(unit) == LAYER:
            shapes["sinks"] = (spec.num_heads,)
        return shapes

    def feed_forward_shapes(self, spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
        if layer not in spec.moe_layers:      # a dense layer of one expert's form (the probe times layers so)
            h, i = spec.hidden_size, spec.intermediate_size
            return {"gate_up_proj": (h, 2 * i), "gate_up_proj_bias": (2 * i,), "down_proj": (i, h),
                    "down_proj_bias": (h,)}
        return {"router": (spec.num_experts, spec.hidden_size), "router.bias": (spec.num_experts,)}

    def expected_expert_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        h, i = spec.hidden_size, spec.moe_intermediate_size
        shapes: dict[str, tuple[int, ...]] = {"gate_up_proj_bias": (2 * i,), "down_proj_bias": (h,)}
        if spec.expert_format == MXFP4:       # [out, in / 32, 16] and [out, in / 32]
            return shapes | {"gate_up_proj_blocks": (2 * i, h // BLOCK, BLOCK // 2),
                             "gate_up_proj_scales": (2 * i, h // BLOCK),
                             "down_proj_blocks": (h, i // BLOCK, BLOCK // 2), "down_proj_scales": (h, i // BLOCK)}
        return shapes | {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}

    # -- forward -----------------------------------------------------------------------------

    def norm(self, spec: ModelSpec, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps)
        return (weight * h).to(x.dtype)

    def feed_forward(self, spec: ModelSpec, layer: int, w: UnitWeights, h: torch.Tensor,
                     ctx: SweepContext) -> torch.Tensor:
        if layer not in spec.moe_layers:
            return self.expert(spec, w, h)
        logits = F.linear(h, w["router"], w["router.bias"])                 # [n, E]
        top_logits, top_i = torch.topk(logits, spec.experts_per_token, dim=-1)
        top_w = F.softmax(top_logits, dim=-1, dtype=top_logits.dtype)        # over the k picked, in h's dtype
        return combine_experts(spec, layer, h, top_i, top_w, ctx, lambda e, x: self.expert(spec, e, x))

    def expert(self, spec: ModelSpec, e: UnitWeights, x: torch.Tensor) -> torch.Tensor:
        """One expert over its tokens ``x`` [t, hidden]: the gated MLP with its clamps."""
        gate_up = x @ _weight(e, "gate_up_proj", x.dtype) + e["gate_up_proj_bias"]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        limit = spec.swiglu_limit
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        glu = gate * torch.sigmoid(gate * spec.swiglu_alpha)
        return ((up + 1) * glu) @ _weight(e, "down_proj", x.dtype) + e["down_proj_bias"]


def _weight(e: UnitWeights, name: str, dtype: torch.dtype) -> torch.Tensor:
    """An expert's weight as [in, out]: the float tensor, or its MXFP4 blocks dequantized here,
    on the compute device ([out, in] unpacked, used transposed)."""
    if name in e:
        return e[name]
    return dequantize(e[f"{name}_blocks"], e[f"{name}_scales"], dtype).t()
