"""The transformers oracle: what transformers' own model of a checkpoint computes (logits, greedy
tokens), fully in memory, for tests to compare tierflow's output with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _load_oracle(path: str | Path, dtype: str) -> Any:
    """transformers' model of a checkpoint, fully in memory (MXFP4 experts dequantized)."""
    import json

    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    quantization = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config
        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)


def oracle_logits(path: str | Path, token_ids: list[int], dtype: str = "float32") -> torch.Tensor:
    """Float32 logits [len(token_ids), vocab] from transformers, fully in memory."""
    model = _load_oracle(path, dtype)
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def oracle_greedy(path: str | Path, token_ids: list[int], max_new_tokens: int, dtype: str = "float32") -> list[int]:
    """Greedy continuation from transformers (no EOS stop)."""
    model = _load_oracle(path, dtype)
    with torch.inference_mode():
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(token_ids):].tolist()
