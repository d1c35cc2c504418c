from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tierflow.testing import build_random_llama

# name -> builder kwargs. Together they cover GQA and MHA, tied and untied embeddings,
# fp32 and bf16 safetensors, a sharded checkpoint with an index json, llama3 rope
# scaling and attention/MLP biases.
TINY_MODELS = {
    "gqa-untied-fp32": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
    "mha-tied-fp32": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    "gqa-tied-bf16": dict(num_heads=8, num_kv_heads=2, hidden_size=128, tie_word_embeddings=True, dtype="bfloat16"),
    "sharded-fp32": dict(num_layers=4, max_shard_bytes=200_000),
    "llama3-rope-fp32": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "bias-fp32": dict(attention_bias=True, mlp_bias=True),
}


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Tests never write into the user's cache: the converted demo model and the probe's
    figures go to a temporary TIERFLOW_CACHE_DIR (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        directory = tmp_path_factory.mktemp("tierflow-cache")
        mp.setenv("TIERFLOW_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: build_random_llama(root / name, seed=i, **kw) for i, (name, kw) in enumerate(TINY_MODELS.items())}


@pytest.fixture(scope="session")
def tiny_model(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["gqa-untied-fp32"]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def strict_simulated_cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Every ``SimulatedCuda`` a test makes is asked for hazards at the end of the test (races,
    blocks freed under a stream, unbound threads), unless the test is marked
    ``hazards_expected`` (a negative control that breaks the ordering on purpose)."""
    from tierflow.testing import SimulatedCuda

    made: list[SimulatedCuda] = []
    original = SimulatedCuda.__init__

    def init(self: SimulatedCuda, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SimulatedCuda, "__init__", init)
    yield made
    if request.node.get_closest_marker("hazards_expected") is None:
        for ops in made:
            ops.check()


@pytest.fixture(scope="module")
def talking_model(tmp_path_factory):
    """A tiny checkpoint with a word-level tokenizer ("w1 w2 ..."), so `tierflow run` takes text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = build_random_llama(tmp_path_factory.mktemp("talking") / "m", seed=3)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 512)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    return path
