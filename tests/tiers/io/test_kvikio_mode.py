"""Whether kvikio reads through GPUDirect Storage, told from what kvikio exposes (stand-in kvikio
modules here): "gds" only when kvikio is not in its compatibility mode AND cuFile's driver
properties say nvidia-fs is loaded; anything a kvikio version lacks counts as not verified.
``reader="auto"`` takes kvikio only in "gds" mode; an explicit ``reader="kvikio"`` is built in
compatibility mode too, and says so."""

from __future__ import annotations

import enum
import logging
import sys
import types

import pytest

from tierflow.testing import build_random_checkpoint
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.io import kvikio as kv
from tierflow.tiers.io import kvikio_setup as setup
from tests.tiers.io.test_kvikio import FakeKvikio

KiB = 1024


class CompatMode(enum.Enum):       # kvikio's enum (24.12 and later)
    OFF = 0
    ON = 1
    AUTO = 2


def module(*, defaults: object | None = None, driver: object | None = None) -> types.ModuleType:
    """A stand-in ``kvikio`` with only the parts given (no ``kvikio.<sub>`` can be imported from it)."""
    fake = types.ModuleType("kvikio")
    if defaults is not None:
        fake.defaults = defaults
    if driver is not None:
        fake.cufile_driver = driver
    return fake


def properties(**figures: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(properties=types.SimpleNamespace(**figures))


PREFERS_GDS = types.SimpleNamespace(is_compat_mode_preferred=lambda: False)      # kvikio 25.04 and later
NVIDIA_FS = properties(is_gds_available=True, max_device_cache_size=256 * KiB)


class Raising:
    """Driver properties whose reading fails, as they do where cuFile's driver cannot open."""

    @property
    def is_gds_available(self) -> bool:
        raise RuntimeError("Unable to open GDS file driver")


class DriverProperties:            # kvikio 24.12 and 25.02: a class in kvikio.cufile_driver
    is_gds_available = True
    max_device_cache_size = 128 * KiB


# ----------------------------------------------------------------------------- telling the mode
@pytest.mark.parametrize("fake, mode, cache", [
    (module(defaults=PREFERS_GDS, driver=NVIDIA_FS), "gds", 256 * 2**20),
    (module(defaults=types.SimpleNamespace(compat_mode=lambda: CompatMode.AUTO),
            driver=types.SimpleNamespace(DriverProperties=DriverProperties)), "gds", 128 * 2**20),
    (module(defaults=types.SimpleNamespace(compat_mode=lambda: CompatMode.OFF),
            driver=types.SimpleNamespace(DriverProperties=DriverProperties)), "gds", 128 * 2**20),
    (module(defaults=PREFERS_GDS, driver=properties(is_gds_available=True)), "gds", setup.CUFILE_CACHE_BYTES),
], ids=["25.04+", "24.12-auto", "24.12-off", "no-cache-size"])
def test_gds_is_verified_by_the_mode_and_the_driver(fake, mode, cache):
    assert setup.gds_status(fake) == (mode, "", cache)
    assert setup.transfer_mode(fake) == "gds"


@pytest.mark.parametrize("fake, why", [
    # KVIKIO_COMPAT_MODE=ON, or AUTO where libcufile does not load
    (module(defaults=types.SimpleNamespace(is_compat_mode_preferred=lambda: True), driver=NVIDIA_FS),
     "compatibility mode"),
    (module(defaults=types.SimpleNamespace(compat_mode=lambda: CompatMode.ON), driver=NVIDIA_FS),
     "compatibility mode"),
    (module(defaults=types.SimpleNamespace(compat_mode=lambda: True), driver=NVIDIA_FS), "compatibility mode"),
    # libcufile loads, but nvidia-fs is absent (most cloud GPUs): kvikio does not prefer compat mode
    (module(defaults=PREFERS_GDS, driver=properties(is_gds_available=False)), "no nvidia-fs"),
], ids=["preferred", "compat-on", "pre-24.12-true", "no-nvidia-fs"])
def test_compatibility_mode(fake, why):
    mode, reason, cache = setup.gds_status(fake)
    assert (mode, cache) == ("compat", 0) and why in reason


@pytest.mark.parametrize("fake", [
    module(),                                                                        # no defaults at all
    module(defaults=types.SimpleNamespace(), driver=NVIDIA_FS),                      # neither mode function
    module(defaults=types.SimpleNamespace(is_compat_mode_preferred=lambda: "no"), driver=NVIDIA_FS),
    module(defaults=types.SimpleNamespace(compat_mode=lambda: False)),               # before 24.12: no driver
    module(defaults=PREFERS_GDS),                                                    # no cufile_driver
    module(defaults=PREFERS_GDS, driver=types.SimpleNamespace()),                    # no properties
    module(defaults=PREFERS_GDS, driver=properties()),                               # no is_gds_available
    module(defaults=PREFERS_GDS, driver=properties(is_gds_available=1)),             # not a bool
    module(defaults=PREFERS_GDS, driver=types.SimpleNamespace(properties=Raising())),
    module(defaults=types.SimpleNamespace(is_compat_mode_preferred=lambda: (_ for _ in ()).throw(RuntimeError())),
           driver=NVIDIA_FS),
], ids=["no-defaults", "no-mode", "odd-mode", "bool-mode-no-driver", "no-driver", "no-properties",
        "no-is-gds-available", "not-bool", "driver-fails", "mode-fails"])
def test_what_cannot_be_read_is_not_verified(fake):
    assert setup.gds_status(fake)[0] == "compat"
    assert setup.transfer_mode(fake) == "compat"


def test_kvikio_status_without_kvikio(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)
    status = setup.kvikio_status()
    assert status.mode == "absent" and "cannot be imported" in status.reason and status.cufile_cache_bytes == 0


def test_kvikio_status_with_gds(monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", module(defaults=PREFERS_GDS, driver=NVIDIA_FS))
    assert setup.kvikio_status() == setup.KvikioStatus("gds", "", 256 * 2**20)


# ----------------------------------------------------------------------------- choosing the reader
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointIndex:
    path = build_random_checkpoint(tmp_path_factory.mktemp("kvikio-mode") / "llama", "llama", num_layers=1)
    return CheckpointIndex.open(path)


@pytest.fixture
def install(monkeypatch):
    monkeypatch.delenv("KVIKIO_NTHREADS", raising=False)

    def install(**kwargs) -> FakeKvikio:
        fake = FakeKvikio(**kwargs)
        monkeypatch.setitem(sys.modules, "kvikio", fake.module)
        return fake
    return install


def test_gds_active_auto_takes_kvikio(install, checkpoint, caplog):
    install(compat=False, gds=True)
    assert setup.choose_reader("auto", "cuda") == setup.choose_reader(None, "cuda") == "kvikio"
    with caplog.at_level(logging.WARNING, logger="tierflow.tiers.io.kvikio"):
        reader = kv.KvikioReader(checkpoint.files)
    try:
        assert reader.statistics().mode == "gds"
    finally:
        reader.close()
    assert "compatibility mode" not in caplog.text


@pytest.mark.parametrize("kwargs", [dict(compat=True), dict(compat=False, gds=False), dict(compat=False)],
                         ids=["compat-preferred", "no-nvidia-fs", "driver-unknown"])
def test_compat_mode_auto_takes_the_direct_reader(install, caplog, kwargs):
    install(**kwargs)
    with caplog.at_level(logging.INFO, logger="tierflow.tiers.io.kvikio_setup"):
        assert setup.choose_reader("auto", "cuda") == "direct"
    assert "O_DIRECT reads into pinned memory" in caplog.text


@pytest.mark.parametrize("kwargs", [dict(compat=True), dict(compat=False, gds=False)],
                         ids=["compat-preferred", "no-nvidia-fs"])
def test_explicit_kvikio_in_compat_mode_still_reads_and_says_so(install, checkpoint, caplog, kwargs):
    install(**kwargs)
    assert setup.choose_reader("kvikio", "cuda") == "kvikio"
    with caplog.at_level(logging.WARNING, logger="tierflow.tiers.io.kvikio"):
        reader = kv.KvikioReader(checkpoint.files)
    try:
        assert reader.statistics().mode == "compat"
    finally:
        reader.close()
    assert "kvikio runs in its compatibility mode" in caplog.text


def test_auto_on_cpu_never_asks_kvikio(monkeypatch):
    asked = []
    monkeypatch.setattr(setup, "kvikio_status", lambda: asked.append(1))
    assert setup.choose_reader("auto", "cpu") == "direct" and asked == []
