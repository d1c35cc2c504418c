"""The summary ``tierflow run`` prints after its request: what was measured around it, wall-clock,
and where the weights were, at most 80 columns wide."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.markup import escape
from rich.table import Table

from tierflow.cli.formatting import format_bytes, unit_ranges
from tierflow.outputs import EngineStats
from tierflow.tiers.plan.plan import TierPlan


@dataclass(frozen=True, slots=True)
class RunTimes:
    """What ``tierflow run`` measured around one request, wall-clock."""
    tokens: int             # tokens generated
    elapsed_s: float        # from the request to its last token
    first_token_s: float    # from the request to its first token (the prefill, mostly)


def summary_rows(stats: EngineStats, plan: TierPlan, times: RunTimes, attention: str) -> list[tuple[str, str]]:
    """The run's summary, at most 80 columns wide. Wall-clock figures say so; the reads' time
    is summed over reads that overlap (each other and compute), so it may exceed the wall."""
    t = times
    decode_s = t.elapsed_s - t.first_token_s
    rate = t.tokens / t.elapsed_s if t.elapsed_s > 0 else 0.0
    then = (t.tokens - 1) / decode_s if decode_s > 0 and t.tokens > 1 else 0.0
    compute = "GPU kernels" if stats.gpu_busy_s is not None else "compute"
    rows = [("tokens", f"{t.tokens} in {t.elapsed_s:.2f} s (wall), {rate:.1f} tokens/s"),
            ("first token", f"after {t.first_token_s:.2f} s (wall), then {then:.1f} tokens/s"),
            ("time (wall)", f"{compute} {stats.compute_s:.2f} s, waiting for weights {stats.stall_s:.2f} s")]
    if plan.streamed:
        rows += [("disk reads", f"{stats.read_s:.2f} s summed over overlapping reads (up to {plan.num_slots} "
                                "at once)"),
                 ("streamed", f"{format_bytes(stats.bytes_streamed)} of {unit_ranges(plan.unit_names, plan.streamed)}"
                              f" ({stats.io_mode} I/O)"),
                 ("staging", f"{plan.num_slots} slots of {format_bytes(plan.device_slot_bytes)}")]
    else:
        rows.append(("streamed", "nothing: every unit is resident"))
    rows.append(("on device", f"{unit_ranges(plan.unit_names, plan.units_in('device'))} "
                              f"({format_bytes(stats.resident_bytes)})"))
    host = plan.units_in("host")
    if host:
        rows.append(("pinned host", unit_ranges(plan.unit_names, host)))
    if stats.gpu_idle_fraction is not None:
        rows.append(("GPU", f"busy {stats.gpu_busy_s:.2f} s of {stats.gpu_span_s:.2f} s in sweeps "
                            f"({stats.gpu_idle_fraction:.0%} idle), uploads {stats.upload_s:.2f} s"))
    rows.append(("attention", attention))
    return rows


def summary_table(rows: Sequence[tuple[str, str]]) -> Table:
    table = Table(title="tierflow run", show_header=False, box=None)
    for label, value in rows:
        table.add_row(label, escape(value))
    return table
