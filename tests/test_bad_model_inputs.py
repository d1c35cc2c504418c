"""Bad model files: config.json with wrong types, and config.json without ``architectures``.
Each raises a named tierflow error whose message names the file, the key and the value; a
valid input next still gives the transformers oracle's tokens."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

from tierflow import CheckpointError, Engine, EngineConfig, SamplingParams, UnsupportedModelError
from tierflow.engine.planning import config_spec
from tierflow.testing import oracle_greedy
from tierflow.tiers.checkpoint.index import CheckpointIndex

CONFIG = EngineConfig(device="cpu", kv_reserve_tokens=64, prefill_chunk_tokens=64)
GOOD = [1, 2, 3, 4]


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
