"""What the command-line tests share: the probe kept quick and private."""

from __future__ import annotations

import functools

import pytest

from tierflow.tiers.probe import probe as probe_mod


@pytest.fixture
def small_disk_probe(monkeypatch, tmp_path):
    """The probe writes its cache under tmp_path and measures the disk with a small file."""
    monkeypatch.setenv("TIERFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(probe_mod, "measure_disk",
                        functools.partial(probe_mod.measure_disk, file_bytes=8 * 2**20, seconds=0.2))
