"""What NVML says about a GPU: its name, memory, clocks and PCIe link.

The probe measures the copy bandwidth it can get; NVML tells what the link is (a GPU in a
x4 slot, or one that trained at gen3, explains a low figure) and what it could be. The
``nvidia-ml-py`` package (``import pynvml``) is optional: without it, or without a driver,
``device_figures`` returns None and the probe goes on with what torch reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# transfer rate per lane in GT/s, and the share of it that is payload (line encoding)
_PCIE_LANE = {1: (2.5, 8 / 10), 2: (5.0, 8 / 10), 3: (8.0, 128 / 130), 4: (16.0, 128 / 130), 5: (32.0, 128 / 130),
              6: (64.0, 242 / 256)}


def pcie_link_gbps(generation: int, width: int) -> float | None:
    """One direction of a PCIe link, in GB/s, before protocol overheads (None: unknown generation)."""
    if generation not in _PCIE_LANE or width < 1:
        return None
    rate, payload = _PCIE_LANE[generation]
    return rate * payload * width / 8


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    pcie_generation: int           # the link as it runs now (an idle GPU may train down to save power)
    pcie_width: int
    pcie_max_generation: int       # what the GPU and the slot can do
    pcie_max_width: int
    sm_clock_mhz: int | None
    max_sm_clock_mhz: int | None

    @property
    def pcie_link(self) -> str:
        now = f"gen{self.pcie_generation} x{self.pcie_width}"
        best = f"gen{self.pcie_max_generation} x{self.pcie_max_width}"
        return now if now == best else f"{now} now, {best} at most"

    @property
    def pcie_max_gbps(self) -> float | None:
        return pcie_link_gbps(self.pcie_max_generation, self.pcie_max_width)


def device_figures(index: int = 0) -> DeviceFigures | None:
    """NVML's figures for GPU ``index``, or None where NVML is not available."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:       # noqa: BLE001 - NVMLError and driver-less errors: no figures, not a failure
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return DeviceFigures(
            name=name.decode() if isinstance(name, bytes) else str(name),
            memory_total_bytes=int(memory.total), memory_free_bytes=int(memory.free),
            pcie_generation=int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
            pcie_width=int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
            pcie_max_generation=int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
            pcie_max_width=int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
            sm_clock_mhz=_optional(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            max_sm_clock_mhz=_optional(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM))
    except Exception as exc:       # noqa: BLE001 - a GPU NVML cannot describe: go on without its figures
        log.debug("NVML could not describe GPU %d: %s", index, exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:          # noqa: BLE001
            pass


def _optional(fn: Any, *args: Any) -> int | None:
    try:
        return int(fn(*args))
    except Exception:              # noqa: BLE001 - some GPUs do not report clocks
        return None
