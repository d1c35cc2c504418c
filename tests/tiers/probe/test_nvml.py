"""NVML figures: the PCIe link and clocks of a GPU, from a fake pynvml (no GPU here), and
their way into the hardware profile and the plan report."""

from __future__ import annotations

import sys
import types

import pytest

from tierflow.tiers.probe.nvml import device_figures, pcie_link_gbps
from tierflow.tiers.plan.hardware import HardwareProfile, parse_hardware


class NVMLError(Exception):
    pass


def _fake_pynvml(*, init_fails: bool = False, clocks: bool = True) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVML_CLOCK_SM = 1
    m.calls = []

    def init():
        m.calls.append("init")
        if init_fails:
            raise NVMLError("Driver Not Loaded")

    def clock(handle, kind):
        if not clocks:
            raise NVMLError("Not Supported")
        return 1980 if kind == m.NVML_CLOCK_SM else 0

    m.nvmlInit = init
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30, free=79 * 2**30)
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 1           # idle: trained down
    m.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 5
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetClockInfo = clock
    m.nvmlDeviceGetMaxClockInfo = clock
    return m


def test_pcie_link_bandwidth_per_generation():
    assert pcie_link_gbps(3, 16) == pytest.approx(15.75, abs=0.01)      # 8 GT/s, 128b/130b
    assert pcie_link_gbps(4, 16) == pytest.approx(31.5, abs=0.01)
    assert pcie_link_gbps(5, 16) == pytest.approx(63.0, abs=0.02)
    assert pcie_link_gbps(2, 8) == pytest.approx(4.0)                  # 5 GT/s, 8b/10b
    assert pcie_link_gbps(9, 16) is None and pcie_link_gbps(4, 0) is None


def test_figures_from_nvml(monkeypatch):
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    f = device_figures(0)
    assert f is not None and f.name == "NVIDIA H100 80GB HBM3"
    assert f.memory_total_bytes == 80 * 2**30 and f.memory_free_bytes == 79 * 2**30
    assert f.pcie_link == "gen1 x16 now, gen5 x16 at most"
    assert f.pcie_max_gbps == pytest.approx(63.0, abs=0.02)
    assert f.sm_clock_mhz == f.max_sm_clock_mhz == 1980
    assert fake.calls == ["init", "shutdown"]


def test_no_clocks_is_not_a_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(clocks=False))
    f = device_figures(0)
    assert f is not None and f.sm_clock_mhz is None and f.pcie_max_width == 16


def test_without_a_driver_or_the_package_there_are_no_figures(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_fails=True))
    assert device_figures(0) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)        # import pynvml raises ImportError
    assert device_figures(0) is None


def test_the_link_goes_into_the_profile_and_the_report():
    from rich.console import Console

    from tierflow.cli.report import _hardware_table

    doc = {"device": "cuda", "device_memory_bytes": 8 * 2**30, "host_memory_bytes": 32 * 2**30,
           "disk_read_gbps": 3.0, "decode_gbps": 400.0, "prefill_tflops": 20.0, "h2d_gbps": 24.5, "d2h_gbps": 25.1,
           "pcie_link": "gen4 x16", "pcie_link_gbps": 31.5}
    hw = parse_hardware(doc)
    assert hw.pcie_link == "gen4 x16" and hw.pcie_link_gbps == 31.5
    assert HardwareProfile(**hw.to_json()) == hw
    console = Console(record=True, width=160)
    console.print(_hardware_table(hw, "profile"))
    text = console.export_text()
    assert "24.5 GB/s to the device, 25.1 GB/s back" in text
    assert "gen4 x16, 31.5 GB/s each way at most" in text
