"""Bad model files and profiles: config.json with wrong types, config.json without
``architectures``, malformed safetensors headers, impossible or unreadable profiles, and
weights that make a request's logits non-finite.
Each raises a named tierflow error whose message names the file, the key and the value; a
valid input next still gives the transformers oracle's tokens."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tierflow import CheckpointError, Engine, EngineConfig, ProfileError, SamplingParams, UnsupportedModelError
from tierflow.engine.planning import config_spec
from tierflow.errors import RequestError
from tierflow.testing import oracle_greedy
from tierflow.tiers.checkpoint.index import CheckpointIndex
from tierflow.tiers.checkpoint.safetensors import read_header
from tierflow.tiers.probe.profile import load_profile

CONFIG = EngineConfig(device="cpu", kv_reserve_tokens=64, prefill_chunk_tokens=64)
GOOD = [1, 2, 3, 4]
HARDWARE = {"device": "cpu", "device_memory_bytes": 2**33, "host_memory_bytes": 2**33, "disk_read_gbps": 2.0,
            "decode_gbps": 20.0, "prefill_tflops": 1.0}


def _greedy(path, prompt=GOOD, n=4, config=CONFIG):
    async def main():
        async with await Engine.open(path, config) as engine:
            return list((await engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True))).token_ids)
    return asyncio.run(main())


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


def _edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return path


_DROP = object()

# ----------------------------------------------------------------------------- 1. config.json types
WRONG_TYPES = {
    "layers as a word": ("num_hidden_layers", "three", "an integer"),
    "hidden size as a string": ("hidden_size", "64", "an integer"),
    "negative layers": ("num_hidden_layers", -1, "an integer from 1"),
    "zero layers": ("num_hidden_layers", 0, "an integer from 1"),
    "fractional heads": ("num_attention_heads", 2.5, "an integer"),
    "layers as a list": ("num_hidden_layers", [3], "an integer"),
    "null vocabulary": ("vocab_size", None, "an integer"),
    "bool layers": ("num_hidden_layers", True, "an integer"),
    "huge layers": ("num_hidden_layers", 10**9, "from 1 to 65536"),
    "huge hidden size": ("hidden_size", 2**49, "from 1 to 2\\*\\*48"),
    "eps as a string": ("rms_norm_eps", "1e-6", "a finite number"),
    "tie as a string": ("tie_word_embeddings", "false", "true or false"),
    "architectures as a string": ("architectures", "LlamaForCausalLM", "a list of strings"),
    "eos as a string": ("eos_token_id", "2", "a token id"),
    "rope_scaling as a list": ("rope_scaling", [1, 2], "a JSON object"),
}


@pytest.mark.parametrize("key, value, expected", WRONG_TYPES.values(), ids=WRONG_TYPES)
def test_wrong_config_types_name_file_key_value_and_type(model_copy, key, value, expected):
    path = _edit_config(model_copy, **{key: value})
    shown = "null" if value is None else repr(value)
    with pytest.raises(CheckpointError) as info:
        CheckpointIndex.open(model_copy)
    message = str(info.value)
    assert str(path) in message and key in message and shown in message, message
    assert re.search(expected, message), message
    with pytest.raises(CheckpointError, match=re.escape(str(path))):    # tierflow plan reads config.json alone
        config_spec(model_copy)


def test_wrong_config_type_through_engine_open(model_copy, tiny_model):
    path = _edit_config(model_copy, num_hidden_layers="three")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: num_hidden_layers must be an integer "
                                              r"from 1 to 65536, found 'three'"):
        _greedy(model_copy)
    assert _greedy(tiny_model) == oracle_greedy(tiny_model, GOOD, 4)


def test_an_integral_float_counts_as_an_int(model_copy):
    _edit_config(model_copy, num_hidden_layers=3.0, hidden_size=64.0)
    assert CheckpointIndex.open(model_copy).spec.num_layers == 3


@pytest.mark.parametrize("rope_scaling, message", [
    ({"rope_type": "llama3", "factor": 8.0}, r"rope_scaling of rope type 'llama3' lacks \['low_freq_factor'"),
    ({"rope_type": "linear", "factor": "2"}, r"rope_scaling\.factor must be a finite number > 0, found '2'"),
    ({"rope_type": "linear"}, r"rope_scaling of rope type 'linear' lacks \['factor'\]"),
])
def test_rope_fields_are_checked_when_the_config_is_read(model_copy, rope_scaling, message):
    path = _edit_config(model_copy, rope_scaling=rope_scaling)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: {message}"):
        CheckpointIndex.open(model_copy)


@pytest.mark.parametrize("content, message", [
    (b'{"hidden_size": 64', "is not valid JSON"),
    (b'[1, 2, 3]', "must hold a JSON object, found list"),
    (b'{"model_type": "llama\xff"}', "is not UTF-8"),
    (b"[" * 100_000, "cannot be parsed as JSON"),
    (b'{"hidden_size": ' + b"1" * 5000 + b"}", "cannot be parsed as JSON"),
])
def test_config_that_is_not_a_json_object(model_copy, content, message):
    (model_copy / "config.json").write_bytes(content)
    for entry in (CheckpointIndex.open, config_spec):
        with pytest.raises(CheckpointError, match=rf"{re.escape(str(model_copy / 'config.json'))}.*{message}"):
            entry(model_copy)


def test_generation_config_that_is_not_json(model_copy, tiny_model):
    (model_copy / "generation_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        _greedy(model_copy)
    (model_copy / "generation_config.json").write_text('{"eos_token_id": "two"}')
    with pytest.raises(CheckpointError, match="generation_config.json: expected .* eos_token_id is a token id"):
        _greedy(model_copy)


# ----------------------------------------------------------------------------- 2. the family from model_type
def test_family_from_model_type_when_architectures_is_missing(model_copy):
    _edit_config(model_copy, architectures=_DROP)
    assert json.loads((model_copy / "config.json").read_text())["model_type"] == "llama"
    assert CheckpointIndex.open(model_copy).spec.architecture == "LlamaForCausalLM"
    assert _greedy(model_copy, n=6) == oracle_greedy(model_copy, GOOD, 6)


@pytest.mark.parametrize("model_type", [_DROP, "gpt2", None])
def test_no_family_says_how_to_name_one(model_copy, model_type):
    path = _edit_config(model_copy, architectures=_DROP, model_type=model_type)
    with pytest.raises(UnsupportedModelError) as info:
        CheckpointIndex.open(model_copy)
    message = str(info.value)
    assert str(path) in message and "LlamaForCausalLM, MistralForCausalLM" in message
    assert '"architectures": ["LlamaForCausalLM"]' in message and "add" in message
    if model_type == "gpt2":
        assert "'gpt2'" in message


def test_model_type_does_not_override_an_unsupported_architecture(model_copy):
    _edit_config(model_copy, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(UnsupportedModelError, match="LlamaForSequenceClassification.*is not supported"):
        CheckpointIndex.open(model_copy)


# ----------------------------------------------------------------------------- 3. safetensors headers
def _write(path: Path, header: object, data_bytes: int = 64, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * data_bytes)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "offsets as strings": ({"w": {**F32, "data_offsets": ["0", "8"]}}, "tensor 'w': data_offsets must be two integers"),
    "three offsets": ({"w": {**F32, "data_offsets": [0, 8, 8]}}, "tensor 'w': data_offsets must be two integers"),
    "entry not an object": ({"w": [1, 2]}, "tensor 'w': its header entry must be an object"),
    "entry lacks shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, r"tensor 'w': .*lacks \['shape'\]"),
    "unknown dtype": ({"w": {**F32, "dtype": "F8_E9"}}, "tensor 'w': dtype 'F8_E9' is not one of"),
    "dtype as a list": ({"w": {**F32, "dtype": ["F32"]}}, r"tensor 'w': dtype \['F32'\] is not one of"),
    "shape of strings": ({"w": {**F32, "shape": ["2"]}}, "tensor 'w': shape must be a list of at most 64 integers"),
    "negative shape": ({"w": {**F32, "shape": [-2], "data_offsets": [8, 0]}}, "tensor 'w': shape must be"),
    "bool shape": ({"w": {**F32, "shape": [True, True]}}, "tensor 'w': shape must be"),
    "float shape": ({"w": {**F32, "shape": [2.0]}}, "tensor 'w': shape must be"),
    "shape not a list": ({"w": {**F32, "shape": 2}}, "tensor 'w': shape must be"),
    "reversed offsets": ({"w": {**F32, "shape": [0], "data_offsets": [8, 0]}}, "tensor 'w': data_offsets .* reversed"),
    "size disagrees with shape": ({"w": {**F32, "data_offsets": [0, 12]}}, "tensor 'w': shape .* needs 8 bytes"),
    "outside the data area": ({"w": {**F32, "shape": [16], "data_offsets": [32, 96]}}, "tensor 'w' ends at byte"),
    "overlapping tensors": ({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, "tensors 'a' and 'b' overlap"),
    "not an object": ([F32], "safetensors header must be a JSON object, found list"),
}


@pytest.mark.parametrize("header, message", BAD_HEADERS.values(), ids=BAD_HEADERS)
def test_bad_safetensors_header_names_file_and_tensor(tmp_path, header, message):
    path = _write(tmp_path / "w.safetensors", header)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: {message}"):
        read_header(path)


@pytest.mark.parametrize("raw, message", [
    (b'{"w": "\xff"}', "not valid JSON"), (b"{not json", "not valid JSON"), (b"[" * 50_000, "not valid JSON"),
    (b'{"w": ' + b"9" * 5000 + b"}", "not valid JSON"),
])
def test_header_that_is_not_utf8_json(tmp_path, raw, message):
    path = _write(tmp_path / "w.safetensors", None, raw=raw)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: safetensors header is {message}"):
        read_header(path)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: header length 10000 does not fit"):
        read_header(path)


def test_valid_headers_still_parse(tmp_path):
    path = _write(tmp_path / "w.safetensors", {"__metadata__": {"format": "pt"}, "a": F32,
                                               "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 20]},
                                               "empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}})
    entries = read_header(path)
    data_start = 8 + len(path.read_bytes()) - 8 - 64
    assert {n: (e.shape, e.file_offset, e.nbytes) for n, e in entries.items()} == {
        "a": ((2,), data_start, 8), "b": ((2, 3), data_start + 8, 12), "empty": ((0,), data_start + 8, 0)}


def test_checkpoint_with_string_offsets_names_file_and_tensor(model_copy, tiny_model):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [str(v) for v in header[name]["data_offsets"]]
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(f))}: tensor {re.escape(repr(name))}: data_offsets"):
        _greedy(model_copy)
    assert _greedy(tiny_model) == oracle_greedy(tiny_model, GOOD, 4)


# ----------------------------------------------------------------------------- 4. profiles
def test_profile_that_is_not_utf8(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b'{"version": 1, "hardware": {"device_name": "\xff"}}')
    with pytest.raises(ProfileError, match=rf"{re.escape(str(path))} is not UTF-8 text \(byte 44"):
        load_profile(path)


@pytest.mark.parametrize("text", ["[" * 100_000, '{"version": ' + "1" * 5000 + "}"])
def test_profile_json_too_deep_or_too_long_a_number(tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=rf"{re.escape(str(path))} cannot be parsed as JSON"):
        load_profile(path)


IMPOSSIBLE = {
    "disk at 1e300 GB/s": ("disk_read_gbps", 1e300, "beyond its plausible range: at most 100000 GB/s"),
    "decode at 1e6 TB/s": ("decode_gbps", 1e9, "at most 100000 GB/s"),
    "1e30 bytes of RAM": ("host_memory_bytes", 10**30, r"at most 2\*\*60 bytes"),
    "2**61 bytes of device": ("device_memory_bytes", 2**61, r"at most 2\*\*60 bytes"),
    "1e300 TFLOP/s": ("prefill_tflops", 1e300, r"at most 1e\+06 TFLOP/s \(10\^18 FLOP/s\)"),
    "a 1e400-digit integer bandwidth": ("disk_read_gbps", 10**400, "at most 100000 GB/s"),
    "zero bandwidth": ("disk_read_gbps", 0, "must be > 0"),
    "negative memory": ("device_memory_bytes", -5, "must be > 0"),
    "negative overhead": ("device_overhead_bytes", -1, "must be >= 0"),
    "NaN compute": ("prefill_tflops", math.nan, "must be a number"),
    "infinite bandwidth": ("decode_gbps", math.inf, "must be a number"),
}


@pytest.mark.parametrize("key, value, message", IMPOSSIBLE.values(), ids=IMPOSSIBLE)
def test_impossible_profile_numbers(tmp_path, key, value, message):
    doc = {"version": 1, "hardware": {**HARDWARE, key: value}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    shown = re.escape(repr(value)[:77])
    for source, prefix in ((path, re.escape(str(path)) + ": "), (doc, "")):
        with pytest.raises(ProfileError, match=rf"^{prefix}hardware\.{key}.*{shown}") as info:
            load_profile(source)
        assert re.search(message, str(info.value)), str(info.value)


def test_impossible_override_counts(tmp_path):
    for key in ("prefetch_depth", "io_threads", "device_memory_bytes"):
        with pytest.raises(ProfileError, match=rf"overrides\.{key} = 1{'0' * 21} is beyond its plausible range"):
            load_profile({"version": 1, "overrides": {key: 10**21}})
    with pytest.raises(ProfileError, match=r"overrides\.kv_budget_tokens\.host = 1099511627777 is beyond"):
        load_profile({"version": 1, "overrides": {"kv_budget_tokens": {"host": 2**40 + 1}}})


def test_a_dict_profile_through_engine_config_is_checked_too(tiny_model):
    config = EngineConfig(device="cpu", kv_reserve_tokens=64, profile={"version": 1,
                                                                        "hardware": {**HARDWARE, "decode_gbps": 1e300}})
    with pytest.raises(ProfileError, match=r"hardware\.decode_gbps = 1e\+300 is beyond its plausible range"):
        _greedy(tiny_model, config=config)


def test_selector_beyond_the_model_names_the_profile_file(tmp_path, tiny_model):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"version": 1, "hardware": HARDWARE, "overrides": {"tiers": {"layers.2-9": "disk"}}}))
    config = EngineConfig(device="cpu", kv_reserve_tokens=64, profile=str(path))
    with pytest.raises(ProfileError, match=rf"^{re.escape(str(path))}: overrides\.tiers: 'layers\.2-9' is out of "
                                           r"range; the model has layers 0-2"):
        _greedy(tiny_model, config=config)
    path.write_text(json.dumps({"version": 1, "hardware": HARDWARE, "overrides": {"tiers": {"layers.1-2": "disk"}}}))
    assert _greedy(tiny_model, config=config) == oracle_greedy(tiny_model, GOOD, 4)


def test_a_selector_with_thousands_of_digits(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"version": 1, "overrides": {"tiers": {"layers.0-" + "9" * 5000: "disk"}}}))
    assert load_profile(path).overrides.tiers     # validated as a selector; the plan finds it out of range


# ----------------------------------------------------------------------------- 5. non-finite logits
POISON = 7      # the token whose embedding row is NaN


def _poisoned(tiny_model, tmp_path, tensor="model.embed_tokens.weight", row=POISON):
    path = shutil.copytree(tiny_model, tmp_path / "poisoned")
    weights = load_file(path / "model.safetensors")
    if row is None:
        weights[tensor].fill_(math.nan)
    else:
        weights[tensor][row] = math.nan
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_nan_logits_fail_only_their_request(tiny_model, tmp_path):
    path = _poisoned(tiny_model, tmp_path)     # untied: only a prompt holding POISON meets the NaN
    clean = [1, 2, 3, 4]
    expected = oracle_greedy(path, clean, 6)
    assert POISON not in clean + expected
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def main():
        async with await Engine.open(path, CONFIG) as engine:
            sweeps = []
            sample = engine._driver._sample

            def spy(plan, reqs, logits, drafts):
                sampled = sample(plan, reqs, logits, drafts)
                sweeps.append((len(reqs), sorted(sampled.failures)))
                return sampled

            engine._driver._sample = spy
            results = await asyncio.gather(engine.generate([1, POISON, 3], params), engine.generate(clean, params),
                                           engine.generate([5, 6], SamplingParams(max_new_tokens=3, temperature=0.8,
                                                                                 seed=1)),
                                           return_exceptions=True)
            scored = await asyncio.gather(engine.logits([POISON, 2]), return_exceptions=True)
            after = await engine.generate(clean, params)
            return results, scored[0], after, sweeps

    (poisoned, good, sampled), scored, after, sweeps = asyncio.run(main())
    assert isinstance(poisoned, RequestError) and type(poisoned) is RequestError
    message = str(poisoned)
    assert "non-finite logits" in message and "output token 0 (position 3 of the sequence)" in message
    assert "NaN" in message and "dtype='float32'" in message and poisoned.settings == ("dtype",)
    assert sweeps[0] == (3, [0])               # one sweep held all three; only the poisoned one failed
    assert list(good.token_ids) == expected and len(sampled.token_ids) == 3
    assert isinstance(scored, RequestError) and "position 1 (prompt logits)" in str(scored)
    assert list(after.token_ids) == expected


def test_nan_weights_everywhere_fail_each_request_and_a_clean_engine_still_answers(tiny_model, tmp_path):
    path = _poisoned(tiny_model, tmp_path, "lm_head.weight", row=None)
    with pytest.raises(RequestError, match=r"non-finite logits: the logits of output token 0 .* hold 512 NaN"):
        _greedy(path)
    assert _greedy(tiny_model, n=6) == oracle_greedy(tiny_model, GOOD, 6)


def test_nonfinite_rows():
    import torch

    from tierflow.engine.sampling import nonfinite_rows
    logits = torch.zeros(5, 4)
    logits[1, 2] = math.nan
    logits[2, 0] = math.inf
    logits[3] = -math.inf
    logits[4, :3] = -math.inf                 # masked tokens beside a finite one: fine
    assert nonfinite_rows(logits) == {1: "1 NaN and 0 +inf of 4 logits", 2: "0 NaN and 1 +inf of 4 logits",
                                      3: "all 4 logits -inf"}
    assert nonfinite_rows(torch.zeros(2, 4)) == {}
