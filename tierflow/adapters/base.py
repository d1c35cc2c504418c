"""What every model family provides: a ModelSpec from config.json, a name table that
maps checkpoint tensors to units, and pure forward functions.

A *unit* is what the pipeline moves and computes as one piece: unit 0 is the token
embedding, units 1..L the decoder layers, unit L+1 the final norm and LM head. An
adapter never does I/O and never decides placement: its forward functions receive the
unit's weights (a dict of local names to tensors) and the activations, and return
activations. That is what lets the same adapter run resident, streamed from disk, or
on a GPU fed by a copy stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from tierflow.adapters.kv import AttentionKV
from tierflow.adapters.tree import DeviceTree

UnitWeights = Mapping[str, torch.Tensor]

EMBED = "embed"
LAYER = "layer"
HEAD = "head"
EXPERT = "expert"          # a routed expert of a mixture-of-experts layer: read only when picked
EXPERTS = "experts"        # one tensor holding every routed expert of a layer, stacked along dim 0 (gpt-oss)
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LINEAR_CHUNK_TOKENS = 64      # the chunked delta rule's chunk (transformers'; delta_rule.CHUNK_TOKENS)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape of a model, from config.json alone (planning needs no weights)."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    checkpoint_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Optional features of some families; the defaults describe a plain Llama-style decoder.
    layer_types: tuple[str, ...] = ()            # per layer: FULL_ATTENTION or SLIDING_ATTENTION; () = all full
    sliding_window: int | None = None            # keys a sliding layer's query sees, itself included
    attention_scale: float | None = None         # softmax scale of q·k; None = head_dim ** -0.5
    attn_logit_softcap: float | None = None      # scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcap: float | None = None     # the same on the LM head's logits
    partial_rotary_factor: float = 1.0           # fraction of each head's dims that rotary rotates
    rope_local_theta: float | None = None        # rope base of sliding layers when it differs (Gemma 3)
    hidden_act: str = "silu"                     # the MLP's gate activation
    # Mixture of experts: the MoE layers' MLP is a router over ``num_experts`` experts (each its
    # own unit in the checkpoint index, not part of the sweep) plus an optional shared expert.
    num_experts: int = 0                         # routed experts per MoE layer; 0: a dense model
    experts_per_token: int = 0                   # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0               # one expert's MLP width
    shared_expert_intermediate_size: int = 0     # the shared expert's width; 0: none
    norm_topk_prob: bool = False                 # renormalise the top-k routing weights to sum to 1
    moe_layers: tuple[int, ...] = ()             # the layers (0-based) whose MLP is a mixture of experts
    expert_format: str = ""                      # "": experts in the checkpoint's float dtype; "mxfp4": packed
    attention_sinks: bool = False                # a learned logit per query head joins every softmax row (gpt-oss)
    swiglu_limit: float | None = None            # gpt-oss's clamped gated activation: its clamp ...
    swiglu_alpha: float = 1.702                  # ... and its sigmoid gain
    # Hybrid linear attention (Qwen3-Next): the layers in ``linear_layers`` mix tokens with Gated
    # DeltaNet, a fixed-size state per sequence (``linear_state_bytes``) in place of growing KV.
    linear_layers: tuple[int, ...] = ()          # the layers (0-based) of linear attention
    linear_num_key_heads: int = 0                # their query / key heads ...
    linear_num_value_heads: int = 0              # ... and value heads
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0                  # the causal convolution's width over q / k / v

    @property
    def linear_conv_channels(self) -> int:
        """Channels of a linear layer's convolution: its queries, keys and values."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim

    def linear_workspace_bytes(self, dtype_bytes: int) -> int:
        """Bytes one prefill token takes in a linear layer's workspace (``delta_rule``): float32
        per value head, the queries and keys (repeated per group, normalised, scaled, decayed:
        7 key_dim in all) and the values (4 value_dim: the values, beta-weighted, solved, the
        output) and its rows of the chunk's three CHUNK x CHUNK matrices (decay, system, intra);
        in the activation dtype, the projections, the convolution's input and output and the
        output before its norm."""
        hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
        dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
        float32 = 4 * hv * (7 * dk + 4 * dv + 3 * LINEAR_CHUNK_TOKENS)
        return float32 + dtype_bytes * (2 * self.linear_conv_channels + 2 * hk * dk + 3 * hv * dv)

    def linear_state_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one sequence's state in one linear layer: the convolution's last inputs in the
        activation dtype and the float32 delta-rule matrix of every value head."""
        conv = self.linear_conv_channels * self.linear_conv_kernel * dtype_bytes
        return conv + 4 * self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim

    @property
    def num_units(self) -> int:
        return self.num_layers + 2

    def unit_kind(self, unit: int) -> str:
        if unit == 0:
            return EMBED
        return HEAD if unit == self.num_layers + 1 else LAYER

    def unit_name(self, unit: int) -> str:
        kind = self.unit_kind(unit)
        return f"layer.{unit - 1}" if kind == LAYER else kind

    def expert_name(self, layer: int, expert: int) -> str:
        return f"layer.{layer}.expert.{expert}"

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (0-based), or None if it sees all keys;
        0 for a linear-attention layer, which keeps no keys at all (so the KV layout, the paged
        store and the planner hold no block for it)."""
        if layer in self.linear_layers:
            return 0
        if self.sliding_window is None or not self.layer_types:
            return None
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None


@dataclass(frozen=True, slots=True)
class NameRule:
    """Maps checkpoint names matching ``pattern`` to (unit, local name).

    ``unit`` is "embed", "layer" (the first regex group is the layer index), "head",
    "expert" (groups: layer index, expert index; see ``match_expert``) or "experts" (one group,
    the layer index: a tensor whose dim 0 runs over the layer's experts, each expert's slice a
    contiguous byte range of it, which the checkpoint index reads as that expert's own tensor).
    """

    pattern: str
    unit: str
    local: str

    def match(self, name: str, num_layers: int) -> tuple[int, str] | None:
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return None
        if self.unit == EMBED:
            return 0, self.local
        if self.unit == HEAD:
            return num_layers + 1, self.local
        return 1 + _index(m.group(1)), self.local

    def match_expert(self, name: str) -> tuple[int, int, str] | None:
        """(layer, expert, local name) of a routed expert's tensor, for an "expert" rule; for an
        "experts" rule, (layer, -1, local name): every expert's slice of the tensor."""
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return None
        return _index(m.group(1)), (-1 if self.unit == EXPERTS else _index(m.group(2))), self.local


def _index(digits: str) -> int:
    """A layer or expert index of a tensor name; a longer one than any model has (and than
    ``int()`` parses: 4300 digits) reads as 10**18, which every range check rejects."""
    return int(digits) if len(digits) <= 18 else 10**18


@dataclass(frozen=True, slots=True)
class SweepContext:
    """Per-sweep inputs shared by every unit: packed positions, per-sequence slices,
    rotary tables and the KV handles. Built once per sweep by the adapter."""

    positions: torch.Tensor                      # [num_tokens] int64, on the device
    seq_slices: tuple[slice, ...]                # the tokens of each sequence in the packed batch
    seq_starts: tuple[int, ...]                  # position of each sequence's first token in this sweep
    kv: tuple[AttentionKV, ...]                     # one KV handle per sequence
    rope: tuple[torch.Tensor, torch.Tensor]      # cos, sin: [num_tokens, rotary dims]
    logit_rows: torch.Tensor                     # rows of the packed batch whose logits are wanted
    mlp_chunk_tokens: int | None = None          # MLP intermediates this many tokens at a time (None: all)
    # Sequences the adapter refuses before computing anything (index → why), e.g. a longrope
    # sequence crossing its scaling threshold. Read-only: faults found during the sweep are
    # recorded on the sequence's KV handle (``kv.fail``), and the sweep runner reports both.
    refused: Mapping[int, BaseException] = field(default_factory=dict)
    rope_local: tuple[torch.Tensor, torch.Tensor] | None = None   # cos, sin of sliding layers, when they differ
    # MoE: ``experts(layer, expert_ids)`` returns those experts' weights ({id: weights}); the
    # expert stage reads or finds them, the adapter only asks for the ones its router picked.
    experts: Callable[[int, Sequence[int]], Mapping[int, UnitWeights]] | None = None
    # Speculative decoding: the candidate tree of a sequence's chunk (index → its mask on the
    # device), for sequences whose chunk is a tree rather than a causal run (``adapters/tree.py``).
    trees: Mapping[int, DeviceTree] = field(default_factory=dict)


class Adapter(Protocol):
    """A model family: data (name rules, expected shapes) plus pure forward functions."""

    architectures: tuple[str, ...]
    model_types: tuple[str, ...]                 # config.json's model_type of these architectures
    name_rules: tuple[NameRule, ...]
    ignored_names: tuple[str, ...]               # regexes of checkpoint tensors nobody needs

    def spec_from_config(self, config: Mapping[str, Any]) -> ModelSpec: ...

    def expected_shapes(self, spec: ModelSpec, unit: int) -> dict[str, tuple[int, ...]]: ...

    def expected_expert_shapes(self, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
        """One routed expert's tensors (mixture-of-experts families only)."""
        ...

    def make_context(self, spec: ModelSpec, positions: torch.Tensor, seq_slices: tuple[slice, ...],
                     seq_starts: tuple[int, ...], kv: tuple[AttentionKV, ...], logit_rows: torch.Tensor,
                     dtype: torch.dtype) -> SweepContext: ...

    def forward_unit(self, spec: ModelSpec, unit: int, weights: UnitWeights, hidden: torch.Tensor,
                     ctx: SweepContext) -> torch.Tensor: ...
