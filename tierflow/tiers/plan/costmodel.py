"""What a model costs to hold and to run, and what a placement of it costs on a machine.

``ModelCosts`` is built from config.json alone (or, when the checkpoint is at hand, from
its real byte ranges): bytes per unit on disk and in the compute dtype, weights multiplied
per token, KV bytes per token per layer. ``sweep_times`` and ``memory_use`` turn a
placement into predicted seconds per resource and bytes per tier. Pure: no torch, no I/O.

The time model is the pipeline's: reading from disk, copying to the device and computing
overlap, so a sweep takes as long as its slowest resource. Compute per unit is a roofline:
a decoder layer at one token is bound by reading its weights (``decode_gbps``), at many
tokens by its matmuls (``prefill_tflops``); attention reads each sequence's KV once.

Sliding-window layers (``ModelCosts.windows``) are bounded by their window: the paged store
keeps a ring of blocks per such layer (``tiers/kv/layout.py``, whose arithmetic the planner
shares), so a sequence holds ``kv_blocks`` — every block of a full-attention layer, a ring's
peak (during a prefill chunk) of a windowed one — and a query reads at most a window's keys.
A linear-attention layer (window 0) keeps no keys; its fixed-size state per sequence
(``ModelCosts.state_bytes`` over all such layers, the same at any context) lives in pool blocks
like KV (``state_blocks`` per layer, whole blocks), which ``kv_blocks`` counts through the layout.

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
from typing import Any, Mapping, Sequence

from tierflow.errors import ConfigError
from tierflow.tiers.kv.layout import ContiguousLayout, KVLayout
from tierflow.tiers.plan.hardware import HardwareProfile

EMBED, LAYER, HEAD = "embed", "layer", "head"
DEVICE, HOST, DISK = "device", "host", "disk"
ALIGN = 4096
ATTENTION_KEY_TILE = 512
KV_READ_WINDOW_BYTES = 16 * 2**20   # buffers that KV blocks read back from disk land in (read-ahead)
KV_READ_RUN = 4                     # the most consecutive KV blocks one read request moves


def kv_read_window(disk_blocks: int, block_bytes: int) -> int:
    """Buffers (4 KiB-aligned block slots) for KV blocks read back from disk: about
    KV_READ_WINDOW_BYTES, at least two runs, never more than there are blocks on disk."""
    stride = -(-block_bytes // ALIGN) * ALIGN
    return min(disk_blocks, max(2 * KV_READ_RUN, KV_READ_WINDOW_BYTES // stride))


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
        a tile of keys or of values cast to float32 (none when the compute dtype is float32)."""
        tile = min(context, ATTENTION_KEY_TILE)
        d, b = self.head_dim, self.dtype_bytes
        kv_width = self.kv_bytes_per_token_layer // (2 * b)         # KV heads x head_dim
        per_query = self.num_heads * (4 * tile + 4 * (2 * d + 8) + b * d) + 4 * tile
        return tokens * per_query + (4 * tile * kv_width if b != 4 else 0)


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


@dataclass(frozen=True, slots=True)
class SweepTimes:
    disk_s: float
    pcie_s: float
    compute_s: float

    @property
    def total_s(self) -> float:
        return max(self.disk_s, self.pcie_s, self.compute_s)

    @property
    def bottleneck(self) -> str:
        named = {"disk": self.disk_s, "pcie": self.pcie_s, "compute": self.compute_s}
        return max(named, key=named.__getitem__)


def io_block_for(unit_bytes: int, io_threads: int) -> int:
    """Read request size for units of ``unit_bytes``: each unit split over every reader thread
    (so a small unit still keeps the disk's queue full), in whole MiB from 1 to 8 MiB."""
    mib = 2**20
    return min(8 * mib, max(mib, -(-unit_bytes // io_threads // mib) * mib))


def _gbps(nbytes: float, gbps: float | None) -> float:
    return 0.0 if nbytes == 0 else nbytes / (gbps * 1e9) if gbps else math.inf


def unit_compute_s(model: ModelCosts, hw: HardwareProfile, unit: UnitCost, tokens: int) -> float:
    """Roofline of one unit over ``tokens`` rows: bound by its weight bytes or its matmuls."""
    if unit.kind == EMBED:
        return 0.0
    return max(_gbps(unit.resident_bytes, hw.decode_gbps), 2 * unit.matmul_params * tokens / (hw.prefill_tflops * 1e12))


def attention_compute_s(model: ModelCosts, hw: HardwareProfile, queries: int, contexts: Sequence[int]) -> float:
    """All layers' attention for ``queries`` new tokens of each sequence over its ``contexts[i]``
    keys (a sliding-window layer's queries over a window's keys at most): one roofline for the
    whole sweep, bound by the KV bytes read or by the flops."""
    kv_bytes = sum(model.kv_read_bytes(c) for c in contexts)
    flops = 4 * queries * sum(model.kv_read_tokens(c) for c in contexts) * model.num_heads * model.head_dim
    return max(_gbps(kv_bytes, hw.decode_gbps), flops / (hw.prefill_tflops * 1e12))


def expert_times(model: ModelCosts, hw: HardwareProfile, tokens: int, cache_bytes: int) -> tuple[float, float]:
    """(read bytes, compute seconds) of the routed experts in one sweep of ``tokens`` tokens:
    every MoE layer reads the distinct experts its tokens pick that the expert cache (of
    ``cache_bytes``) misses (``ExpertCosts.hit_rate``: measured routing's LRU curve, else the
    cache's share of all experts, as under uniform routing) and multiplies each token by its
    experts."""
    e = model.experts
    if e is None or tokens == 0:
        return 0.0, 0.0
    distinct = e.distinct(tokens)
    hit = e.hit_rate(cache_bytes, distinct)
    read = e.moe_layers * distinct * (1.0 - hit) * e.stream_bytes
    compute = e.moe_layers * max(_gbps(distinct * e.use_bytes, hw.decode_gbps),
                                 2 * e.matmul_params * e.per_token * tokens / (hw.prefill_tflops * 1e12))
    return read, compute


def sweep_times(model: ModelCosts, hw: HardwareProfile, tiers: Sequence[str], kv_tier_bytes: Mapping[str, float],
                *, tokens: int, logit_rows: int, queries: int, keys: int, sequences: int,
                kv_read_fraction: float = 1.0, expert_cache_bytes: int = 0,
                contexts: Sequence[int] = ()) -> SweepTimes:
    """Predicted seconds of one sweep per resource. Units on disk are read whole; on CUDA every
    unit not on the device is copied to it (an embedding kept on the host is looked up there
    and only the rows move); KV outside the device is read back by every sweep; routed
    experts the expert cache misses are read from disk (and copied, on CUDA). ``contexts``:
    each sequence's keys, when they differ (else ``sequences`` of ``keys`` each)."""
    expert_read, expert_compute = expert_times(model, hw, tokens, expert_cache_bytes)
    disk = sum(u.stream_bytes for u, t in zip(model.units, tiers) if t == DISK) + expert_read
    disk_s = _gbps(disk, hw.disk_read_gbps) + _gbps(kv_tier_bytes.get(DISK, 0) * kv_read_fraction, hw.kv_read_gbps)
    # a linear-attention state is written anew by every sweep, where the KV is (its disk share)
    kv_total = sum(kv_tier_bytes.values())
    state_written = sequences * model.state_bytes
    if state_written and kv_total:
        disk_s += _gbps(state_written * kv_tier_bytes.get(DISK, 0) / kv_total, hw.kv_write_gbps)
    pcie_s = 0.0
    if not hw.is_cpu:
        upload = sum(u.stream_bytes if t == DISK else u.resident_bytes
                     for u, t in zip(model.units, tiers) if t != DEVICE and u.kind != EMBED)
        off_device_kv = (kv_tier_bytes.get(HOST, 0) + kv_tier_bytes.get(DISK, 0)) * kv_read_fraction
        new_kv = sequences * (queries * model.kv_bytes_per_token + model.state_bytes) \
            if kv_tier_bytes.get(DEVICE, 0) == 0 else 0
        pcie_s = _gbps(upload + expert_read + off_device_kv, hw.h2d_gbps) + _gbps(new_kv, hw.d2h_gbps)
    compute_s = sum(unit_compute_s(model, hw, u, logit_rows if u.kind == HEAD else tokens) for u in model.units)
    compute_s += expert_compute
    compute_s += attention_compute_s(model, hw, queries, contexts or (keys,) * sequences)
    return SweepTimes(disk_s, pcie_s, compute_s)


def decode_times(model: ModelCosts, hw: HardwareProfile, tiers: Sequence[str], kv_read_bytes: Mapping[str, float],
                 contexts: Sequence[int], expert_cache_bytes: int = 0) -> SweepTimes:
    """Predicted seconds per resource of one decode sweep: one new token for each sequence,
    the i-th attending to ``contexts[i]`` keys, reading ``kv_read_bytes`` of KV per tier. The
    plan prices its workload's sweep with this (every sequence at the full context, the KV as
    it places it), and the engine prices each decode sweep that ran with it (the sequences'
    own lengths, the KV as its blocks in use lie), so the two differ only by those inputs."""
    k = len(contexts)
    return sweep_times(model, hw, tiers, kv_read_bytes, tokens=k, logit_rows=k, queries=1, keys=max(contexts),
                       sequences=k, expert_cache_bytes=expert_cache_bytes, contexts=contexts)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
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
