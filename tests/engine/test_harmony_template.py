"""Chat prompts rendered by gpt-oss's own chat template (the Harmony format, tests/data/README.md):
a tiny byte-level BPE with Harmony's special tokens carries the published template, and tierflow's
chat path must give exactly the ids and the text that transformers' ``apply_chat_template`` gives
on the same tokenizer, also through a real Engine over a tiny model. The template takes the first
system or developer message as its developer message's "# Instructions" and renders no other, so a
second one is a PromptError, not a prompt silently without it; roles outside system, developer,
user and assistant are refused by tierflow, and the template's own ``raise_exception`` becomes a
PromptError."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tierflow import Engine, EngineConfig, PromptError
from tierflow.engine.requests import encode_prompt
from tierflow.testing import build_chat_llama, build_random_llama, oracle_greedy

TEMPLATE = Path(__file__).parents[1] / "data" / "gpt_oss_chat_template.jinja"
HARMONY_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                  "<|end|>", "<|message|>", "<|call|>"]
TEXT = ("You are a helpful assistant. Reasoning: low, medium, high. What is the capital of France? Paris is "
        "the capital of France. Answer in one word, please. And of Italy? Rome. # Instructions # Tools")
INSTRUCTIONS = "Answer in one word."
TURNS = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Italy?"}]
DEVELOPER_CHAT = [{"role": "developer", "content": INSTRUCTIONS}, *TURNS]
SYSTEM_CHAT = [{"role": "system", "content": INSTRUCTIONS}, *TURNS]


def build_harmony_tokenizer(path: Path) -> Path:
    """A byte-level BPE trained here on a fixed text (so it encodes any string), Harmony's special
    tokens as single tokens, the published template, ``<|return|>`` as end of sequence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=HARMONY_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>", eos_token="<|return|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE.read_text(encoding="utf-8")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def harmony_model(tmp_path_factory) -> Path:
    """A tiny random Llama whose vocabulary is the Harmony tokenizer's."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("harmony") / "m"
    path.mkdir()
    vocab = len(AutoTokenizer.from_pretrained(build_harmony_tokenizer(path)))
    build_random_llama(path, vocab_size=vocab, seed=4)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = HARMONY_TOKENS.index("<|return|>")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def tokenizer(harmony_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(harmony_model)


def oracle(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    return list(ids), tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_the_template_is_the_published_one(tokenizer):
    assert tokenizer.chat_template == TEMPLATE.read_text(encoding="utf-8")
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1 for t in HARMONY_TOKENS)


@pytest.mark.parametrize("messages", [DEVELOPER_CHAT, SYSTEM_CHAT], ids=["developer", "system"])
def test_harmony_prompt_is_transformers_own(tokenizer, messages):
    want_ids, want_text = oracle(tokenizer, messages)
    ids = encode_prompt(messages, tokenizer, len(tokenizer))
    assert ids == want_ids
    assert tokenizer.decode(ids) == want_text
    # the Harmony format itself, read from the rendered text rather than trusted to the oracle
    assert want_text.startswith("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                                "Knowledge cutoff: 2024-06\nCurrent date: ")
    assert "Reasoning: medium\n\n# Valid channels: analysis, commentary, final." in want_text
    assert (f"<|end|><|start|>developer<|message|># Instructions\n\n{INSTRUCTIONS}\n\n<|end|>"
            "<|start|>user<|message|>What is the capital of France?<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Paris.<|end|>"
            "<|start|>user<|message|>And of Italy?<|end|><|start|>assistant") in want_text
    assert want_text.endswith("<|end|><|start|>assistant")
    assert ids.count(tokenizer.convert_tokens_to_ids("<|start|>")) == 6   # system, developer, 3 turns, the prompt


def test_developer_and_system_instructions_are_one_prompt(tokenizer):
    assert encode_prompt(DEVELOPER_CHAT, tokenizer, len(tokenizer)) == encode_prompt(SYSTEM_CHAT, tokenizer,
                                                                                     len(tokenizer))


def test_instructions_the_template_leaves_out_are_a_prompt_error(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": INSTRUCTIONS}, *TURNS]
    assert INSTRUCTIONS not in oracle(tokenizer, messages)[1]     # the template drops it without a word
    with pytest.raises(PromptError, match=r"left chat message 1 \(role 'developer'\) out of the prompt.*one message"):
        encode_prompt(messages, tokenizer, len(tokenizer))


@pytest.mark.parametrize("role", ["tool", "wizard", "Developer"])
def test_an_unknown_role_is_a_prompt_error(tokenizer, role):
    with pytest.raises(PromptError, match=rf"chat message 1 has role '{role}'; the roles are system, user, "
                                          r"assistant, developer"):
        encode_prompt([TURNS[0], {"role": role, "content": "Paris."}], tokenizer, len(tokenizer))


def test_the_templates_own_refusal_is_a_prompt_error(tokenizer):
    messages = [TURNS[0], {"role": "assistant", "content": "<|channel|>analysis<|message|>Paris."}, TURNS[2]]
    with pytest.raises(PromptError, match=r"chat template refused these messages: You have passed a message "
                                          r"containing <\|channel\|> tags in the content field"):
        encode_prompt(messages, tokenizer, len(tokenizer))


def test_developer_is_system_for_a_template_that_does_not_name_it(tmp_path):
    from transformers import AutoTokenizer

    chatml = AutoTokenizer.from_pretrained(build_chat_llama(tmp_path / "m"))
    developer = encode_prompt(DEVELOPER_CHAT, chatml, len(chatml))
    assert developer == encode_prompt(SYSTEM_CHAT, chatml, len(chatml))
    assert chatml.decode(developer).startswith(f"<|im_start|>system\n{INSTRUCTIONS}<|im_end|>")


def test_developer_stays_developer_for_a_template_that_names_it(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_chat_llama(tmp_path / "m"))
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{% if m.role == 'developer' %}dev{% else %}"
                               "{{ m.role }}{% endif %}: {{ m.content }}<|im_end|>{% endfor %}")
    assert tokenizer.decode(encode_prompt(DEVELOPER_CHAT[:2], tokenizer, len(tokenizer))) == (
        f"<|im_start|>dev: {INSTRUCTIONS}<|im_end|><|im_start|>user: {TURNS[0]['content']}<|im_end|>")


def test_an_engine_generates_from_a_harmony_prompt(harmony_model, tokenizer):
    want_ids, _ = oracle(tokenizer, DEVELOPER_CHAT)

    async def main():
        async with await Engine.open(harmony_model, EngineConfig(device="cpu", dtype="float32")) as engine:
            return await engine.generate(DEVELOPER_CHAT, {"max_new_tokens": 3, "temperature": 0.0,
                                                          "ignore_eos": True})

    completion = asyncio.run(main())
    assert list(completion.prompt_token_ids) == want_ids
    assert list(completion.token_ids) == oracle_greedy(harmony_model, want_ids, 3)
