"""How the command line writes figures: sizes in binary units, durations in the unit that reads
best, and a set of units as ranges of layers. ``tierflow run``'s summary and progress and the plan's
report all use them."""

from __future__ import annotations

from typing import Sequence


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
