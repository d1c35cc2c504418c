"""The checkpoint index: a local Hugging Face model directory as units of byte ranges.

``CheckpointIndex.open`` resolves a directory (or a hub id already in the local HF cache),
reads config.json (``files.read_config``: UTF-8 JSON holding an object), checks its keys and picks the
adapter (``adapters.model_from_config``), parses every safetensors header, maps tensor names to
units through the adapter's name table, checks every shape against the config, and turns
each unit into a few coalesced, 4 KiB-aligned byte ranges of the original files. Reading a
unit is then a handful of large aligned reads into one buffer, and every tensor is a view
at a known offset of that buffer. Nothing is converted or copied on disk.

Routed experts are units of their own, keyed (layer, expert). A family that stores each
expert's tensors under their own names maps them with "expert" name rules; one that stacks a
layer's experts in one tensor (gpt-oss: ``mlp.experts.gate_up_proj`` [experts, ...]) maps it
with an "experts" rule, and the index cuts it into per-expert slices — expert e's bytes are
the e-th contiguous run of the tensor — so reading a routed expert reads its slice alone.
MXFP4 tensors (``*_blocks``, ``*_scales``; uint8) are indexed as they are: their bytes are
what a read moves and what the expert cache holds.

Tied embeddings: the head unit lists the embedding tensor as its ``lm_head`` (so a streamed
head reads it again), and ``head_without_tied`` is the head's layout without it, used when
the embedding is resident and can be shared.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from tierflow.adapters import Adapter, ModelSpec, model_from_config
from tierflow.adapters.base import EXPERT, EXPERTS
from tierflow.errors import CheckpointError, ShapeMismatchError
from tierflow.tiers.checkpoint.files import read_config, resolve_checkpoint, safetensors_files
from tierflow.tiers.checkpoint.safetensors import TensorEntry, read_header

log = logging.getLogger(__name__)

ALIGN_BYTES = 4096
MAX_GAP_BYTES = 64 * 2**10   # reading a gap this small is cheaper than another request
PACKED_SUFFIXES = ("_blocks", "_scales")   # local names of MXFP4 tensors (uint8), read as they are


@dataclass(frozen=True, slots=True)
class ByteRange:
    path: str
    file_offset: int      # 4 KiB aligned
    nbytes: int           # a multiple of 4 KiB (may run past the end of the file)
    buffer_offset: int    # where the range lands in the unit's buffer
    needed: int = 0       # bytes from the range's start to the end of its last tensor: what a read must deliver


@dataclass(frozen=True, slots=True)
class TensorSlice:
    local: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer_offset: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class UnitLayout:
    unit: int
    name: str
    ranges: tuple[ByteRange, ...]
    tensors: tuple[TensorSlice, ...]
    buffer_bytes: int     # what a read moves (aligned ranges, gaps included)
    payload_bytes: int    # the tensors' own bytes

    def compute_bytes(self, dtype: torch.dtype | None) -> int:
        """Bytes the unit occupies once its floating tensors are in ``dtype``."""
        if dtype is None:
            return self.payload_bytes
        return sum(t.nbytes // t.dtype.itemsize * (dtype.itemsize if t.dtype.is_floating_point else t.dtype.itemsize)
                   for t in self.tensors)


def _round_down(x: int) -> int:
    return x - x % ALIGN_BYTES


def _round_up(x: int) -> int:
    return -(-x // ALIGN_BYTES) * ALIGN_BYTES


def build_layout(unit: int, name: str, tensors: list[tuple[str, TensorEntry]]) -> UnitLayout:
    """Coalesce a unit's tensors into aligned ranges, file by file, in file order."""
    by_file: dict[str, list[tuple[str, TensorEntry]]] = {}
    for local, entry in tensors:
        by_file.setdefault(entry.path, []).append((local, entry))
    ranges: list[ByteRange] = []
    slices: list[TensorSlice] = []
    buffer_end = 0
    for path in sorted(by_file):
        group = sorted(by_file[path], key=lambda item: item[1].file_offset)
        start = end = -1
        members: list[tuple[str, TensorEntry]] = []

        def flush() -> None:
            nonlocal buffer_end
            aligned_start, aligned_end = _round_down(start), _round_up(end)
            ranges.append(ByteRange(path, aligned_start, aligned_end - aligned_start, buffer_end, end - aligned_start))
            for local, e in members:
                slices.append(TensorSlice(local, e.dtype, e.shape, buffer_end + e.file_offset - aligned_start, e.nbytes))
            buffer_end += aligned_end - aligned_start

        for local, entry in group:
            entry_end = entry.file_offset + entry.nbytes
            if members and _round_down(entry.file_offset) - _round_up(end) > MAX_GAP_BYTES:
                flush()
                members = []
            if not members:
                start, end = entry.file_offset, entry_end
            end = max(end, entry_end)
            members.append((local, entry))
        flush()
    return UnitLayout(unit, name, tuple(ranges), tuple(slices), buffer_end,
                      sum(e.nbytes for _, e in tensors))


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    directory: Path
    config: dict[str, Any]
    adapter: Adapter
    spec: ModelSpec
    units: tuple[UnitLayout, ...]
    head_without_tied: UnitLayout | None
    files: tuple[str, ...]
    experts: Mapping[tuple[int, int], UnitLayout] = field(default_factory=dict)   # (layer, expert) → its unit

    @classmethod
    def open(cls, path_or_hub_id: str | Path) -> "CheckpointIndex":
        directory = resolve_checkpoint(path_or_hub_id)
        config = read_config(directory / "config.json")
        adapter, spec = model_from_config(config, str(directory / "config.json"))
        files = safetensors_files(directory)
        entries: dict[str, TensorEntry] = {}
        for f in files:
            entries.update(read_header(f))
        grouped, routed = _group_units(adapter, spec, entries)
        units = tuple(build_layout(u, spec.unit_name(u), grouped[u]) for u in range(spec.num_units))
        experts = {key: build_layout(spec.num_units + key[0] * spec.num_experts + key[1], spec.expert_name(*key),
                                     tensors) for key, tensors in sorted(routed.items())}
        head_without = None
        if spec.tie_word_embeddings:
            head = spec.num_units - 1
            head_without = build_layout(head, spec.unit_name(head), [t for t in grouped[head] if t[0] != "lm_head"])
        return cls(directory, config, adapter, spec, units, head_without, tuple(str(f) for f in files), experts)

    @property
    def total_bytes(self) -> int:
        tied = self.units[0].payload_bytes if self.spec.tie_word_embeddings else 0
        return sum(u.payload_bytes for u in self.units) - tied + sum(e.payload_bytes for e in self.experts.values())



def _group_units(adapter: Adapter, spec: ModelSpec, entries: dict[str, TensorEntry]
                 ) -> tuple[list[list[tuple[str, TensorEntry]]], dict[tuple[int, int], list[tuple[str, TensorEntry]]]]:
    """Tensors per unit, and per routed expert ((layer, expert) → tensors)."""
    grouped: list[list[tuple[str, TensorEntry]]] = [[] for _ in range(spec.num_units)]
    routed: dict[tuple[int, int], list[tuple[str, TensorEntry]]] = {}
    ignored: list[str] = []
    for name, entry in entries.items():
        if spec.tie_word_embeddings and name == "lm_head.weight":
            continue
        expert = next((m for r in adapter.name_rules
                       if r.unit in (EXPERT, EXPERTS) and (m := r.match_expert(name))), None)
        if expert is not None:
            layer, index, local = expert
            if index < 0:           # every expert of the layer, stacked: each reads its own slice
                if layer not in spec.moe_layers:
                    raise ShapeMismatchError(f"tensor {name!r} holds experts of layer {layer}, which config.json "
                                             f"does not have (MoE layers {list(spec.moe_layers)})")
                for index, part in enumerate(_expert_slices(entry, spec.num_experts)):
                    routed.setdefault((layer, index), []).append((local, part))
                continue
            if layer not in spec.moe_layers or not 0 <= index < spec.num_experts:
                raise ShapeMismatchError(f"tensor {name!r} names expert {index} of layer {layer}, which config.json "
                                         f"does not have ({spec.num_experts} experts in layers {list(spec.moe_layers)})")
            routed.setdefault((layer, index), []).append((local, entry))
            continue
        rule, placed = next(((r, m) for r in adapter.name_rules
                             if r.unit not in (EXPERT, EXPERTS) and (m := r.match(name, spec.num_layers))), (None, None))
        if placed is None:
            if any(re.fullmatch(p, name) for p in adapter.ignored_names):
                ignored.append(name)
                continue
            raise CheckpointError(f"tensor {name!r} in {entry.path} is not part of a {spec.architecture}; "
                                  "the checkpoint does not match its config.json")
        unit, local = placed
        if rule.unit == "layer" and unit > spec.num_layers:
            raise ShapeMismatchError(f"tensor {name!r} names a layer beyond num_hidden_layers={spec.num_layers}")
        grouped[unit].append((local, entry))
    if ignored:
        log.info("%d checkpoint tensors a %s does not use are ignored (e.g. %s)", len(ignored), spec.architecture,
                 ignored[0])
    if spec.tie_word_embeddings:
        grouped[-1] += [("lm_head", e) for local, e in grouped[0] if local == "embed"]
    for unit, tensors in enumerate(grouped):
        _check_shapes(adapter, spec, unit, tensors)
    if spec.num_experts:
        expected = adapter.expected_expert_shapes(spec)
        for layer in spec.moe_layers:
            for index in range(spec.num_experts):
                _check_tensors(spec.expert_name(layer, index), expected, routed.get((layer, index), []))
    return grouped, routed


def _expert_slices(entry: TensorEntry, num_experts: int) -> list[TensorEntry]:
    """A tensor stacking ``num_experts`` experts along dim 0 as one entry per expert: expert e's
    slice is the e-th contiguous run of ``nbytes / num_experts`` bytes (row-major layout)."""
    if not entry.shape or entry.shape[0] != num_experts:
        raise ShapeMismatchError(f"tensor {entry.name!r} has shape {list(entry.shape)}; config.json implies "
                                 f"{num_experts} experts along its first dimension")
    size = entry.nbytes // num_experts
    return [TensorEntry(f"{entry.name}[{e}]", entry.path, entry.dtype, entry.shape[1:], entry.file_offset + e * size,
                        size) for e in range(num_experts)]


def _check_shapes(adapter: Adapter, spec: ModelSpec, unit: int, tensors: list[tuple[str, TensorEntry]]) -> None:
    _check_tensors(spec.unit_name(unit), adapter.expected_shapes(spec, unit), tensors)


def _check_tensors(unit_name: str, expected: Mapping[str, tuple[int, ...]],
                   tensors: list[tuple[str, TensorEntry]]) -> None:
    found = {local: entry for local, entry in tensors}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"unit {unit_name} lacks tensor(s) {missing}; the checkpoint is "
                              "incomplete or does not match its config.json")
    for local, entry in found.items():
        if local not in expected:
            raise CheckpointError(f"tensor {entry.name!r} is unexpected for this config (bias flags?)")
        if entry.shape != expected[local]:
            raise ShapeMismatchError(f"tensor {entry.name!r} has shape {list(entry.shape)}, config.json implies "
                                     f"{list(expected[local])}; the checkpoint does not match its config")
        packed = local.endswith(PACKED_SUFFIXES)      # MXFP4 blocks and scales
        if packed and entry.dtype != torch.uint8:
            raise CheckpointError(f"tensor {entry.name!r} has dtype {entry.dtype}; MXFP4 blocks and scales are uint8")
        if not packed and not entry.dtype.is_floating_point:
            raise CheckpointError(f"tensor {entry.name!r} has dtype {entry.dtype}; expected a float dtype")
