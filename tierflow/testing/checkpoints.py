"""Tiny random checkpoints built locally with transformers (nothing is downloaded): a Llama, a Llama
with a chat tokenizer, one of every supported family, and checkpoints derived from another one
(a shallower or deeper layer copy, gpt-oss experts packed in MXFP4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def build_random_llama(path: str | Path, *, hidden_size: int = 64, num_layers: int = 3, num_heads: int = 4,
                       num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int = 512,
                       tie_word_embeddings: bool = False, dtype: str = "float32", max_shard_bytes: int | None = None,
                       rope_scaling: dict[str, Any] | None = None, max_position_embeddings: int = 4096,
                       initializer_range: float = 0.1, seed: int = 0, **extra: Any) -> Path:
    """Write a random ``LlamaForCausalLM`` checkpoint (config.json + safetensors, sharded with an
    index json when ``max_shard_bytes`` is given). A larger-than-default initializer range
    makes logits peaked, so greedy tokens are a meaningful comparison."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    config = LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                         vocab_size=vocab_size, tie_word_embeddings=tie_word_embeddings,
                         max_position_embeddings=max_position_embeddings, rope_scaling=rope_scaling,
                         initializer_range=initializer_range, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None, **extra)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes is not None:
        kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(path, **kwargs)
    return path


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the "
                   "capital of France. Write one sentence about the sea: the sea is wide and deep and blue. "
                   "Name three primary colours: red, yellow and blue. 0 1 2 3 4 5 6 7 8 9, yes; no!")


def build_chat_llama(path: str | Path, *, seed: int = 0, **kwargs: Any) -> Path:
    """``build_random_llama`` with a tokenizer: a small byte-level BPE (trained here on a fixed
    text, so it encodes any string) with a ChatML chat template, whose vocabulary is the
    model's, and ``<|im_end|>`` as the end-of-sequence token. Text prompts, chat messages and
    detokenized output then work as with a real model (the words are random, of course)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    path = build_random_llama(path, vocab_size=len(fast), seed=seed, **kwargs)
    fast.save_pretrained(path)
    config_path = Path(path) / "config.json"
    import json
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = fast.eos_token_id
    config_path.write_text(json.dumps(config, indent=2))
    return path


# family -> (transformers config class, model class) for ``build_random_checkpoint``
FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
}


def build_random_checkpoint(path: str | Path, family: str, *, hidden_size: int = 64, num_layers: int = 3,
                            num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                            vocab_size: int = 512, dtype: str = "float32", max_shard_bytes: int | None = None,
                            max_position_embeddings: int = 4096, initializer_range: float = 0.1, seed: int = 0,
                            **config: Any) -> Path:
    """Write a random checkpoint of ``family`` (a key of ``FAMILY_CLASSES``) with its
    transformers classes: config.json + safetensors, sharded with an index json when
    ``max_shard_bytes`` is given. ``config`` goes to the family's config class as is (window,
    soft-caps, rope parameters, ...). Norm weights and biases, which transformers initialises
    to constants, get random values too, so a wrong norm formula or a dropped bias shows in
    the logits; the larger-than-default initializer range makes greedy tokens meaningful."""
    import transformers

    if family not in FAMILY_CLASSES:
        raise ValueError(f"family must be one of {sorted(FAMILY_CLASSES)}, got {family!r}")
    config_name, model_name = FAMILY_CLASSES[family]
    path = Path(path)
    cfg = getattr(transformers, config_name)(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, initializer_range=initializer_range,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, **config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 or name.endswith("_bias"):      # gpt-oss's stacked expert biases are 2-D
                param.add_(torch.randn_like(param) * (1.0 if name.endswith("sinks") else 0.1))
    model = model.to(getattr(torch, dtype))
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_bytes is not None:
        kwargs["max_shard_size"] = max_shard_bytes
    model.save_pretrained(path, **kwargs)
    return path


def layer_copy(source: str | Path, target: str | Path, *, num_layers: int | None = None, extra_layers: int = 0,
               scale: float = 1.0, seed: int = 0) -> Path:
    """A copy of the single-file checkpoint ``source`` with other decoder layers: its first
    ``num_layers`` (a shallow draft of it, for speculative decoding), then ``extra_layers``
    new ones, each a copy of a source layer (in turn) with fresh random matrices whose output
    projections (attention ``o_proj``, MLP ``down_proj`` and experts' down projections) are
    scaled by ``scale``: the copy's residual stream is the source's plus ``scale``-small
    contributions, so ``scale`` sets how far it strays from the source (0: the same logits).
    Embedding, final norm and head are the source's, so both share a vocabulary."""
    import json

    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    have = config["num_hidden_layers"]
    keep = have if num_layers is None else num_layers
    if not 1 <= keep <= have or extra_layers < 0:
        raise ValueError(f"keep 1..{have} of the source's layers and add >= 0, got {num_layers} and {extra_layers}")
    tensors = load_file(source / "model.safetensors")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    out = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            layers.setdefault(int(parts[2]), {})[".".join(parts[3:])] = tensor
        else:
            out[name] = tensor
    generator = torch.Generator().manual_seed(seed)
    std = config.get("initializer_range", 0.02)
    for i in range(keep + extra_layers):
        if i < keep:
            layer = layers[i]
        else:
            layer = {}
            for name, tensor in layers[(i - keep) % keep].items():
                if tensor.ndim >= 2:
                    tensor = (torch.randn(tensor.shape, generator=generator) * std).to(tensor.dtype)
                    if "o_proj" in name or "down_proj" in name or name.endswith(("w2.weight",)):
                        tensor = tensor * scale
                layer[name] = tensor.clone()
        for name, tensor in layer.items():
            out[f"model.layers.{i}.{name}"] = tensor.contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(out, target / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = keep + extra_layers
    for key in ("layer_types",):                 # per-layer lists follow the layers
        if isinstance(config.get(key), list):
            config[key] = [config[key][i if i < keep else (i - keep) % keep] for i in range(keep + extra_layers)]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())
    return target


def pack_mxfp4_experts(source: str | Path, target: str | Path) -> Path:
    """A copy of the gpt-oss checkpoint ``source`` with its expert weights packed in MXFP4 as
    the published checkpoints hold them (``*_blocks`` [experts, out, in / 32, 16] and
    ``*_scales``, uint8; biases, attention, router, embedding and head as they were) and
    ``quantization_config`` in its config.json. transformers reads it with
    ``Mxfp4Config(dequantize=True)``, as ``oracle_logits`` does."""
    import json

    from safetensors.torch import load_file, save_file

    from tierflow.adapters.mxfp4 import quantize

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = quantize(tensor.transpose(1, 2))   # [E, out, in]
        else:
            tensors[name] = tensor
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
