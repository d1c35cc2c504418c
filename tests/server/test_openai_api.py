"""The OpenAI HTTP API, driven by the official ``openai`` client over loopback, against the
engine itself: every decoder layer streamed from disk, the same plan in both. Greedy requests give
exactly the engine's tokens (text and counts), logprobs are the engine's log-softmaxed logits, a
seeded sampled request is reproducible, and every error status arrives as the client's typed
exception without disturbing the next request."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from tierflow import EngineConfig, SamplingParams, SyncEngine
from tierflow.testing import build_chat_llama, streaming_budget
from tests.server.serving import http, serving

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
NEW = 12


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_llama(tmp_path_factory.mktemp("chat") / "m", seed=3)


@pytest.fixture(scope="module")
def engine_config(chat_model):
    config = EngineConfig(device="cpu", max_num_seqs=8, kv_reserve_tokens=4096)
    from dataclasses import replace
    return replace(config, device_memory_bytes=streaming_budget(chat_model, config))


@pytest.fixture(scope="module")
def reference(chat_model, engine_config):
    with SyncEngine(chat_model, engine_config) as engine:
        assert engine.engine.plan.streamed, "the test means every decoder layer to stream"
        yield engine


@pytest.fixture(scope="module")
def server(chat_model, engine_config):
    with serving(chat_model, engine_config, api_key="sekrit", max_queue=4, max_body_bytes=64 * 2**10) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="sekrit", max_retries=0) as c:
        yield c


def greedy(n: int = NEW, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def test_chat_completion_gives_the_engines_greedy_tokens(client, reference):
    want = reference.generate(CHAT, greedy())
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0)
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == len(want.prompt_token_ids) + len(want.token_ids)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion" and got.model == "tiny"


def test_list_of_text_parts_is_the_same_message(client, reference):
    want = reference.generate(CHAT, greedy())
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                                   {"type": "text", "text": "of France?"}]}]
    got = client.chat.completions.create(model="tiny", messages=parts, max_completion_tokens=NEW, temperature=0)
    assert got.choices[0].message.content == want.text


def test_a_developer_message_is_the_system_message_for_a_template_without_the_role(client, reference):
    want = reference.generate(CHAT, greedy())       # the tiny checkpoint's ChatML template has no "developer"
    developer = [{"role": "developer", "content": CHAT[0]["content"]}, CHAT[1]]
    got = client.chat.completions.create(model="tiny", messages=developer, max_tokens=NEW, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)


def test_streamed_chat_gives_the_same_tokens_role_first_and_usage_last(client, reference):
    want = reference.generate(CHAT, greedy())
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_text_completion_from_a_string_and_from_token_ids(client, reference):
    want = reference.generate("The quick brown fox", greedy())
    got = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=NEW, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    ids = list(want.prompt_token_ids)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=NEW, temperature=0)
    assert by_ids.choices[0].text == want.text
    streamed = client.completions.create(model="tiny", prompt=ids, max_tokens=NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text


def test_stop_strings_end_the_text_as_the_engine_does(client, reference):
    full = reference.generate(CHAT, greedy(24))
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the random model's text has no usable stop string here")
    want = reference.generate(CHAT, greedy(24, stop=(stop,)))
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == "stop"


def test_logprobs_are_the_engines_logits(client, reference):
    want = reference.generate(CHAT, greedy())
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0,
                                         logprobs=True, top_logprobs=5)
    content = got.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    ids = list(want.prompt_token_ids) + list(want.token_ids)
    logits = reference._call(reference.engine.logits(ids[:-1]))
    logprobs = torch.log_softmax(logits[len(want.prompt_token_ids) - 1:], dim=-1)
    tokenizer = reference.engine.tokenizer
    for position, (entry, token) in enumerate(zip(content, want.token_ids)):
        assert entry.token == tokenizer.decode([token])
        assert entry.logprob == pytest.approx(float(logprobs[position, token]), abs=1e-4)
        top = torch.topk(logprobs[position], 5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token     # greedy picked the most likely
    text = client.completions.create(model="tiny", prompt=list(want.prompt_token_ids), max_tokens=NEW,
                                     temperature=0, logprobs=3)
    lp = text.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([e.logprob for e in content], abs=1e-5)
    assert len(lp.top_logprobs) == len(content) and all(len(t) <= 3 for t in lp.top_logprobs)


def test_a_seeded_sampled_request_is_reproducible_and_is_the_engines(client, reference):
    kw = dict(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0.9, top_p=0.95, seed=1234)
    first = client.chat.completions.create(**kw).choices[0].message.content
    second = client.chat.completions.create(**kw).choices[0].message.content
    assert first == second
    want = reference.generate(CHAT, SamplingParams(max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=1234))
    assert first == want.text
    other = client.chat.completions.create(**{**kw, "seed": 99}).choices[0].message.content
    assert other != first or len(want.token_ids) < 3


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    health = http("GET", server.base_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
    metrics = http("GET", server.base_url + "/metrics").text
    for name in ("tierflow_requests_total", "tierflow_prompt_tokens_total", "tierflow_generation_tokens_total",
                 "tierflow_time_to_first_token_seconds_bucket", "tierflow_time_per_output_token_seconds_bucket",
                 "tierflow_sweep_seconds_total", "tierflow_disk_read_bytes_total", "tierflow_queue_length"):
        assert name in metrics, name
    ok = [line for line in metrics.splitlines()
          if line.startswith('tierflow_requests_total{endpoint="chat",outcome="ok"}')]
    assert ok and float(ok[0].split()[-1]) >= 1


# ------------------------------------------------------------------------------------ errors
def test_wrong_or_missing_key_is_401(server):
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="nope", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as err:
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
        assert err.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    bare = http("POST", server.base_url + "/v1/chat/completions",
                json_body={"model": "tiny", "messages": CHAT, "max_tokens": 2})
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert err.value.body["param"] == "model"


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"temperature": 3.5}, "temperature"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"frobnicate": True}, "frobnicate"),
])
def test_fields_tierflow_cannot_honour_are_refused_by_name(client, extra, param):
    known = {k: v for k, v in extra.items() if k != "frobnicate"}
    body = {"extra_body": {"frobnicate": True}} if "frobnicate" in extra else {}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, **known, **body)
    assert err.value.body["param"] == param, err.value.body


def test_bad_messages_and_prompts_are_400(client, server):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[10**9], max_tokens=2)      # beyond the vocabulary
    with pytest.raises(openai.BadRequestError) as err:                                # past the context window
        client.completions.create(model="tiny", prompt="fox " * 5000, max_tokens=2)
    assert "tokens" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2)


def test_malformed_json_wrong_types_and_oversized_bodies(server):
    url, headers = server.base_url + "/v1/chat/completions", {"Authorization": "Bearer sekrit"}
    before = server.in_loop(lambda: server.state.engine.stats().prompt_tokens)
    bad = http("POST", url, body=b"{not json", headers={**headers, "Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    typed = http("POST", url, json_body={"model": "tiny", "messages": CHAT, "max_tokens": "ten"}, headers=headers)
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "max_tokens"
    huge = http("POST", url, body=b"x" * (100 * 2**10), headers=headers)
    assert huge.status_code == 413
    for body in (b"[]", b"null", b"\xff\xfe"):
        r = http("POST", url, body=body, headers=headers)
        assert r.status_code == 400, body
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert http("GET", server.base_url + "/v1/nothing", headers=headers).status_code == 404
    assert server.in_loop(lambda: server.state.engine.stats().prompt_tokens) == before


def test_a_full_queue_is_429_and_draining_is_503(chat_model, engine_config):
    from dataclasses import replace
    config = replace(engine_config, max_num_seqs=1)
    with serving(chat_model, config, max_queue=0) as srv:
        with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0) as c:
            long = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=400, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
            first = next(iter(long))
            assert first.choices[0].delta.role == "assistant"
            with pytest.raises(openai.RateLimitError) as err:
                c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
            assert err.value.body["code"] == "queue_full"
            long.close()
            srv.state.draining = True
            with pytest.raises(openai.InternalServerError) as err:
                c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
            assert err.value.status_code == 503
            assert http("GET", srv.base_url + "/health").status_code == 503
            srv.state.draining = False


def test_the_engine_still_answers_after_every_error(client, reference):
    want = reference.generate(CHAT, greedy())
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0)
    assert got.choices[0].message.content == want.text


def test_an_error_body_has_the_openai_shape(server):
    r = http("POST", server.base_url + "/v1/completions", json_body={"model": "tiny", "prompt": "x", "n": 3},
             headers={"Authorization": "Bearer sekrit"})
    assert r.status_code == 400
    error = json.loads(r.text)["error"]
    assert error["param"] == "n" and error["type"] == "invalid_request_error" and "n=3" in error["message"]
    assert r.headers["x-request-id"].startswith("cmpl-")
