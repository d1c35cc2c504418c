"""The hardware report: a plan explained as rich tables, or as a stable JSON document.

Each table counts a byte once and in one way: the placement's weights per tier are
``ModelCosts.tier_weight_bytes`` (a tied embedding's tensor once), as the planner's memory is,
and its KV is the memory table's. Every table fits an 80-column terminal. What does not apply
to the device is left out (no host tier, PCIe or GPU overhead on a CPU plan), and the
hardware's figures say where they came from (hardware_source.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from tierflow.cli.formatting import format_bytes, format_seconds, unit_ranges
from tierflow.cli.hardware_source import HardwareSource
from tierflow.outputs import EngineStats
from tierflow.tiers.plan.advice import Improvement
from tierflow.tiers.plan.costmodel import DEVICE, DISK, HOST, ModelCosts
from tierflow.tiers.plan.plan import TierPlan
from tierflow.tiers.plan.hardware import HardwareProfile

REPORT_VERSION = 1


_STAGE_NAMES = {"disk": "disk", "pcie": "PCIe", "compute": "compute"}     # Prediction.bottleneck, as shown


def plan_document(plan: TierPlan, hw: HardwareProfile, model: ModelCosts, hardware_source: HardwareSource | str,
                  improvements: Sequence[Improvement]) -> dict[str, Any]:
    """The ``tierflow plan --json`` document (``version`` changes only when keys change meaning)."""
    doc = {"version": REPORT_VERSION, **plan.to_json()}
    doc["hardware"] = {**hw.to_json(), "source": str(hardware_source)}
    doc["model_bytes"] = model.checkpoint_bytes
    doc["kv_bytes_per_token"] = model.kv_bytes_per_token
    if model.experts is not None:       # what the prediction assumed the expert cache hits
        doc["expert_hit_rate"] = model.experts.hit_rate(plan.expert_cache_bytes)
        doc["routing"] = "measured" if model.experts.hit_curve else "uniform"
    doc["improvements"] = [{"change": i.change, "speedup": i.speedup, "decode_s_per_token": i.decode_s_per_token}
                           for i in improvements]
    return doc


# how streamed weights reach the GPU, per HardwareProfile.kvikio_mode: (the path, why that one)
_KVIKIO_MODES = {
    "gds": ("GPUDirect Storage through kvikio", "disk → GPU memory"),
    "compat": ("O_DIRECT → pinned host → PCIe", "kvikio in its compatibility mode: no GPUDirect Storage"),
    "absent": ("O_DIRECT → pinned host → PCIe", "kvikio is not installed"),
    "": ("O_DIRECT → pinned host → PCIe", "GPUDirect Storage not probed"),
}
UNITS_WIDTH = 36        # the placement table's units column: the tables fit 80 columns


def _hardware_table(hw: HardwareProfile, source: HardwareSource | str) -> Table:
    t = Table(title="hardware", show_header=False, box=None, title_justify="left")
    cpu = hw.is_cpu
    t.add_row("device", f"{hw.device}" + (f" — {hw.device_name}" if hw.device_name else ""))
    t.add_row("RAM (device tier)" if cpu else "device memory", format_bytes(hw.device_memory_bytes) + " free"
              + (f" of {format_bytes(hw.device_total_bytes)}" if hw.device_total_bytes else ""))
    if not cpu:
        t.add_row("host memory", format_bytes(hw.host_memory_bytes) + " available"
                  + (f", {format_bytes(hw.pinned_memory_bytes)} pinnable" if hw.pinned_memory_bytes else ""))
        t.add_row("PCIe", f"{hw.h2d_gbps or 0:.1f} GB/s to the device, {hw.d2h_gbps or 0:.1f} GB/s back")
        if hw.pcie_link:
            most = f", {hw.pcie_link_gbps:.1f} GB/s each way at most" if hw.pcie_link_gbps else ""
            t.add_row("PCIe link", f"{hw.pcie_link}{most}")
        path, why = _KVIKIO_MODES.get(hw.kvikio_mode, (hw.kvikio_mode, ""))
        t.add_row("weights to the GPU", path)
        if why:
            t.add_row("", why)
        assumed = ", assumed" if hw.device_overhead_bytes is None else ""
        t.add_row("runtime overhead", f"{format_bytes(hw.runtime_overhead_bytes)}{assumed} (cuBLAS workspaces, "
                                      "cuFile)")
    elif hw.device_overhead_bytes:
        t.add_row("runtime overhead", format_bytes(hw.device_overhead_bytes))
    t.add_row("disk (checkpoint)", f"{hw.disk_read_gbps:.2f} GB/s O_DIRECT reads")
    if hw.kv_disk_read_gbps and hw.kv_disk_read_gbps != hw.disk_read_gbps:
        t.add_row("disk (KV spill)", f"{hw.kv_disk_read_gbps:.2f} GB/s reads")
    t.add_row("decode compute", f"{hw.decode_gbps:.1f} GB/s of weights at 1 token ({hw.compute_dtype})")
    t.add_row("prefill compute", f"{hw.prefill_tflops:.2f} TFLOP/s")
    source = source if isinstance(source, HardwareSource) else HardwareSource(source)
    t.add_row("figures", source.summary)
    for line in source.details:
        t.add_row("", line)
    if source.file:
        t.add_row("from", source.file)
    return t


@dataclass(frozen=True, slots=True)
class TierRow:
    """One row of the placement table: what a tier holds, each byte counted once."""
    tier: str
    units: tuple[int, ...]
    weight_bytes: int       # the units' weights on this tier (a tied embedding once; on disk, the checkpoint's
                            # bytes; on the device, the expert cache too): TierPlan.memory[tier].weights off disk
    kv_blocks: int
    kv_bytes: int           # TierPlan.memory[tier].kv


def placement_rows(plan: TierPlan, model: ModelCosts) -> list[TierRow]:
    """The placement table's rows: per tier (no host tier on CPU), the units, their weights and KV."""
    rows = []
    for tier in (DEVICE, DISK) if plan.device == "cpu" else (DEVICE, HOST, DISK):
        weights = model.tier_weight_bytes(plan.tiers, tier) + (plan.expert_cache_bytes if tier == DEVICE else 0)
        blocks = plan.kv_blocks.get(tier, 0)
        rows.append(TierRow(tier, plan.units_in(tier), weights, blocks,
                            blocks * plan.kv_block_tokens * model.kv_bytes_per_token_layer))
    return rows


def _units_text(names: Sequence[str], units: Sequence[int], width: int = UNITS_WIDTH) -> str:
    """``unit_ranges``, or a count of the layers where a scattered placement's ranges would not
    fit the column (``tierflow plan --json`` lists every unit)."""
    text = unit_ranges(names, units)
    if len(text) <= width:
        return text
    chosen = {names[u] for u in units}
    layers = sum(n.startswith("layer.") for n in chosen)
    total = sum(n.startswith("layer.") for n in names)
    return ", ".join(["embed"] * ("embed" in chosen) + [f"{layers} of {total} layers"] + ["head"] * ("head" in chosen))


def _placement_table(plan: TierPlan, model: ModelCosts) -> Table:
    t = Table(title="placement", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("tier", "weights", "KV", "units"):
        t.add_column(col, justify="right" if col in ("weights", "KV") else "left")
    for row in placement_rows(plan, model):
        label = "device (RAM)" if row.tier == DEVICE and plan.device == "cpu" else row.tier
        units = _units_text(plan.unit_names, row.units)
        if row.tier == DEVICE and plan.expert_cache_bytes:
            units = f"{units}, expert cache" if row.units else "expert cache"
        t.add_row(label, format_bytes(row.weight_bytes) if row.weight_bytes else "—",
                  format_bytes(row.kv_bytes) if row.kv_blocks else "—", units)
    return t


def _memory_table(plan: TierPlan) -> Table:
    cpu = plan.device == "cpu"
    tiers = [DEVICE] if cpu else [DEVICE, HOST]
    t = Table(title="memory per tier", title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("")
    for tier in tiers:
        t.add_column("device (RAM)" if cpu else tier, justify="right")
    memory = [plan.memory[tier] for tier in tiers]
    fields = (("weights", "weights"), ("staging", "staging"), ("KV", "kv"), ("activations", "workspace"))
    for label, name in fields:
        t.add_row(label, *(format_bytes(getattr(m, name)) for m in memory))
    o = plan.device_overhead
    if o.total_bytes or not cpu:
        blank = [""] * (len(tiers) - 1)
        t.add_row("device overhead", format_bytes(memory[0].overhead), *["—"] * (len(tiers) - 1))
        for label, nbytes in ((f"  runtime{' (assumed)' if o.runtime_assumed else ''}", o.runtime_bytes),
                              ("  allocator rounding", o.rounding_bytes), ("  KV growth", o.kv_growth_bytes)):
            if nbytes or not cpu:
                t.add_row(label, format_bytes(nbytes), *blank)
    t.add_row("total", *(format_bytes(m.total) for m in memory))
    t.add_row("budget", *(format_bytes(m.budget) for m in memory))
    return t


def _prediction_table(plan: TierPlan, model: ModelCosts) -> Table:
    p, w = plan.predicted, plan.workload
    cpu = plan.device == "cpu"
    t = Table(title=f"predicted for {w.concurrency} x {w.context_tokens} tokens of context", show_header=False,
              box=None, title_justify="left")
    t.add_row("decode", f"{format_seconds(p.decode_s_per_token)} per token — {p.tokens_per_s:.2f} tokens/s")
    t.add_row("bottleneck", f"{_STAGE_NAMES[p.bottleneck]}, at the last token of the full context")
    stages = [("disk", p.decode.disk_s)] + ([] if cpu else [("PCIe", p.decode.pcie_s)]) + \
        [("compute", p.decode.compute_s)]
    t.add_row("per token", " · ".join(f"{name} {format_seconds(s)}" for name, s in stages))
    t.add_row("prefill", f"{format_seconds(p.prefill_s)} for {w.concurrency * w.prompt_tokens} prompt tokens")
    t.add_row("prefill chunks", f"{plan.prefill_chunk_tokens} tokens (the MLP {plan.mlp_chunk_tokens} at a time)")
    if plan.num_slots and plan.device_slot_bytes:
        t.add_row("streaming", f"{plan.num_slots} staging slots of {format_bytes(plan.device_slot_bytes)}, "
                               f"prefetch depth {plan.prefetch_depth}")
    elif plan.units_in(HOST):      # only an embedding kept on the host, looked up there: nothing to stage
        t.add_row("streaming", "none: the embedding is looked up on the host")
    else:
        t.add_row("streaming", "none: every unit is resident")
    if plan.num_slots or plan.kv_blocks.get(DISK, 0) or model.experts is not None:
        t.add_row("disk reads", f"{plan.io_threads} threads of {format_bytes(plan.io_block_bytes)} requests")
    t.add_row("peak memory", f"device {format_bytes(p.peak_device_bytes)}"
              + ("" if cpu else f", host {format_bytes(p.peak_host_bytes)}"))
    t.add_row("disk space", f"{format_bytes(p.disk_bytes)} (the checkpoint plus spilled KV)")
    blocks = sum(plan.kv_blocks.values())
    t.add_row("KV cache", f"{format_bytes(p.kv_bytes)}: {blocks} blocks of {plan.kv_block_tokens} tokens of a layer")
    e = model.experts
    if e is not None:
        held = min(e.moe_layers * e.num_experts, plan.expert_cache_bytes // max(1, e.resident_bytes))
        t.add_row("experts", f"{e.moe_layers} MoE layers of {e.num_experts} experts, {e.per_token} per token")
        t.add_row("expert cache", f"{format_bytes(plan.expert_cache_bytes)}: {held} of {e.moe_layers * e.num_experts} "
                                  "experts (in the device weights)")
        routing = "measured routing" if e.hit_curve else "uniform routing"
        t.add_row("expert hits", f"{e.hit_rate(plan.expert_cache_bytes):.0%} of routed experts ({routing})")
        packed = (f", {e.expert_format.upper()} packed ({format_bytes(e.matmul_params * model.dtype_bytes)} "
                  "unpacked)") if e.expert_format else ""
        t.add_row("expert miss", f"reads {format_bytes(e.stream_bytes)}{packed}")
    return t


def render_plan(console: Console, plan: TierPlan, hw: HardwareProfile, model: ModelCosts,
                hardware_source: HardwareSource | str, improvements: Sequence[Improvement]) -> None:
    """The plan as ``tierflow plan`` shows it: every table fits 80 columns (a long path in the
    hardware's ``from`` row aside)."""
    title = Table(show_header=False, box=None)
    title.add_row(f"[bold]{escape(plan.model)}[/bold]: {len(model.units) - 2} layers, "
                  f"{format_bytes(model.checkpoint_bytes)} on disk, KV {format_bytes(model.kv_bytes_per_token)} "
                  "per token")
    helps = Table(title="what would help most", show_header=False, box=None, title_justify="left")
    for item in improvements[:4]:
        helps.add_row(item.change, f"→ {item.speedup:.1f}x faster ({format_seconds(item.decode_s_per_token)} per token)")
    if not improvements:
        helps.add_row("nothing single", "no one change predicts 5% faster decoding")
    console.print(Group(title, _hardware_table(hw, hardware_source), _placement_table(plan, model),
                        _memory_table(plan), _prediction_table(plan, model), helps))


def render_plan_vs_actual(console: Console, stats: EngineStats) -> None:
    """Per decode sweep: what the plan's cost model predicts for the sweeps that ran (at their
    own context lengths, which are usually shorter than the full context the plan's bottleneck
    is named at), and what was measured. No PCIe row on a CPU engine."""
    t = Table(title=f"plan vs actual, per decode sweep ({stats.decode_sweeps} sweeps)", title_justify="left")
    for col in ("stage", "predicted", "measured", "measured / predicted"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    predicted, measured = stats.predicted_decode, stats.measured_decode
    stages = {"disk reads": (predicted.disk_s, measured.disk_s), "PCIe copies": (predicted.pcie_s, measured.pcie_s),
              "compute": (predicted.compute_s, measured.compute_s)}
    if stats.gpu_busy_s is None:        # the CPU engine: nothing crosses PCIe
        del stages["PCIe copies"]
    rows: dict[str, tuple[float, float]] = {**stages, "sweep (wall)": (predicted.total_s, measured.total_s)}
    for stage, (want, got) in rows.items():
        ratio = f"{got / want:.2f}" if want > 0 else "—"
        t.add_row(stage, format_seconds(want), format_seconds(got), ratio)
    if stats.decode_sweeps:
        largest = [max(stages, key=lambda s: stages[s][i]) for i in (0, 1)]
        t.add_row("largest stage", *largest, "")
    t.caption = "predicted: the plan's cost model, at these sweeps' lengths"
    t.caption_justify = "left"
    console.print(t)
