"""What a model costs to hold and to run.

``ModelCosts`` is built from config.json alone (or, when the checkpoint is at hand, from
its real byte ranges): bytes per unit on disk and in the compute dtype, weights multiplied
per token, KV bytes per token per layer. ``timing.sweep_times`` turns a placement into
predicted seconds per resource; the routed experts' costs are ``experts.ExpertCosts``, and
read sizes are ``reads``'s. Pure: no torch, no I/O.

Sliding-window layers (``ModelCosts.windows``) are bounded by their window: the paged store
keeps a ring of blocks per such layer (``tiers/kv/layout.py``, whose arithmetic the planner
shares), so a sequence holds ``kv_blocks`` — every block of a full-attention layer, a ring's
peak (during a prefill chunk) of a windowed one — and a query reads at most a window's keys.
A linear-attention layer (window 0) keeps no keys; its fixed-size state per sequence
(``ModelCosts.state_bytes`` over all such layers, the same at any context) lives in pool blocks
like KV (``state_blocks`` per layer, whole blocks), which ``kv_blocks`` counts through the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tierflow.errors import ConfigError
from tierflow.tiers.kv.layout import ContiguousLayout, KVLayout
from tierflow.tiers.plan.experts import ExpertCosts, expert_costs
# the KV loader and the paged store import KV_READ_RUN and kv_read_window from here
from tierflow.tiers.plan.reads import ALIGN, KV_READ_RUN, kv_read_window  # noqa: F401

EMBED, LAYER, HEAD = "embed", "layer", "head"
DEVICE, HOST, DISK = "device", "host", "disk"
ATTENTION_KEY_TILE = 512
# attention merges a run of KV blocks stored back to back in one step for calls of at most this
# many queries, in a workspace of at most this many bytes (adapters/block_runs.py)
ATTENTION_GROUP_QUERIES, ATTENTION_GROUP_BYTES = 16, 1 << 20


@dataclass(frozen=True, slots=True)
class UnitCost:
    name: str                # "embed", "layer.3", "head"
    kind: str                # EMBED | LAYER | HEAD
    stream_bytes: int        # what one read of the unit moves from disk (checkpoint dtype, aligned)
    resident_bytes: int      # bytes once its weights are in the compute dtype
    convert_bytes: int       # workspace to cast a streamed unit into the compute dtype (0: no cast)
    matmul_params: int       # weights multiplied per token (0 for the embedding lookup)
    tensor_bytes: tuple[int, ...] = ()   # each tensor's resident bytes, as a device allocates them (): unknown


@dataclass(frozen=True, slots=True)
class ModelCosts:
    name: str
    units: tuple[UnitCost, ...]
    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    kv_bytes_per_token_layer: int      # K and V of one token in one layer, in the compute dtype
    dtype_bytes: int                   # compute dtype
    tied: bool                         # the head multiplies by the embedding tensor
    experts: ExpertCosts | None = None   # routed experts (mixture-of-experts models)
    windows: tuple[int | None, ...] = ()  # per decoder layer: its sliding window, None full attention (): all full
    state_bytes: int = 0               # per sequence: every linear-attention layer's fixed-size state
    linear_bytes_per_token: int = 0    # a linear-attention layer's prefill workspace per token (0: none)

    def __post_init__(self) -> None:
        if self.windows and len(self.windows) != self.num_layers:
            raise ValueError(f"ModelCosts.windows: one per layer ({self.num_layers}), got {len(self.windows)}")

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        return self.windows or (None,) * self.num_layers

    @property
    def kv_layers(self) -> int:
        """Layers that keep keys and values (a linear-attention layer, window 0, keeps a state)."""
        return sum(1 for w in self.layer_windows if w != 0)

    def kv_layout(self, block_tokens: int) -> KVLayout:
        """The blocks a sequence's KV holds per layer, rings for the sliding-window layers, the
        state's blocks for the linear-attention ones."""
        return KVLayout(block_tokens, self.layer_windows, self.state_blocks(block_tokens))

    def contiguous_layout(self) -> ContiguousLayout:
        """The contiguous store's count: the layers that keep keys, and each sequence's states
        in token-layers' worth of bytes."""
        return ContiguousLayout(self.kv_layers, state=-(-self.state_bytes // self.kv_bytes_per_token_layer))

    def state_blocks(self, block_tokens: int) -> int:
        """Blocks of ``block_tokens`` one linear-attention layer's state takes (0: none has one)."""
        linear = sum(1 for w in self.layer_windows if w == 0)
        if not linear or not self.state_bytes:
            return 0
        return -(-(self.state_bytes // linear) // (block_tokens * self.kv_bytes_per_token_layer))

    def kv_blocks(self, context_tokens: int, chunk_tokens: int, block_tokens: int) -> int:
        """The most blocks one sequence of ``context_tokens``, computed ``chunk_tokens`` a sweep,
        holds over all layers: every block of a full-attention layer (its last, partly filled
        one counted whole), a sliding-window layer's ring at its peak."""
        whole = -(-context_tokens // block_tokens) * block_tokens
        return self.kv_layout(block_tokens).most_blocks(whole, chunk_tokens)

    def kv_read_blocks(self, context_tokens: int, block_tokens: int, full_share: float = 1.0) -> float:
        """Blocks a query after ``context_tokens`` reads over all layers: ``full_share`` of a
        full-attention layer's (1: all; a prefill reads half of them on average), a window's
        keys (which span at most ceil((window - 1) / block) + 1 blocks) of a sliding one, the
        whole state of a linear-attention one."""
        full = -(-context_tokens // block_tokens)
        state = self.state_blocks(block_tokens)       # a linear layer's whole state, read by every sweep
        return sum(full_share * full if w is None else state if w == 0 else
                   min(full_share * full, -(-(w - 1) // block_tokens) + 1) for w in self.layer_windows)

    def kv_read_tokens(self, keys: int) -> int:
        """Keys, summed over layers, a query after ``keys`` tokens attends to (a window's at most)."""
        return sum(keys if w is None else min(keys, w) for w in self.layer_windows)

    def tier_weight_bytes(self, tiers: Sequence[str], tier: str) -> int:
        """Bytes of weights the units placed on ``tier`` (one tier per unit) hold there, a tied
        embedding's tensor once: on disk what their reads move (the checkpoint's dtype),
        elsewhere their bytes in the compute dtype. The planner's memory and the report's
        placement both count by this."""
        def size(u: UnitCost) -> int:
            return u.stream_bytes if tier == DISK else u.resident_bytes
        total = sum(size(u) for u, t in zip(self.units, tiers) if t == tier)
        if self.tied and tiers[0] == tier and tiers[-1] == tier:   # the head's read holds the embedding
            total -= size(self.units[0])
        return total

    @property
    def checkpoint_bytes(self) -> int:
        tied = self.units[0].stream_bytes if self.tied else 0
        e = self.experts
        routed = e.moe_layers * e.num_experts * e.stream_bytes if e is not None else 0
        return sum(u.stream_bytes for u in self.units) - tied + routed

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer that keeps keys (what a full-attention store writes
        per token; a linear-attention layer, window 0, keeps none)."""
        return self.kv_bytes_per_token_layer * sum(1 for w in self.layer_windows if w != 0)

    def kv_read_bytes(self, keys: int) -> int:
        """KV bytes one query after ``keys`` tokens of context reads (a window's at most per layer)."""
        return self.kv_bytes_per_token_layer * self.kv_read_tokens(keys)

    def activation_bytes(self, tokens: int, mlp_tokens: int) -> int:
        """Workspace of a sweep of ``tokens`` inside a layer: residual, norms and q/k/v/o for
        every token, the MLP's intermediate activations for ``mlp_tokens`` at a time, and a
        linear-attention layer's delta-rule workspace (``ModelSpec.linear_workspace_bytes``)."""
        b, h = self.dtype_bytes, self.hidden_size
        qkv = (self.num_heads * self.head_dim + 2 * self.kv_bytes_per_token_layer // (2 * b)) * b
        return tokens * (3 * h * b + qkv + 2 * h * 4 + self.linear_bytes_per_token) + \
            min(tokens, mlp_tokens) * 3 * self.intermediate_size * b

    def attention_bytes(self, tokens: int, context: int) -> int:
        """Attention workspace of one sequence: ``tokens`` queries over ``context`` keys. No
        kernel holds the whole score matrix. The fused ones (flash-attn, SDPA without a mask)
        tile inside the kernel; every call with a mask (a prefill chunk after position 0, a
        window narrower than the chunk) or a soft-cap runs the online softmax of
        ``adapters/attention.py`` over ATTENTION_KEY_TILE keys at a time (a paged store's blocks
        are smaller still), and that path is the bound. Per query and head: a tile of float32
        scores, the float32 copy of the query and the running weighted sum (head_dim each), the
        running maximum and sum with their per-tile temporaries (8 values), the output in the
        compute dtype; per query, the tile's mask (4 bytes a key covers its temporaries); once,
        a tile of keys or of values cast to float32 (none when the compute dtype is float32). A
        call of at most ATTENTION_GROUP_QUERIES queries may merge a run of blocks at once, in
        up to ATTENTION_GROUP_BYTES more (less when the context is short)."""
        tile = min(context, ATTENTION_KEY_TILE)
        d, b = self.head_dim, self.dtype_bytes
        kv_width = self.kv_bytes_per_token_layer // (2 * b)         # KV heads x head_dim
        per_query = self.num_heads * (4 * tile + 4 * (2 * d + 8) + b * d) + 4 * tile
        # a run's scores and products cover at most the context's keys (blocks of >= 16 tokens)
        cover = 4 * (self.num_heads * tokens * (context + d * -(-context // 16)) + (context * d if b != 4 else 0))
        runs = min(ATTENTION_GROUP_BYTES, cover) if tokens <= ATTENTION_GROUP_QUERIES else 0
        return tokens * per_query + (4 * tile * kv_width if b != 4 else 0) + runs


def model_costs(name: str, *, unit_shapes: Sequence[Mapping[str, tuple[int, ...]]], unit_kinds: Sequence[str],
                num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                intermediate_size: int, vocab_size: int, tied: bool, checkpoint_dtype_bytes: int,
                dtype_bytes: int, stream_bytes: Sequence[int] | None = None, cast: bool | None = None,
                experts: ExpertCosts | None = None, windows: Sequence[int | None] = (),
                state_bytes: int = 0, linear_bytes_per_token: int = 0) -> ModelCosts:
    """Costs from the tensor shapes a family's adapter expects for each unit.

    ``stream_bytes`` are the real reads of a checkpoint's units when it is at hand; from a
    config alone they are the payload rounded up to whole 4 KiB pages per tensor. ``cast``:
    whether streamed weights need converting to the compute dtype (default: the sizes differ).
    ``windows``: each decoder layer's sliding window (None: full attention; empty: all full)."""
    cast = checkpoint_dtype_bytes != dtype_bytes if cast is None else cast
    units = []
    for unit, (shapes, kind) in enumerate(zip(unit_shapes, unit_kinds)):
        shapes = dict(shapes)
        if tied and kind == HEAD:
            shapes.setdefault("lm_head", (vocab_size, hidden_size))
        numels = {local: math.prod(shape) for local, shape in shapes.items()}
        payload = sum(-(-n * checkpoint_dtype_bytes // ALIGN) * ALIGN for n in numels.values())
        resident = sum(numels.values()) * dtype_bytes
        matmul = 0 if kind == EMBED else sum(n for local, n in numels.items() if len(shapes[local]) == 2)
        read = stream_bytes[unit] if stream_bytes is not None else payload
        unit_name = {EMBED: "embed", HEAD: "head"}.get(kind, f"layer.{unit - 1}")
        units.append(UnitCost(unit_name, kind, read, resident,
                              resident if cast else 0, matmul, tuple(n * dtype_bytes for n in numels.values())))
    return ModelCosts(name, tuple(units), num_layers, hidden_size, num_heads, head_dim, intermediate_size,
                      vocab_size, 2 * num_kv_heads * head_dim * dtype_bytes, dtype_bytes, tied, experts,
                      tuple(windows) if any(w is not None for w in windows) else (), state_bytes,
                      linear_bytes_per_token)


@dataclass(frozen=True, slots=True)
class Workload:
    """What the plan is for: ``concurrency`` sequences of ``context_tokens`` each (prompt plus
    generated), ``new_tokens`` of which are generated."""

    context_tokens: int = 4096
    concurrency: int = 1
    new_tokens: int = 256

    def __post_init__(self) -> None:
        for name, low in (("context_tokens", 1), ("concurrency", 1), ("new_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"Workload.{name} must be an int >= {low}, got {value!r}")

    @property
    def prompt_tokens(self) -> int:
        return max(1, self.context_tokens - self.new_tokens)

    @property
    def kv_tokens(self) -> int:
        return self.context_tokens * self.concurrency


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def costs_from_spec(spec: Any, adapter: Any, dtype: str, stream_bytes: Sequence[int] | None = None,
                    name: str | None = None, cast: bool | None = None,
                    expert_stream_bytes: int | None = None, expert_element_bytes: Mapping[str, int] | None = None,
                    expert_cast: bool | None = None) -> ModelCosts:
    """``ModelCosts`` of a ``ModelSpec`` through its family adapter's expected tensor shapes.
    The ``expert_*`` arguments describe one routed expert of a checkpoint at hand (its read,
    its tensors' element sizes, whether its float tensors are cast); see ``expert_costs``."""
    units = range(spec.num_units)
    checkpoint_bytes = DTYPE_BYTES.get(spec.checkpoint_dtype, 4)
    cast = spec.checkpoint_dtype != dtype if cast is None else cast
    experts = expert_costs(spec, adapter, checkpoint_bytes, DTYPE_BYTES[dtype], expert_stream_bytes,
                           expert_element_bytes, cast if expert_cast is None else expert_cast)
    return model_costs(
        name or f"{spec.architecture} {spec.num_layers}L h{spec.hidden_size}",
        unit_shapes=[adapter.expected_shapes(spec, u) for u in units], unit_kinds=[spec.unit_kind(u) for u in units],
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size, tied=spec.tie_word_embeddings,
        checkpoint_dtype_bytes=checkpoint_bytes, dtype_bytes=DTYPE_BYTES[dtype],
        stream_bytes=stream_bytes, cast=cast, experts=experts,
        windows=tuple(spec.window(layer) for layer in range(spec.num_layers)),
        state_bytes=len(getattr(spec, "linear_layers", ())) * spec.linear_state_bytes(DTYPE_BYTES[dtype])
        if getattr(spec, "linear_layers", ()) else 0,
        linear_bytes_per_token=spec.linear_workspace_bytes(DTYPE_BYTES[dtype]) if getattr(spec, "linear_layers", ())
        else 0)
