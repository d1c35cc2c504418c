from __future__ import annotations

import copy
import json
import math

import pytest

from tierflow.errors import ConfigError, ProfileError
from tierflow.tiers.plan.hardware import HardwareProfile, Overrides, Profile
from tierflow.tiers.probe.profile import load_profile, save_profile

GiB = 2**30

HARDWARE = {"device": "cuda", "device_memory_bytes": 8 * GiB, "host_memory_bytes": 32 * GiB,
            "disk_read_gbps": 3.0, "decode_gbps": 448.0, "prefill_tflops": 30.0, "h2d_gbps": 24.0,
            "d2h_gbps": 24.0}
DOC = {"version": 1, "hardware": HARDWARE, "overrides": {}}


def with_(path, value):
    """A copy of DOC with the dotted ``path`` set to ``value`` (``...`` deletes it)."""
    doc = copy.deepcopy(DOC)
    *parents, key = path.split(".")
    where = doc
    for parent in parents:
        where = where.setdefault(parent, {})
    if value is ...:
        del where[key]
    else:
        where[key] = value
    return doc


def full_profile():
    hardware = HardwareProfile(
        device="cuda", device_memory_bytes=8 * GiB, host_memory_bytes=32 * GiB, disk_read_gbps=3.0,
        decode_gbps=448.0, prefill_tflops=30.0, h2d_gbps=24.0, d2h_gbps=23.5, device_name="RTX 3060 Ti",
        device_total_bytes=8 * GiB + 4096, pinned_memory_bytes=16 * GiB, kv_disk_read_gbps=2.5,
        kv_disk_write_gbps=1.5, disk_free_bytes=500 * GiB, compute_dtype="float16")
    overrides = Overrides(
        tiers={"embed": "host", "layers.0-7": "device", "layers.8": "disk", "head": "device"},
        device_memory_bytes=6 * GiB, host_memory_bytes=20 * GiB, prefetch_depth=3, io_threads=8,
        io_block_bytes=16 * 2**20, kv_budget_tokens={"device": 0, "host": 65536}, prefill_chunk_tokens=512,
        mlp_chunk_tokens=128, safety_margin=0.0, reader="kvikio")
    return Profile(hardware, overrides, {"probe": "tierflow probe", "samples": [1.0, 2.5]})


# ----------------------------------------------------------------------------- round trips
def test_save_then_load_gives_an_equal_profile(tmp_path):
    profile = full_profile()
    path = save_profile(profile, tmp_path / "machine.json")
    assert path == tmp_path / "machine.json"
    assert load_profile(path) == profile
    assert load_profile(str(path)) == profile


def test_round_trip_of_a_profile_without_hardware(tmp_path):
    profile = Profile(None, Overrides(tiers={"all": "disk"}))
    assert load_profile(save_profile(profile, tmp_path / "p.json")) == profile


def test_load_accepts_a_dict():
    profile = full_profile()
    assert load_profile(profile.to_json()) == profile
    loaded = load_profile(DOC)
    assert loaded.hardware == HardwareProfile(**HARDWARE) and loaded.overrides == Overrides()
    assert loaded.hardware.kv_read_gbps == 3.0 and not loaded.hardware.is_cpu


def test_cpu_hardware_needs_no_link_figures():
    cpu = {k: v for k, v in HARDWARE.items() if k not in ("h2d_gbps", "d2h_gbps")} | {"device": "cpu"}
    hardware = load_profile({"version": 1, "hardware": cpu}).hardware
    assert hardware.is_cpu and hardware.h2d_gbps is None and hardware.d2h_gbps is None


def test_profile_error_is_a_config_error_and_a_value_error():
    assert issubclass(ProfileError, ConfigError) and issubclass(ProfileError, ValueError)


# ----------------------------------------------------------------------------- invalid documents
BAD = {
    "version missing": (with_("version", ...), r"version"),
    "version 2": (with_("version", 2), r"version must be 1, got 2"),
    "version true": (with_("version", True), r"version"),
    "unknown top-level key": (with_("hardwre", {}), r"hardwre"),
    "unknown hardware key": (with_("hardware.gpu_memory", 1), r"hardware\.gpu_memory"),
    "unknown overrides key": (with_("overrides.prefetch", 2), r"overrides\.prefetch"),
    "hardware not an object": (with_("hardware", [1]), r"hardware must be a JSON object"),
    "measured not an object": (with_("measured", [1]), r"measured"),
    "string for an int": (with_("hardware.device_memory_bytes", "8GB"), r"hardware\.device_memory_bytes"),
    "float for an int": (with_("hardware.device_memory_bytes", 8.0 * GiB), r"hardware\.device_memory_bytes"),
    "bool for an int": (with_("overrides.prefetch_depth", True), r"overrides\.prefetch_depth"),
    "bool for a number": (with_("hardware.disk_read_gbps", True), r"hardware\.disk_read_gbps"),
    "string for a number": (with_("hardware.decode_gbps", "fast"), r"hardware\.decode_gbps"),
    "missing required key": (with_("hardware.prefill_tflops", ...), r"hardware\.prefill_tflops is required"),
    "null required key": (with_("hardware.host_memory_bytes", None), r"hardware\.host_memory_bytes is required"),
    "unknown device": (with_("hardware.device", "tpu"), r"hardware\.device must be one of"),
    "cuda without h2d": (with_("hardware.h2d_gbps", ...), r"hardware\.h2d_gbps is required when device is 'cuda'"),
    "cuda without d2h": (with_("hardware.d2h_gbps", None), r"hardware\.d2h_gbps"),
    "bad tier name": (with_("overrides.tiers", {"layers.0": "gpu"}), r"overrides\.tiers\.layers\.0 must be one of"),
    "selector layer.3": (with_("overrides.tiers", {"layer.3": "disk"}), r"'layer\.3' is not a unit selector"),
    "selector layers.5-2": (with_("overrides.tiers", {"layers.5-2": "disk"}), r"'layers\.5-2'"),
    "selector layers.": (with_("overrides.tiers", {"layers.": "disk"}), r"'layers\.'"),
    "tiers not an object": (with_("overrides.tiers", ["all"]), r"overrides\.tiers must be a JSON object"),
    "negative int": (with_("hardware.device_memory_bytes", -1), r"hardware\.device_memory_bytes must be > 0"),
    "zero int": (with_("overrides.prefetch_depth", 0), r"overrides\.prefetch_depth must be > 0"),
    "negative number": (with_("hardware.disk_read_gbps", -3.0), r"hardware\.disk_read_gbps must be > 0"),
    "nan": (with_("hardware.decode_gbps", math.nan), r"hardware\.decode_gbps"),
    "infinity": (with_("hardware.h2d_gbps", math.inf), r"hardware\.h2d_gbps"),
    "negative KV budget": (with_("overrides.kv_budget_tokens", {"device": -300}),
                           r"overrides\.kv_budget_tokens\.device"),
    "KV budget on a tier that does not exist": (with_("overrides.kv_budget_tokens", {"ssd": 5}),
                                                r"overrides\.kv_budget_tokens\.ssd"),
    "io block not 4096-aligned": (with_("overrides.io_block_bytes", 6000),
                                  r"overrides\.io_block_bytes must be a multiple of 4096"),
    "safety margin 1.0": (with_("overrides.safety_margin", 1.0), r"overrides\.safety_margin must be in \[0, 1\)"),
    "negative safety margin": (with_("overrides.safety_margin", -0.1), r"overrides\.safety_margin"),
    "nan safety margin": (with_("overrides.safety_margin", math.nan), r"overrides\.safety_margin"),
    "unknown reader": (with_("overrides.reader", "gds"),
                       r"overrides\.reader must be one of \('auto', 'direct', 'kvikio'\), got 'gds'"),
    "reader not a string": (with_("overrides.reader", 1), r"overrides\.reader must be a string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_document_raises_a_profile_error_naming_the_key(case):
    doc, message = BAD[case]
    with pytest.raises(ProfileError, match=message):
        load_profile(doc)


@pytest.mark.parametrize("case", ["unknown hardware key", "safety margin 1.0"])
def test_errors_from_a_file_name_the_file(tmp_path, case):
    doc, message = BAD[case]
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_invalid_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "version": 1,\n  "hardware": {\n    "device": "cpu",\n  }\n}\n')
    with pytest.raises(ProfileError, match=r"is not valid JSON") as info:
        load_profile(path)
    assert str(path) in str(info.value) and "line 5" in str(info.value)


def test_a_file_holding_a_list_is_a_profile_error(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([DOC]))
    with pytest.raises(ProfileError, match=r"profile must be a JSON object, got list"):
        load_profile(path)


def test_missing_file_is_a_profile_error(tmp_path):
    with pytest.raises(ProfileError, match="cannot read profile") as info:
        load_profile(tmp_path / "absent.json")
    assert "absent.json" in str(info.value)


def test_good_values_at_the_edges_are_accepted():
    doc = with_("overrides", {"safety_margin": 0.0, "io_block_bytes": 4096, "kv_budget_tokens": {"host": 0},
                              "tiers": {"all": "disk", "layers.3-3": "device", "embed": "host", "head": "host"}})
    overrides = load_profile(doc).overrides
    assert overrides.safety_margin == 0.0 and overrides.io_block_bytes == 4096
    assert overrides.kv_budget_tokens == {"host": 0} and overrides.tiers["layers.3-3"] == "device"


@pytest.mark.parametrize("reader", ["auto", "direct", "kvikio"])
def test_every_reader_round_trips(tmp_path, reader):
    profile = load_profile(with_("overrides.reader", reader))
    assert profile.overrides.reader == reader and profile.to_json()["overrides"] == {"reader": reader}
    assert load_profile(save_profile(profile, tmp_path / "p.json")) == profile


def test_no_reader_means_the_engine_chooses():
    profile = load_profile(DOC)
    assert profile.overrides.reader is None and "reader" not in profile.to_json()["overrides"]


# ----------------------------------------------------------------------------- atomic writes
def test_save_leaves_no_temporary_file(tmp_path):
    save_profile(full_profile(), tmp_path / "machine.json")
    save_profile(full_profile(), tmp_path / "machine.json")
    assert [p.name for p in tmp_path.iterdir()] == ["machine.json"]


def test_save_replaces_an_existing_file_whole(tmp_path):
    path = tmp_path / "machine.json"
    path.write_text("x" * 100_000)
    profile = Profile(None, Overrides(prefetch_depth=1))
    save_profile(profile, path)
    assert json.loads(path.read_text()) == profile.to_json()
    assert load_profile(path) == profile


def test_failed_save_keeps_the_old_file(tmp_path):
    path = save_profile(full_profile(), tmp_path / "machine.json")
    before = path.read_text()
    unserialisable = Profile(None, Overrides(), {"started": object()})
    with pytest.raises(TypeError):
        save_profile(unserialisable, path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["machine.json"]


def test_save_creates_missing_directories(tmp_path):
    path = save_profile(full_profile(), tmp_path / "a" / "b" / "machine.json")
    assert load_profile(path) == full_profile()
