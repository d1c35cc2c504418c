"""Fuzzing the parsers of the files a user hands tierflow: config.json (as ``Engine.open``
reads it, through ``CheckpointIndex.open``, and as ``tierflow plan`` does, through
``config_spec``), safetensors headers (``read_header``) and profiles (``load_profile``, from a
file or a dict, and the plan's unit selectors). Documents are random, mostly invalid: real
keys with random JSON values, dropped keys, wrong types, huge numbers, random bytes. Valid
ones may succeed; whatever fails must fail with a ``TierflowError``, never a ``TypeError``,
``ValueError``, ``KeyError`` or ``RecursionError`` from inside the parser.

Hypothesis keeps no example database (``database=None``) and skips its explain phase, which
writes patch files on a failure: nothing is written into the repository or HOME.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tierflow.adapters import ADAPTERS, MODEL_TYPES
from tierflow.adapters.spec import CONFIG_KEYS, ROPE_KEYS
from tierflow.engine.planning import config_spec
from tierflow.errors import TierflowError
from tierflow.testing import build_random_llama
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.checkpoint.safetensors import DTYPES, read_header
from tierflow.tiers.plan.hardware import _HARDWARE_TYPES, Overrides, parse_selector
from tierflow.tiers.probe.profile import load_profile

# no example database, and no explain phase (which writes patches under .hypothesis/ on a failure)
FUZZ = settings(max_examples=150, deadline=None, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])

numbers = st.one_of(st.integers(-3, 5000), st.integers(), st.integers(-2**1100, 2**1100),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 2.0, 2.5, 1e300, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=8),
                    st.sampled_from(["three", "64", "silu", "llama3", "linear", "F32", "sliding_attention"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return build_random_llama(root / "untied", num_layers=2), build_random_llama(root / "tied", num_layers=3,
                                                                                 tie_word_embeddings=True, seed=1)


def _dumps(doc: object) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def _quiet(fn, *args) -> object:
    try:
        return fn(*args)
    except TierflowError:
        return None


# ----------------------------------------------------------------------------- config.json
rope_objects = st.dictionaries(st.sampled_from([*ROPE_KEYS, "full_attention", "sliding_attention"]),
                               st.one_of(json_values, st.dictionaries(st.sampled_from(list(ROPE_KEYS)), json_values,
                                                                      max_size=4)), max_size=5)
config_values = st.one_of(json_values, rope_objects, st.sampled_from(list(ADAPTERS)).map(lambda a: [a]),
                          st.sampled_from(list(MODEL_TYPES)))


@st.composite
def config_documents(draw, bases: tuple[str, ...]) -> bytes:
    """A checkpoint's config.json with keys dropped and others set to random values; or any
    JSON document; or random bytes."""
    kind = draw(st.sampled_from(["edited", "edited", "edited", "any json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "any json":
        return _dumps(draw(json_values))
    config = json.loads(draw(st.sampled_from(bases)))
    for key in draw(st.lists(st.sampled_from(sorted(config)), max_size=3)):
        config.pop(key, None)
    config.update(draw(st.dictionaries(st.sampled_from([*CONFIG_KEYS, "unknown"]), config_values, max_size=4)))
    return _dumps(config)


@FUZZ
@given(data=st.data(), weights=st.sampled_from(["matching", "other", "none"]))
def test_config_json_fails_only_with_tierflow_errors(checkpoints, data, weights):
    document = data.draw(config_documents(tuple((path / "config.json").read_text() for path in checkpoints)))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "config.json").write_bytes(document)
        if weights != "none":
            (directory / "model.safetensors").symlink_to(checkpoints[weights == "other"] / "model.safetensors")
        _quiet(CheckpointIndex.open, directory)
        _quiet(config_spec, directory)


# ----------------------------------------------------------------------------- safetensors headers
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(list(DTYPES)), json_values),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-8, 200), min_size=2, max_size=2), json_values),
})
headers = st.one_of(st.dictionaries(st.text(max_size=4), st.one_of(entries, json_values), max_size=4).map(_dumps),
                    json_values.map(_dumps), st.binary(max_size=64))


@FUZZ
@given(header=headers, length_delta=st.one_of(st.just(0), st.integers(-10, 10), st.integers(0, 2**64 - 1)),
       data_bytes=st.integers(0, 256))
def test_safetensors_header_fails_only_with_tierflow_errors(header, length_delta, data_bytes):
    length = len(header) + length_delta if length_delta < 2**20 else length_delta
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(struct.pack("<Q", min(max(length, 0), 2**64 - 1)) + header + b"\0" * data_bytes)
        entries_read = _quiet(read_header, path)
    if entries_read is not None:    # what parses is consistent with the file
        for entry in entries_read.values():
            assert entry.nbytes == math.prod(entry.shape) * entry.dtype.itemsize
            assert entry.file_offset + entry.nbytes <= 8 + len(header) + data_bytes


# ----------------------------------------------------------------------------- profiles
selectors = st.one_of(st.sampled_from(["all", "embed", "head", "layers.0", "layers.1-2", "layers.2-1", "layers.9"]),
                      st.builds("layers.{}-{}".format, st.integers(0, 10**30), st.integers(0, 10**30)),
                      st.text(max_size=8))
hardware = st.dictionaries(st.sampled_from([*_HARDWARE_TYPES, "unknown"]),
                           st.one_of(numbers, json_values, st.sampled_from(["cpu", "cuda", "gds", ""])), max_size=8)
valid_hardware = st.fixed_dictionaries({
    "device": st.sampled_from(["cpu", "cuda"]), "device_memory_bytes": numbers, "host_memory_bytes": numbers,
    "disk_read_gbps": numbers, "decode_gbps": numbers, "prefill_tflops": numbers},
    optional={"h2d_gbps": numbers, "d2h_gbps": numbers, "device_overhead_bytes": numbers})
overrides = st.dictionaries(
    st.sampled_from([f for f in Overrides.__dataclass_fields__ if f != "source"] + ["unknown"]),
    st.one_of(numbers, json_values, st.dictionaries(selectors, st.sampled_from(["device", "host", "disk", 3]),
                                                    max_size=3)), max_size=5)
profiles = st.fixed_dictionaries({}, optional={
    "version": st.one_of(st.just(1), json_values), "hardware": st.one_of(valid_hardware, hardware, json_values),
    "overrides": st.one_of(overrides, json_values), "measured": json_values})


@FUZZ
@given(doc=st.one_of(profiles, json_values), form=st.sampled_from(["file", "dict", "bytes"]),
       raw=st.binary(max_size=48))
def test_profile_fails_only_with_tierflow_errors(doc, form, raw):
    if form == "dict":
        profile = _quiet(load_profile, doc) if isinstance(doc, dict) else None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "profile.json"
            path.write_bytes(raw if form == "bytes" else _dumps(doc))
            profile = _quiet(load_profile, path)
    if profile is not None:         # what parses plans: its selectors meet a 3-layer model
        for selector in profile.overrides.tiers:
            _quiet(parse_selector, selector, 3, profile.overrides.source)
        if profile.hardware is not None:
            assert all(not isinstance(v, float) or math.isfinite(v) for v in profile.hardware.to_json().values())
