"""Random inputs of every JSON-ish type (huge and negative ints, nan and inf, strings with lone
surrogates and NUL bytes, bools, None, lists, dicts) for SamplingParams, EngineConfig, prompts and
chat messages: the only exceptions that escape are TierflowError subclasses, a request whose params
construct is served, and the engine still answers the oracle after all of it."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_bad_requests import build_chat_model
from tierflow import EngineConfig, SamplingParams, SyncEngine, TierflowError
from tierflow.config import engine_config_from, sampling_params_from
from tierflow.testing import oracle_greedy

def fuzz(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
VOCAB = 512

ODD_TEXT = ["", "\ud800", "a\udc80b", "a\0b", "cuda:²", "cuda:0", "cuda:-1", "cpu", "auto", "cuda", "float32",
            "bfloat16", "on", "off", "routed", "all", "reserve", "on_demand", "w1 w2", " ", "/tmp/tierflow-fuzz"]
ODD_NUMBERS = [0, 1, -1, 2**63, -2**63 - 1, 2**64, 10**400, 4096, 1e-45, 1e-5, 1e-300, 0.5, 1.0,
               math.inf, -math.inf, math.nan, -0.0]


def _scalars() -> st.SearchStrategy:
    return st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                     st.sampled_from(ODD_TEXT), st.sampled_from(ODD_NUMBERS),
                     st.sampled_from([4301, 5000]).map(lambda digits: -(10**digits)))   # too long for repr


JSONISH = st.recursive(_scalars(), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.sets(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), inner, max_size=3)), max_leaves=6)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _kwargs(cls: type) -> st.SearchStrategy:
    """A random subset of the record's real fields, each set to a random value."""
    return st.dictionaries(st.sampled_from(_fields(cls)), JSONISH, max_size=6)


def _only_tierflow_errors(make) -> object | None:
    try:
        return make()
    except TierflowError:
        return None


@fuzz(200)
@given(_kwargs(SamplingParams))
def test_sampling_params_raise_only_tierflow_errors(kwargs):
    params = _only_tierflow_errors(lambda: SamplingParams(**kwargs))
    if params is not None:        # what construction let through is what the sampler can use
        assert isinstance(params.stop, tuple) and all(isinstance(s, str) and s for s in params.stop)
        assert all(type(i) is int and i >= 0 for i in params.stop_token_ids)
        assert isinstance(params.ignore_eos, bool)
        assert params.temperature == 0 or math.isfinite(params.temperature)
        assert math.isfinite(params.top_p)


@fuzz(200)
@given(_kwargs(EngineConfig))
def test_engine_config_raises_only_tierflow_errors(kwargs):
    _only_tierflow_errors(lambda: EngineConfig(**kwargs))


@fuzz(150)
@given(st.one_of(JSONISH, st.dictionaries(st.one_of(st.sampled_from(_fields(SamplingParams) + _fields(EngineConfig)),
                                                    st.text(max_size=8), st.integers()), JSONISH, max_size=4)))
def test_records_from_anything_raise_only_tierflow_errors(value):
    _only_tierflow_errors(lambda: sampling_params_from(value))
    _only_tierflow_errors(lambda: engine_config_from(value))


# ----------------------------------------------------------------------------- through an open engine
CONTEXT = 16


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("fuzz-chat") / "m")


@pytest.fixture(scope="module")
def engine(chat_model):
    with SyncEngine(chat_model, EngineConfig(device="cpu", kv_reserve_tokens=64, max_context_tokens=CONTEXT)) as e:
        yield e


WORDS = st.sampled_from(["w1", "w2", "w3 w4", "w500", "", " ", "\ud800", "a\0", "zz", "w7\udfff"])
TEXT = st.one_of(st.text(max_size=8), st.lists(WORDS, max_size=4).map(" ".join))
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "wizard"]),
                                             JSONISH),
                           "content": st.one_of(TEXT, JSONISH)},
                          optional={"name": st.one_of(TEXT, JSONISH), "extra": JSONISH}),
    JSONISH)
PROMPTS = st.one_of(
    TEXT,
    st.lists(st.one_of(st.integers(min_value=-2, max_value=VOCAB + 1), JSONISH), max_size=6),
    st.lists(MESSAGE, max_size=3),
    JSONISH)


@fuzz(100)
@given(PROMPTS)
def test_prompts_through_the_engine_raise_only_tierflow_errors(engine, prompt):
    _only_tierflow_errors(lambda: engine.generate(prompt, {"max_new_tokens": 1}))


# values a caller means, at and beyond the edges, so that many requests pass and are sampled
PLAUSIBLE = {
    "max_new_tokens": st.integers(min_value=0, max_value=40),
    "temperature": st.one_of(st.just(0), st.floats(min_value=0, max_value=1e6)),
    "top_k": st.integers(min_value=-1, max_value=VOCAB + 10),
    "top_p": st.floats(min_value=0, max_value=1.1),
    "seed": st.integers(min_value=-2**63 - 1, max_value=2**64),
    "stop": st.lists(st.sampled_from(["w1", "w2 w3", "\n", "", "\ud800"]), max_size=3),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=VOCAB + 2), max_size=3),
    "ignore_eos": st.booleans(),
}


def _sampling_kwargs() -> st.SearchStrategy:
    names = _fields(SamplingParams)
    return st.fixed_dictionaries({}, optional={name: st.one_of(*[PLAUSIBLE[name]] * 5, JSONISH) if name in PLAUSIBLE
                                               else JSONISH for name in names})


@fuzz(60)
@given(_sampling_kwargs())
def test_params_through_the_engine_serve_or_raise_tierflow_errors(engine, kwargs):
    """Whatever SamplingParams accept (ids within the vocabulary) the engine serves."""
    try:
        params = SamplingParams(**kwargs)
    except TierflowError:
        params = None
    out = _only_tierflow_errors(lambda: engine.generate([1, 2, 3], kwargs))
    if params is not None and all(i < VOCAB for i in params.stop_token_ids):
        assert out is not None and 1 <= len(out.token_ids) <= CONTEXT - 3


def test_the_engine_still_answers_the_oracle(engine, chat_model):
    out = engine.generate([4, 5, 6], {"max_new_tokens": 5, "ignore_eos": True})
    assert list(out.token_ids) == oracle_greedy(chat_model, [4, 5, 6], 5)
