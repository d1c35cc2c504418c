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


def check_greedy_tokens(path: str | Path, prompt: list[int], tokens: list[int], expected: list[int], *,
                        exact: bool, tolerance: float = 3e-2, min_shared: int = 0) -> None:
    """Raise AssertionError unless ``tokens`` are transformers' greedy ``expected`` for ``prompt``.

    ``exact`` (fp32): equal, token for token. Otherwise (a low-precision run) equal, or equal up
    to a first difference that is a tie at that precision: two roundings of one model may break a
    near-tie differently (a vocabulary argmax, a router's choice of experts), after which greedy
    runs part. The parting is accepted where transformers' fp32 logits, on the shared prefix, rate
    the two choices within ``tolerance`` of the row's largest magnitude, and not before token
    ``min_shared``; a wrong token is never a tie."""
    if tokens == expected:
        return
    if exact or len(tokens) != len(expected):
        raise AssertionError(f"greedy tokens differ from transformers': {tokens} != {expected}")
    first = next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)
    row = oracle_logits(path, list(prompt) + tokens[:first], "float32")[-1]
    gap = ((row[expected[first]] - row[tokens[first]]).abs() / row.abs().max()).item()
    if gap > tolerance:
        raise AssertionError(f"token {first}: {tokens[first]} instead of {expected[first]}, "
                             f"fp32 logits {gap:.2e} apart (more than {tolerance:.0e}: not a tie)")
    if first < min_shared:
        raise AssertionError(f"greedy tokens parted from transformers' at token {first} (before {min_shared})")


def check_logit_rows(logits: torch.Tensor, expected: torch.Tensor, *, tolerance: float = 3e-2,
                     share: float = 0.9) -> None:
    """Raise AssertionError unless at least ``share`` of the rows of ``logits`` are within
    ``tolerance`` of ``expected``'s (each row's largest difference over its largest magnitude):
    the criterion for a low-precision run of a mixture of experts, where a router's near-tie may
    give a few tokens other experts than the oracle's run gives them."""
    rows = (logits - expected).abs().amax(dim=-1) / expected.abs().amax(dim=-1)
    within = (rows <= tolerance).float().mean().item()
    if within < share:
        raise AssertionError(f"only {within:.0%} of rows within {tolerance}: {rows.tolist()}")
