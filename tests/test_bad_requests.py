"""Bad request inputs: each raises a named tierflow error (SamplingError, PromptError, ConfigError,
EngineClosedError) whose message names the field or message, the value and what is allowed; a
running engine that refused them serves the next valid request with the oracle's tokens."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from tierflow import (ConfigError, Engine, EngineClosedError, EngineConfig, PromptError, SamplingError,
                      SamplingParams, SyncEngine)
from tierflow.config import engine_config_from, sampling_params_from
from tierflow.engine.requests import encode_prompt
from tierflow.testing import build_random_llama, oracle_greedy

# Roles become words of the vocabulary: an unknown word is id 0, which oracle_greedy (pad_token_id=0)
# would mask out of the oracle's attention.
CHAT_TEMPLATE = ("{% for m in messages %}{{ {'system': 'w401', 'user': 'w402', 'assistant': 'w403'}[m['role']] }} "
                 "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w9{% endif %}")
CONFIG = EngineConfig(device="cpu", kv_reserve_tokens=64, max_context_tokens=64)
VALID = SamplingParams(max_new_tokens=4, ignore_eos=True)


def _id(value: object) -> str | None:
    """pytest's id of a parameter: ints past 4300 digits cannot be made a str."""
    return "huge-int" if isinstance(value, int) and value.bit_length() > 1000 else None


def build_chat_model(path: Path) -> Path:
    """A tiny checkpoint with a word-level tokenizer ("w1 w2 ...", vocabulary 512) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    build_random_llama(path, seed=5)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 512)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat") / "m")


# ----------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("field, value, message", [
    ("stop", 5, r"stop must be a list, tuple or set of non-empty strings, got int 5"),
    ("stop", None, r"stop must be a list.*got NoneType None; pass \(\) for none"),
    ("stop", {"a": 1}, r"stop must be a list, tuple or set.*got dict \{'a': 1\}"),
    ("stop", b"ab", r"stop must be a list.*got bytes"),
    ("stop", ("ok", "\ud800"), r"stop must hold non-empty strings of valid Unicode"),
    ("stop_token_ids", 5, r"stop_token_ids must be a list, tuple or set of ints >= 0, got int 5"),
    ("stop_token_ids", None, r"stop_token_ids must be a list.*got NoneType None"),
    ("stop_token_ids", "12", r"stop_token_ids must be a list.*got str '12'"),
    ("stop_token_ids", b"\x01", r"stop_token_ids must be a list.*got bytes"),
    ("stop_token_ids", {1: 2}, r"stop_token_ids must be a list.*got dict"),
    ("ignore_eos", "no", r"ignore_eos must be a bool \(True or False\), got 'no'"),
    ("ignore_eos", 1, r"ignore_eos must be a bool.*got 1"),
    ("temperature", math.inf, r"temperature must be 0 or a finite number >= 1e-05, got inf"),
    ("temperature", math.nan, r"temperature must be 0 or a finite number.*got nan"),
    ("temperature", 1e-45, r"temperature must be 0 or a finite number >= 1e-05, got 1e-45"),
    ("temperature", 10**400, r"temperature must be 0 or a finite number.*got 1000.*\.\.\.>"),
    ("temperature", True, r"temperature must be 0 or a finite number.*got True"),
    ("top_p", math.inf, r"top_p must be a finite number in \[1e-09, 1.0\], got inf"),
    ("top_p", -math.inf, r"top_p must be a finite number.*got -inf"),
    ("top_p", 1e-300, r"top_p must be a finite number in \[1e-09, 1.0\], got 1e-300"),
    ("max_new_tokens", 3.0, r"max_new_tokens must be an int >= 1, got 3.0"),
    ("max_new_tokens", True, r"max_new_tokens must be an int >= 1, got True"),
    ("top_k", 2.0, r"top_k must be an int >= 0, got 2.0"),
    ("top_k", False, r"top_k must be an int >= 0, got False"),
    ("seed", 2**64, r"seed must be None or an int in \[-2\*\*63, 2\*\*64 - 1\].*manual_seed.*got 18446744073709551616"),
    ("seed", -2**63 - 1, r"seed must be None or an int in \[-2\*\*63, 2\*\*64 - 1\]"),
    ("seed", 10**5000, r"seed must be None or an int.*got <an int of 16610 bits>"),
], ids=_id)
def test_bad_sampling_values_name_the_field_and_value(field, value, message):
    with pytest.raises(SamplingError, match=rf"SamplingParams\.{message}"):
        SamplingParams(**{field: value})


def test_sampling_edges_and_sets():
    """The bounds themselves are allowed; a set of stops or ids is kept sorted (its order is not
    the caller's, and a stop string's place in the tuple changes nothing)."""
    p = SamplingParams(temperature=1e-5, top_p=1e-9, seed=2**64 - 1, stop={"b", "a"}, stop_token_ids={7, 3})
    assert (p.stop, p.stop_token_ids) == (("a", "b"), (3, 7))
    assert SamplingParams(seed=-2**63, stop="x", temperature=0).stop == ("x",)
    assert SamplingParams(stop=["x"], stop_token_ids=[2, 1]).stop_token_ids == (2, 1)


# ----------------------------------------------------------------------------- EngineConfig
@pytest.mark.parametrize("field, value, message", [
    ("device", "cuda:²", r"device must be one of .* or 'cuda:N', got 'cuda:²'"),
    ("kv_cache_dir", "/tmp/a\0b", r"kv_cache_dir is not a path the OS can take.*got '/tmp/a\\x00b'"),
    ("trace_path", "t\ud800.json", r"trace_path is not a path the OS can take"),
    ("prefix_cache_dir", 5, r"prefix_cache_dir must be a path, got int 5"),
    ("profile", "\ud800", r"profile is not a path the OS can take"),
    ("profile", 3, r"profile must be a path or a dict, got int 3"),
    ("dtype", [], r"dtype must be one of .*got \[\]"),
    ("max_num_seqs", -10**5000, r"max_num_seqs must be an int >= 1, got <an int of 16610 bits>"),   # too long for repr
], ids=_id)
def test_bad_config_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=rf"EngineConfig\.{message}"):
        EngineConfig(**{field: value})


# ----------------------------------------------------------------------------- records from mappings
def test_a_mapping_becomes_the_record_and_an_unknown_key_is_named():
    assert sampling_params_from({"max_new_tokens": 3, "stop": ["x"]}) == SamplingParams(max_new_tokens=3, stop=("x",))
    assert sampling_params_from(None) == SamplingParams()
    assert engine_config_from({"device": "cpu", "max_num_seqs": 2}) == EngineConfig(device="cpu", max_num_seqs=2)
    with pytest.raises(SamplingError, match=r"SamplingParams has no field 'max_new_token' \(did you mean "
                                            r"'max_new_tokens'\?\); its fields are: max_new_tokens, temperature"):
        sampling_params_from({"max_new_token": 3})
    with pytest.raises(SamplingError, match=r"no field 7; its fields are"):
        sampling_params_from({7: 3})
    with pytest.raises(ConfigError, match=r"EngineConfig has no field 'devise' \(did you mean 'device'\?\)"):
        engine_config_from({"devise": "cpu"})
    with pytest.raises(SamplingError, match=r"params must be SamplingParams, a dict of its fields, or None; got "
                                            r"list \[3\]"):
        sampling_params_from([3])
    with pytest.raises(ConfigError, match=r"config must be EngineConfig, a dict of its fields, or None; got str 'cpu'"):
        engine_config_from("cpu")
    with pytest.raises(SamplingError, match=r"SamplingParams\.top_k"):      # the fields are still checked
        sampling_params_from({"top_k": -1})


# ----------------------------------------------------------------------------- prompts
def test_a_chat_template_that_refuses_is_a_prompt_error(chat_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(PromptError, match="chat template refused these messages: Conversation roles must alternate"):
        encode_prompt([{"role": "user", "content": "w1"}], tokenizer, 512)


def test_a_huge_token_id_is_shown_by_its_size():
    with pytest.raises(PromptError, match=r"\[0, 512\).*found <an int of 16610 bits> at position 1"):
        encode_prompt([1, 10**5000], None, 512)


BAD_PROMPTS = [
    ([1, 512], r"token ids must be ints in \[0, 512\).*found 512 at position 1"),
    ([3, -1], r"found -1 at position 1"),
    ([1, 2.0], r"found 2.0 at position 1"),
    ([True, 2], r"found True at position 0"),
    ([1, None], r"found None at position 1"),
    ("w1 w2 \ud800 w3", r"the prompt is not valid Unicode: it holds a lone surrogate '\\ud800' at character 6"),
    ([{"role": "wizard", "content": "w1"}], r"chat message 0 has role 'wizard'; the roles are system, user, assistant"),
    ([{"role": "user", "content": "w1"}, "w2"], r"chat message 1 must be a dict with 'role' and 'content', got str"),
    ([{"role": "user", "content": "w1"}, 7], r"chat message 1 must be a dict.*got int 7"),
    ([{"content": "w1"}], r"chat message 0 must have string 'role' and 'content'"),
    ([{"role": "user"}], r"chat message 0 must have string 'role' and 'content'"),
    ([{"role": "user", "content": ["w1"]}], r"chat message 0 must have string 'role' and 'content'"),
    ([{"role": "user", "content": "w1"}, {"role": "user", "content": "w2\ud800"}],
     r"chat message 1's 'content' is not valid Unicode: it holds a lone surrogate '\\ud800' at character 2"),
    ([{"role": "user", "content": "w1", "name": "\udc80"}], r"chat message 0's 'name' is not valid Unicode"),
    ({"role": "user", "content": "w1"}, r"the prompt is a single dict; chat messages go in a list"),
    ([], r"the prompt is empty"),
]


def test_every_bad_request_is_named_and_the_engine_then_answers_the_oracle(chat_model):
    """All the bad requests fired at one open engine, through generate and stream; then a valid
    chat request and a valid token request give the oracle's greedy tokens."""
    bad_params = [
        ({"max_new_tokenz": 2}, SamplingError, r"no field 'max_new_tokenz' \(did you mean 'max_new_tokens'\?\)"),
        (5, SamplingError, r"params must be SamplingParams, a dict of its fields, or None; got int 5"),
        ({"stop": 5}, SamplingError, r"SamplingParams\.stop must be a list"),
        (SamplingParams(stop_token_ids=(3, 512, 10**6)), SamplingError,
         r"stop_token_ids holds 512, 1000000, beyond this model's vocabulary of 512 tokens \(ids 0 to 511\)"),
        ({"stop_token_ids": [600]}, SamplingError, r"stop_token_ids holds 600, beyond .* 512 tokens"),
    ]

    async def main():
        async with await Engine.open(chat_model, CONFIG) as engine:
            for stream in (False, True):
                for prompt, message in BAD_PROMPTS:
                    with pytest.raises(PromptError, match=message):
                        await _request(engine, prompt, VALID, stream)
                for params, error, message in bad_params:
                    with pytest.raises(error, match=message):
                        await _request(engine, [1, 2, 3], params, stream)
            chat = await engine.generate([{"role": "system", "content": "w4 w5"}, {"role": "user", "content": "w6"}],
                                         VALID)
            ids = await engine.generate([1, 2, 3], {"max_new_tokens": 5, "ignore_eos": True})
            return chat, ids

    chat, ids = asyncio.run(main())
    expected_prompt = [401, 4, 5, 402, 6, 9]          # w401 w4 w5 w402 w6 w9
    assert list(chat.prompt_token_ids) == expected_prompt
    assert list(chat.token_ids) == oracle_greedy(chat_model, expected_prompt, 4)
    assert list(ids.token_ids) == oracle_greedy(chat_model, [1, 2, 3], 5)


async def _request(engine: Engine, prompt, params, stream: bool) -> None:
    if stream:
        async for _ in engine.stream(prompt, params):
            pass
    else:
        await engine.generate(prompt, params)


# ----------------------------------------------------------------------------- dicts for records, and close
def test_engine_open_takes_a_dict_and_names_an_unknown_key(chat_model):
    async def main():
        with pytest.raises(ConfigError, match=r"EngineConfig has no field 'kv_reserve_token' \(did you mean "
                                              r"'kv_reserve_tokens'\?\)"):
            await Engine.open(chat_model, {"device": "cpu", "kv_reserve_token": 64})
        with pytest.raises(ConfigError, match=r"config must be EngineConfig.*got list \['cpu'\]"):
            await Engine.open(chat_model, ["cpu"])
        async with await Engine.open(chat_model, {"device": "cpu", "kv_reserve_tokens": 64}) as engine:
            assert engine.config == EngineConfig(device="cpu", kv_reserve_tokens=64)
            return await engine.generate([5, 6], {"max_new_tokens": 3, "ignore_eos": True})

    out = asyncio.run(main())
    assert list(out.token_ids) == oracle_greedy(chat_model, [5, 6], 3)


def test_sync_engine_takes_dicts_and_refuses_everything_after_close(chat_model):
    with pytest.raises(ConfigError, match=r"no field 'devise' \(did you mean 'device'\?\)"):
        SyncEngine(chat_model, {"devise": "cpu"})
    engine = SyncEngine(chat_model, {"device": "cpu", "kv_reserve_tokens": 64})
    try:
        with pytest.raises(SamplingError, match=r"no field 'seeed' \(did you mean 'seed'\?\)"):
            engine.generate([1, 2], {"seeed": 1})
        with pytest.raises(PromptError, match="role 'wizard'"):
            list(engine.stream([{"role": "wizard", "content": "w1"}], VALID))
        out = engine.generate([1, 2], {"max_new_tokens": 3, "ignore_eos": True})
        chunks = list(engine.stream([1, 2], {"max_new_tokens": 3, "ignore_eos": True}))
    finally:
        engine.close()
    expected = oracle_greedy(chat_model, [1, 2], 3)
    assert list(out.token_ids) == expected
    assert [t for c in chunks for t in c.token_ids] == expected
    engine.close()                                      # a second close does nothing
    with pytest.raises(EngineClosedError, match="closed"):
        engine.generate([1, 2], VALID)
    with pytest.raises(EngineClosedError, match="closed"):
        list(engine.stream([1, 2], VALID))
