"""The hardware report: a plan explained as rich tables, or as a stable JSON document."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from rich.console import Console, Group
from rich.table import Table

from tierflow.outputs import EngineStats
from tierflow.tiers.plan.advice import Improvement
from tierflow.tiers.plan.costmodel import DEVICE, DISK, HOST, ModelCosts
from tierflow.tiers.plan.plan import TierPlan
from tierflow.tiers.plan.hardware import HardwareProfile

REPORT_VERSION = 1


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable: the loop returns at TiB")


def format_seconds(s: float) -> str:
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def unit_ranges(names: Sequence[str], units: Sequence[int]) -> str:
    """Units as readable ranges: "embed, layers 0-11, head"."""
    parts: list[str] = []
    layers: list[int] = []

    def flush() -> None:
        if layers:
            parts.append(f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}")
            layers.clear()

    for u in units:
        name = names[u]
        if name.startswith("layer."):
            index = int(name.split(".")[1])
            if layers and index != layers[-1] + 1:
                flush()
            layers.append(index)
        else:
            flush()
            parts.append(name)
    flush()
    return ", ".join(parts) or "—"


def plan_document(plan: TierPlan, hw: HardwareProfile, model: ModelCosts, hardware_source: str,
                  improvements: Sequence[Improvement]) -> dict[str, Any]:
    """The ``tierflow plan --json`` document (``version`` changes only when keys change meaning)."""
    doc = {"version": REPORT_VERSION, **plan.to_json()}
    doc["hardware"] = {**hw.to_json(), "source": hardware_source}
    doc["model_bytes"] = model.checkpoint_bytes
    doc["kv_bytes_per_token"] = model.kv_bytes_per_token
    doc["improvements"] = [{"change": i.change, "speedup": i.speedup, "decode_s_per_token": i.decode_s_per_token}
                           for i in improvements]
    return doc


_KVIKIO_MODES = {
    "gds": "GPUDirect Storage through kvikio (disk → GPU memory)",
    "compat": "O_DIRECT → pinned host → PCIe (kvikio is in its compatibility mode: no GPUDirect Storage)",
    "absent": "O_DIRECT → pinned host → PCIe (kvikio is not installed)",
    "": "O_DIRECT → pinned host → PCIe (GPUDirect Storage not probed)",
}


def _hardware_table(hw: HardwareProfile, source: str) -> Table:
    t = Table(title=f"hardware ({source})", show_header=False, box=None, title_justify="left")
    cpu = hw.is_cpu
    t.add_row("device", f"{hw.device}" + (f" — {hw.device_name}" if hw.device_name else ""))
    t.add_row("device memory" if not cpu else "RAM (the device tier)", format_bytes(hw.device_memory_bytes) + " free"
              + (f" of {format_bytes(hw.device_total_bytes)}" if hw.device_total_bytes else ""))
    if not cpu:
        t.add_row("host memory", format_bytes(hw.host_memory_bytes) + " available"
                  + (f", {format_bytes(hw.pinned_memory_bytes)} pinnable" if hw.pinned_memory_bytes else ""))
        link = ""
        if hw.pcie_link:
            most = f", {hw.pcie_link_gbps:.1f} GB/s each way at most" if hw.pcie_link_gbps else ""
            link = f" (link {hw.pcie_link}{most})"
        t.add_row("PCIe", f"{hw.h2d_gbps:.1f} GB/s to the device, {hw.d2h_gbps:.1f} GB/s back{link}")
    if not cpu:
        t.add_row("weights to the GPU", _KVIKIO_MODES.get(hw.kvikio_mode, hw.kvikio_mode))
        assumed = " assumed, not measured" if hw.device_overhead_bytes is None else ""
        t.add_row("runtime overhead", f"{format_bytes(hw.runtime_overhead_bytes)}{assumed} (cuBLAS workspaces, "
                                      "cuFile's GPU buffers)")
    elif hw.device_overhead_bytes:
        t.add_row("runtime overhead", format_bytes(hw.device_overhead_bytes))
    t.add_row("disk (checkpoint)", f"{hw.disk_read_gbps:.2f} GB/s O_DIRECT reads")
    if hw.kv_disk_read_gbps and hw.kv_disk_read_gbps != hw.disk_read_gbps:
        t.add_row("disk (KV spill)", f"{hw.kv_disk_read_gbps:.2f} GB/s reads")
    t.add_row("compute", f"{hw.decode_gbps:.1f} GB/s of weights at 1 token, {hw.prefill_tflops:.2f} TFLOP/s at "
                         f"prefill ({hw.compute_dtype})")
    return t


def _placement_table(plan: TierPlan, model: ModelCosts) -> Table:
    t = Table(title="placement", title_justify="left")
    for col in ("tier", "units", "weights", "KV blocks"):
        t.add_column(col)
    tiers = (DEVICE, DISK) if plan.device == "cpu" else (DEVICE, HOST, DISK)
    for tier in tiers:
        units = plan.units_in(tier)
        weights = sum(model.units[u].stream_bytes if tier == DISK else model.units[u].resident_bytes for u in units)
        blocks = plan.kv_blocks.get(tier, 0)
        label = "device (RAM)" if tier == DEVICE and plan.device == "cpu" else tier
        t.add_row(label, unit_ranges(plan.unit_names, units), format_bytes(weights) if units else "—",
                  f"{blocks} ({format_bytes(blocks * plan.kv_block_tokens * model.kv_bytes_per_token_layer)})")
    return t


def _memory_table(plan: TierPlan) -> Table:
    t = Table(title="memory per tier", title_justify="left")
    for col in ("tier", "weights", "staging", "KV", "activations", "overhead", "total", "budget"):
        t.add_column(col, justify="right" if col != "tier" else "left")
    for tier, m in plan.memory.items():
        if tier == HOST and plan.device == "cpu":
            continue
        t.add_row(tier, *(format_bytes(x) for x in (m.weights, m.staging, m.kv, m.workspace, m.overhead, m.total,
                                                     m.budget)))
    o = plan.device_overhead
    if o.total_bytes:
        t.caption = (f"device overhead {format_bytes(o.total_bytes)}: runtime {format_bytes(o.runtime_bytes)}"
                     f"{' (assumed)' if o.runtime_assumed else ''}, allocator rounding "
                     f"{format_bytes(o.rounding_bytes)}, KV growth {format_bytes(o.kv_growth_bytes)}")
        t.caption_justify = "left"
    return t


def _prediction_table(plan: TierPlan, model: ModelCosts) -> Table:
    p, w = plan.predicted, plan.workload
    t = Table(title=f"predicted for {w.concurrency} x {w.context_tokens} tokens of context", show_header=False,
              box=None, title_justify="left")
    t.add_row("decode", f"{format_seconds(p.decode_s_per_token)} per token — {p.tokens_per_s:.2f} tokens/s")
    t.add_row("bottleneck", f"{p.bottleneck} (per token: disk {format_seconds(p.decode.disk_s)}, PCIe "
                            f"{format_seconds(p.decode.pcie_s)}, compute {format_seconds(p.decode.compute_s)})")
    t.add_row("prefill", f"{format_seconds(p.prefill_s)} for {w.concurrency * w.prompt_tokens} prompt tokens in "
                         f"chunks of {plan.prefill_chunk_tokens} (MLP {plan.mlp_chunk_tokens} at a time)")
    t.add_row("pipeline", f"prefetch depth {plan.prefetch_depth}, {plan.num_slots} staging slots of "
                          f"{format_bytes(plan.device_slot_bytes)}, {plan.io_threads} reader threads of "
                          f"{format_bytes(plan.io_block_bytes)} requests")
    t.add_row("peak memory", f"device {format_bytes(p.peak_device_bytes)}"
              + ("" if plan.device == "cpu" else f", host {format_bytes(p.peak_host_bytes)}"))
    t.add_row("disk space", f"{format_bytes(p.disk_bytes)} (the checkpoint plus spilled KV)")
    t.add_row("KV cache", format_bytes(p.kv_bytes))
    e = model.experts
    if e is not None:
        held = min(e.moe_layers * e.num_experts, plan.expert_cache_bytes // max(1, e.resident_bytes))
        t.add_row("experts", f"{e.moe_layers} MoE layers of {e.num_experts} experts, {e.per_token} per token; cache "
                             f"{format_bytes(plan.expert_cache_bytes)} ({held} of {e.moe_layers * e.num_experts} "
                             f"experts, in the device weights above); a miss reads {format_bytes(e.stream_bytes)}")
    return t


def render_plan(console: Console, plan: TierPlan, hw: HardwareProfile, model: ModelCosts, hardware_source: str,
                improvements: Sequence[Improvement]) -> None:
    title = Table(show_header=False, box=None)
    title.add_row(f"[bold]{plan.model}[/bold]: {len(model.units) - 2} layers, {format_bytes(model.checkpoint_bytes)} "
                  f"on disk, KV {format_bytes(model.kv_bytes_per_token)} per token")
    helps = Table(title="what would help most", show_header=False, box=None, title_justify="left")
    for item in improvements[:4]:
        helps.add_row(item.change, f"→ {item.speedup:.1f}x faster ({format_seconds(item.decode_s_per_token)} per token)")
    if not improvements:
        helps.add_row("nothing single", "no one change predicts 5% faster decoding")
    console.print(Group(title, _hardware_table(hw, hardware_source), _placement_table(plan, model),
                        _memory_table(plan), _prediction_table(plan, model), helps))


def render_plan_vs_actual(console: Console, stats: EngineStats) -> None:
    """Per decode sweep: what the plan's cost model predicted for the sweeps that ran, and what
    was measured."""
    t = Table(title=f"plan vs actual, per decode sweep ({stats.decode_sweeps} sweeps)", title_justify="left")
    for col in ("stage", "predicted", "measured", "measured / predicted"):
        t.add_column(col, justify="right" if col != "stage" else "left")
    rows: Mapping[str, tuple[float, float]] = {
        "disk reads": (stats.predicted_decode.disk_s, stats.measured_decode.disk_s),
        "PCIe copies": (stats.predicted_decode.pcie_s, stats.measured_decode.pcie_s),
        "compute": (stats.predicted_decode.compute_s, stats.measured_decode.compute_s),
        "sweep (wall)": (stats.predicted_decode.total_s, stats.measured_decode.total_s)}
    for stage, (predicted, measured) in rows.items():
        ratio = f"{measured / predicted:.2f}" if predicted > 0 else "—"
        t.add_row(stage, format_seconds(predicted), format_seconds(measured), ratio)
    console.print(t)
