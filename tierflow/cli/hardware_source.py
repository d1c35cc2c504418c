"""Where a plan's hardware figures came from, as the report says it: measured just now, the
probe's cache (its file, and when), or a profile (its file). It reads the cache file's
modification time when the cache does not date its entries, so it is kept apart from the
tables that only render."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True, slots=True)
class HardwareSource:
    """Where a plan's hardware figures came from, as the report says it."""
    summary: str                        # "measured on this machine just now", "cached: ...", "from the profile"
    details: tuple[str, ...] = ()       # which figures came from where, when the profile was probed
    file: str = ""                      # the probe's cache file or the profile file ("": none, or not known)

    def __str__(self) -> str:
        return "; ".join((self.summary, *self.details)) + (f" ({self.file})" if self.file else "")


_STAGES = {"disk": "disk", "kv_disk": "KV disk", "compute": "compute", "pcie": "PCIe"}


def _date(stamp: Any) -> str | None:
    """"2026-12-02 10:15" from the probe's "2026-12-02T10:15:07+0000" (None if it is not one)."""
    return stamp[:16].replace("T", " ") if isinstance(stamp, str) and len(stamp) >= 16 else None


def describe_source(provenance: Mapping[str, Any], *, cache_file: str | Path | None = None,
                    profile_file: str | Path | None = None) -> HardwareSource:
    """Where the figures of a probe's ``provenance`` (or a profile's: ``source`` "profile") came
    from. Disk, PCIe and compute figures are measured now or taken from the probe's cache (its
    entries may carry the time they were measured, ``measured_at``; else the cache file's
    modification time says when it was last written); memory is measured on every probe."""
    if provenance.get("source") == "profile" or profile_file is not None:
        probed = _date(provenance.get("when"))
        details = (f"probed {probed}",) if probed else ()
        if profile_file is None:
            details += ("given inline, not as a file",)
        return HardwareSource("from the profile", details, str(profile_file or ""))
    stages = {what: p for what, p in provenance.items() if what in _STAGES and isinstance(p, Mapping)}
    cached = [what for what, p in stages.items() if p.get("source") == "cache"]
    measured = [_STAGES[what] for what in stages if what not in cached]
    if not cached:
        return HardwareSource("measured on this machine just now")
    dates = sorted(d for what in cached if (d := _date(stages[what].get("measured_at"))))
    when = f"measured on this machine {dates[0]}" if dates else "measured on this machine earlier"
    if not dates and cache_file is not None and os.path.exists(cache_file):
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(cache_file)))
        when += f" (cache last written {stamp})"
    details = (f"cached: {', '.join(_STAGES[w] for w in cached)}",
               f"measured now: {', '.join(measured + ['memory'])}")
    return HardwareSource(f"cached, {when}", details, str(cache_file or ""))
