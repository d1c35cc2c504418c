"""Bad input: each case raises a named tierflow error whose message says what was expected
and what to do, and the engine (or a new one) is still usable afterwards."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from tierflow import (CheckpointError, Engine, EngineClosedError, EngineConfig, PromptError, SamplingError,
                      SamplingParams, ShapeMismatchError, UnsupportedModelError)
from tierflow.errors import ConfigError, TierCapacityError

CONFIG = EngineConfig(device="cpu", kv_reserve_tokens=64, prefill_chunk_tokens=64)
GOOD = [1, 2, 3, 4]


def _open(path, config=CONFIG):
    async def main():
        async with await Engine.open(path, config) as engine:
            return await engine.generate(GOOD, SamplingParams(max_new_tokens=2, ignore_eos=True))
    return asyncio.run(main())


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


def test_missing_directory(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        _open(tmp_path / "nope")
    assert len(_open(tiny_model).token_ids) == 2


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        _open("no-such-org/no-such-model")


def test_missing_shard(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models["sharded-fp32"], tmp_path / "sharded")
    shard = sorted(path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        _open(path)


def test_corrupt_header(model_copy):
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _open(model_copy)


def test_truncated_file(model_copy):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        _open(model_copy)


def test_not_a_safetensors_file(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        _open(model_copy)


def test_unsupported_architecture(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        _open(model_copy)


def test_unsupported_rope_scaling(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 4.0}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        _open(model_copy)


def test_shape_mismatch(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["intermediate_size"] += 8
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match=r"mlp\..*_proj\.weight.* has shape .*implies"):
        _open(model_copy)


def test_budget_too_small(tiny_model):
    with pytest.raises(TierCapacityError, match=r"device memory is short by \d+ bytes.*budget is 4096.*Raise that budget"):
        _open(tiny_model, EngineConfig(device="cpu", device_memory_bytes=4096))


@pytest.mark.parametrize("field, value", [("device", "tpu"), ("dtype", "int8"), ("prefetch_depth", 0),
                                          ("device_memory_bytes", -1), ("io_block_bytes", 1000),
                                          ("direct_io", "maybe")])
def test_invalid_config(field, value):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                          ("top_p", 1.5), ("top_k", -1), ("seed", "x"), ("stop", ("",)),
                                          ("stop_token_ids", (-3,))])
def test_invalid_sampling(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


def test_bad_prompts_leave_the_engine_usable(tiny_model):
    async def main():
        config = EngineConfig(device="cpu", kv_reserve_tokens=64, max_context_tokens=32)
        async with await Engine.open(tiny_model, config) as engine:
            for prompt, message in [("", "empty"), ([], "empty"), ([1, 2, 10**9], r"\[0, 512\)"),
                                    (list(range(1, 40)), "context window holds 32"),
                                    ("hello", "no tokenizer"), (3.5, "a str, a list")]:
                with pytest.raises(PromptError, match=message):
                    await engine.generate(prompt)
            with pytest.raises(SamplingError, match="SamplingParams"):
                await engine.generate(GOOD, 3)
            out = await engine.generate(GOOD, SamplingParams(max_new_tokens=40, ignore_eos=True))
            return out

    out = asyncio.run(main())
    # the context window (32) ends generation
    assert out.finish_reason == "length" and len(GOOD) + len(out.token_ids) == 32


def test_generate_after_close(tiny_model):
    async def main():
        engine = await Engine.open(tiny_model, CONFIG)
        await engine.close()
        with pytest.raises(EngineClosedError, match="Engine.open"):
            await engine.generate(GOOD)
        with pytest.raises(EngineClosedError):
            async for _ in engine.stream(GOOD):
                pass
        await engine.close()   # closing twice is fine

    asyncio.run(main())


def test_read_failure_fails_the_request_not_the_engine(tiny_model, tmp_path, monkeypatch):
    """A disk read that fails mid-sweep fails the requests of that sweep with TransferError;
    the next request is served normally."""
    from tierflow.errors import TransferError
    from tierflow.tiers.io import reader as reader_mod
    from tierflow.testing import streaming_budget

    config = EngineConfig(device="cpu", kv_reserve_tokens=64, prefill_chunk_tokens=64)
    config = EngineConfig(device="cpu", kv_reserve_tokens=64, prefill_chunk_tokens=64,
                          device_memory_bytes=streaming_budget(tiny_model, config))
    real = reader_mod.DiskReader._read_block
    fail = {"on": False}

    def flaky(self, *args):
        if fail["on"]:
            fail["on"] = False
            raise TransferError("injected read failure")
        return real(self, *args)

    monkeypatch.setattr(reader_mod.DiskReader, "_read_block", flaky)

    async def main():
        async with await Engine.open(tiny_model, config) as engine:
            good = await engine.generate(GOOD, SamplingParams(max_new_tokens=6, ignore_eos=True))
            fail["on"] = True
            with pytest.raises(TransferError, match="injected"):
                await engine.generate(GOOD, SamplingParams(max_new_tokens=50, ignore_eos=True))
            again = await engine.generate(GOOD, SamplingParams(max_new_tokens=6, ignore_eos=True))
            return good, again

    good, again = asyncio.run(main())
    assert good.token_ids == again.token_ids


def test_every_error_class_lives_in_errors_and_is_exported():
    import inspect

    import tierflow
    import tierflow.errors as errors

    names = {name for name, obj in vars(errors).items()
             if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == errors.__name__}
    assert {"KVCapacityError", "WouldBlock", "ClosedResourceError", "FlashAttnUnavailableError",
            "PinnedMemoryError"} <= names
    assert names <= set(tierflow.__all__)
    assert all(getattr(tierflow, name) is getattr(errors, name) for name in names)
