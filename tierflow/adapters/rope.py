"""Rotary position embeddings: config.json's rope settings, inverse frequencies, cos/sin tables.

The tables mirror transformers' rotary modules: inverse frequencies in float32 on the CPU,
``positions * inv_freq`` in float32, cos/sin times the rope type's attention factor, then cast
to the activation dtype. ``partial_rotary_factor`` < 1 rotates only the first dims of a head.

Supported rope types: default, "linear", "llama3", "longrope" (Phi-3) and "yarn". Longrope uses its
short factors while a sequence is at most ``original_max_position_embeddings`` long and its long
factors beyond. When a sequence grows past that length, transformers' Phi-3 recomputes its whole
KV cache with the long factors (the keys and values of every layer change); tierflow cannot
redo a sequence's earlier sweeps, so such a sequence fails with ``UnsupportedModelError``
(``longrope_crossings``) rather than silently diverging. A sequence that stays within the
original length, or whose first sweep already reaches past it (a prompt prefilled in one
sweep), matches transformers exactly.

YaRN (arXiv 2309.00071) stretches a model's context by ``factor``: frequencies that turn fewer
than ``beta_slow`` times over the original context are interpolated (divided by ``factor``),
those that turn more than ``beta_fast`` times are kept, and a linear ramp over the rotary dims
between the two (``truncate``, true unless set: the ramp's ends rounded to whole dims) blends
them; cos and sin are multiplied by ``attention_factor``, else ``0.1 * ln(factor) + 1`` (with
``mscale`` and ``mscale_all_dim`` both set: the ratio of that formula with each of them). The
frequencies do not depend on the sequence's length, so every position of every sweep matches
transformers' ``_compute_yarn_parameters`` bit for bit, in the same float32 arithmetic; like
transformers, a top-level ``original_max_position_embeddings`` overrides the rope object's, and
without either the original length is ``max_position_embeddings``. The dynamic variants, whose
frequencies change with the sequence's length ("dynamic" NTK scaling), are not supported."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from tierflow.adapters.base import ModelSpec
from tierflow.errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


def rope_kind(scaling: Mapping[str, Any] | None) -> str:
    scaling = scaling or {}
    return str(scaling.get("rope_type", scaling.get("type")) or "default")


def rope_config(config: Mapping[str, Any], params: Mapping[str, Any] | None = None, *, default_theta: float = 10000.0
                ) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling or None) from config.json: transformers >= 5 folds both into
    ``rope_parameters`` (pass a per-layer-type entry as ``params``); older files have
    ``rope_theta`` and ``rope_scaling``. A top-level ``original_max_position_embeddings``
    goes into a yarn object read from the top level, as transformers gives it priority there."""
    top_level = params is None
    params = config.get("rope_parameters") if params is None else params
    if isinstance(params, Mapping) and params:
        theta = float(params.get("rope_theta") or config.get("rope_theta") or default_theta)
        scaling = None if rope_kind(params) == "default" else dict(params)
    else:
        theta, scaling = float(config.get("rope_theta") or default_theta), config.get("rope_scaling")
        scaling = dict(scaling) if scaling else None
    if top_level and rope_kind(scaling) == "yarn" and config.get("original_max_position_embeddings") is not None:
        scaling = dict(scaling or {}, original_max_position_embeddings=config["original_max_position_embeddings"])
    return theta, scaling


def check_rope(kind: str, supported: tuple[str, ...] = ROPE_TYPES) -> None:
    if kind not in supported:
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported; supported: "
                                    f"{[k for k in supported if k != 'default']}")


def rotary_dims(spec: ModelSpec) -> int:
    return int(spec.head_dim * spec.partial_rotary_factor)


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(spec: ModelSpec, *, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies (float32, CPU), with the checkpoint's rope scaling applied.
    ``local``: those of sliding layers with their own base (``spec.rope_local_theta``, no
    scaling). ``long``: longrope's long factors instead of its short ones."""
    dim = rotary_dims(spec)
    if local:
        assert spec.rope_local_theta is not None
        return _base_inv_freq(spec.rope_local_theta, dim)
    theta, scaling = spec.rope_theta, spec.rope_scaling or {}
    kind = rope_kind(scaling)
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (factors * theta ** shape)
    if kind == "yarn":
        return _yarn_inv_freq(theta, dim, scaling, spec.max_position_embeddings)
    inv_freq = _base_inv_freq(theta, dim)
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_original(scaling: Mapping[str, Any], max_position_embeddings: int) -> int:
    return int(scaling.get("original_max_position_embeddings") or max_position_embeddings)


def _yarn_correction_dim(rotations: float, dim: int, theta: float, original: int) -> float:
    """The rotary dim whose frequency turns ``rotations`` times over ``original`` positions."""
    return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def _yarn_inv_freq(theta: float, dim: int, scaling: Mapping[str, Any], max_position_embeddings: int
                   ) -> torch.Tensor:
    """transformers' ``_compute_yarn_parameters``, operation for operation (its float32 rounding
    included). A null ``beta_fast`` / ``beta_slow`` (or 0) is the default, 32 / 1; a null
    ``truncate`` does not truncate, as there."""
    factor, original = float(scaling["factor"]), _yarn_original(scaling, max_position_embeddings)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    low = _yarn_correction_dim(beta_fast, dim, theta, original)
    high = _yarn_correction_dim(beta_slow, dim, theta, original)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                   # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def _yarn_mscale(factor: float, mscale: float = 1) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def longrope_crossings(spec: ModelSpec, seq_slices: tuple[slice, ...], seq_starts: tuple[int, ...]
                       ) -> dict[int, UnsupportedModelError]:
    """The sequences of a sweep that grow past longrope's original length after their first
    sweep, each with the error it fails with."""
    if rope_kind(spec.rope_scaling) != "longrope":
        return {}
    original = int(spec.rope_scaling["original_max_position_embeddings"])   # type: ignore[index]
    failures = {}
    for index, (rows, start) in enumerate(zip(seq_slices, seq_starts)):
        end = start + rows.stop - rows.start
        if 0 < start <= original < end:
            failures[index] = UnsupportedModelError(
                f"{spec.architecture} with longrope: this sequence grows to {end} tokens, past "
                f"original_max_position_embeddings={original}, after tokens computed with the short rope factors; "
                "transformers then recomputes the whole sequence with the long factors, which tierflow does not. "
                f"Keep prompt plus new tokens within {original}, or prefill a longer prompt in one sweep "
                "(EngineConfig.prefill_chunk_tokens >= the prompt's length)")
    return failures


def attention_factor(spec: ModelSpec) -> float:
    """What longrope and yarn multiply cos and sin by (1.0 for the other types)."""
    scaling = spec.rope_scaling or {}
    kind = rope_kind(scaling)
    if kind not in ("longrope", "yarn"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if kind == "yarn":
        factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        return _yarn_mscale(factor)
    original = float(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or spec.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class RopeTables:
    """Per-adapter cache of inverse frequencies (per device) and the cos/sin of a sweep."""

    def __init__(self) -> None:
        self._inv_freq: dict[tuple[Any, ...], torch.Tensor] = {}

    def _freq(self, spec: ModelSpec, device: torch.device, local: bool, long: bool) -> torch.Tensor:
        key = (device, local, long)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(spec, local=local, long=long).to(device)
        return self._inv_freq[key]

    def tables(self, spec: ModelSpec, positions: torch.Tensor, seq_slices: tuple[slice, ...],
               seq_starts: tuple[int, ...], dtype: torch.dtype, *, local: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [num_tokens, rotary dims] in ``dtype`` (``local``: of the sliding layers'
        own rope base)."""
        device = positions.device
        inv_freq = self._freq(spec, device, local, False)[None, :]
        scale = 1.0 if local else attention_factor(spec)
        if not local and rope_kind(spec.rope_scaling) == "longrope":
            original = int(spec.rope_scaling["original_max_position_embeddings"])   # type: ignore[index]
            long_rows = torch.zeros(positions.shape[0], 1, dtype=torch.bool)
            for rows, start in zip(seq_slices, seq_starts):
                long_rows[rows] = start + (rows.stop - rows.start) > original
            if bool(long_rows.any()):
                inv_freq = torch.where(long_rows.to(device), self._freq(spec, device, False, True)[None, :], inv_freq)
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos.to(dtype), sin.to(dtype)
