"""Causal attention through the ``flash-attn`` package, when it is importable and takes the shapes.

``attend`` hands a call here when ``flash_supported`` says so; otherwise it keeps its SDPA /
online-softmax path. Both compute the same attention (up to rounding), so the choice changes
speed, not what is computed.

What is relied on, from the docstring of ``flash_attn.flash_attn_func`` (flash-attn >= 2.6,
``flash_attn/flash_attn_interface.py``):

* Layout: q is (batch, seqlen_q, nheads, headdim), k and v are (batch, seqlen_k, nheads_k,
  headdim); the output has q's shape. The last dimension must be contiguous (otherwise the
  package copies the tensor), other strides are free, so a KV that is a view of a larger buffer
  goes in without a copy when its rows are.
* Grouped-query attention: nheads must be a multiple of nheads_k; query heads
  g*G .. g*G+G-1 (G = nheads // nheads_k) use KV head g, the same grouping as ``enable_gqa``.
* ``causal=True`` aligns the mask to the bottom-right corner when seqlen_q < seqlen_k: query i
  sees keys 0 .. i + seqlen_k - seqlen_q. With the n queries at positions start..start+n-1 and
  all start+n keys passed, that is exactly "query at position p sees keys 0..p".
* ``window_size=(left, right)``: query i sees keys i + seqlen_k - seqlen_q - left ..
  i + seqlen_k - seqlen_q + right; (-1, -1) is no window. Our window (keys p - window + 1 .. p)
  is therefore ``(window - 1, 0)``.
* ``softcap`` > 0 replaces each score s (already multiplied by ``softmax_scale``) by
  softcap * tanh(s / softcap) before the softmax; 0.0 turns it off. ``softmax_scale=None``
  means headdim ** -0.5, as in ``attend``.
* ``return_attn_probs=True`` returns ``(out, softmax_lse, S_dmask)``: ``softmax_lse`` is float32
  [batch, nheads, seqlen_q], the natural log of each row's sum of exp(score) over the keys it sees
  (scores scaled and capped as above); ``S_dmask`` is only computed with dropout, so asking costs
  nothing more than the kernel already writes (it keeps the lse for the backward pass).

Attention sinks (gpt-oss) are not a flash-attn argument, but the log-sum-exp is enough to add them
after the kernel: one more logit ``sink`` per head whose probability is dropped changes each row
from Σ e^s v / Σ e^s = out into Σ e^s v / (Σ e^s + e^sink) = out · e^lse / (e^lse + e^sink)
= out · sigmoid(lse - sink). The factor is computed in float32 on the device, one elementwise
pass over [seqlen_q, heads], with no host synchronisation.

The kernels take fp16 and bf16 only, head dims up to 256, and need an Ampere or newer GPU
(compute capability 8.0+): ``flash_supported`` checks each, so an unsupported call falls back
rather than raising. ``window_size`` exists since 2.3 and ``softcap`` since 2.6; an older
``flash_attn_func`` is treated as absent rather than failing on the first call.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable

import torch

from tierflow.errors import FlashAttnUnavailableError

logger = logging.getLogger(__name__)

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_COMPUTE_CAPABILITY = (8, 0)
_REQUIRED_PARAMETERS = ("window_size", "softcap")


@functools.cache
def flash_module() -> Callable[..., torch.Tensor] | None:
    """``flash_attn.flash_attn_func`` if importable and recent enough, else None; never raises.

    Cached per process (the import is slow and its answer does not change);
    ``flash_module.cache_clear()`` forgets it."""
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:   # noqa: BLE001 - a broken build (CUDA/ABI mismatch) must not stop the engine
        not_installed = isinstance(exc, ModuleNotFoundError) and exc.name == "flash_attn"
        (logger.debug if not_installed else logger.warning)(
            "flash-attn not usable (%s: %s): attention uses SDPA", type(exc).__name__, exc)
        return None
    if not _takes_required_parameters(flash_attn_func):
        logger.warning("flash_attn_func lacks %s (flash-attn >= 2.6 has them): attention uses SDPA",
                       " and ".join(_REQUIRED_PARAMETERS))
        return None
    return flash_attn_func


def _takes_required_parameters(func: Callable[..., object]) -> bool:
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):      # no signature to read: cannot tell, so do not rely on it
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    return all(name in parameters for name in _REQUIRED_PARAMETERS)


def check_sinks(sinks: torch.Tensor | None, num_heads: int) -> None:
    """Raise ValueError unless ``sinks`` is None or one floating-point logit per query head
    (shape only: nothing waits for the device)."""
    if sinks is None:
        return
    if tuple(sinks.shape) != (num_heads,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor of shape [{num_heads}] (one logit per query head), got "
                         f"{sinks.dtype} of shape {list(sinks.shape)}: pass the attention layer's sinks as they are")


def flash_device_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attn runs on ``device`` in ``dtype``: fp16 or bf16, the package importable,
    and a CUDA device of compute capability 8.0+."""
    if device.type != "cuda" or dtype not in FLASH_DTYPES or flash_module() is None:
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= MIN_COMPUTE_CAPABILITY


def flash_head_dim_supported(head_dim: int) -> bool:
    """Whether the flash-attn kernels take this head dim: at most 256 and a multiple of 8."""
    return head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0


def flash_supported(q: torch.Tensor, keys: torch.Tensor, softcap: float | None, window: int | None) -> bool:
    """Whether ``flash_attend(q, keys, ...)`` may replace ``attend``: q on CUDA in fp16/bf16 with
    head_dim <= 256 and a multiple of 8, keys of q's dtype with a contiguous last dimension, a
    positive softcap and window if any (flash-attn reads 0 as "none"), and flash-attn importable."""
    if not flash_head_dim_supported(q.shape[-1]):
        return False
    if keys.dtype != q.dtype or keys.stride(-1) != 1:
        return False
    if (softcap is not None and softcap <= 0) or (window is not None and window < 1):
        return False
    return flash_device_supported(q.device, q.dtype)


def flash_attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, *,
                 scale: float | None = None, window: int | None = None,
                 softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``attend`` through flash-attn: ``q`` [n, H, D] at positions start..start+n-1 over ``keys``
    / ``values`` [KVH, >= start+n, D] (keys past start+n-1 are ignored); returns [n, H*D].
    ``sinks`` [H]: one more logit per head in every row, its probability dropped."""
    n, num_heads, d = q.shape
    total = start + n
    if keys.shape[1] < total or values.shape[1] < total:
        raise ValueError(f"queries at {start}..{total - 1} need {total} keys and values, got "
                         f"{keys.shape[1]} and {values.shape[1]}")
    check_sinks(sinks, num_heads)
    func = flash_module()
    if func is None:
        raise FlashAttnUnavailableError("flash-attn is not importable (or older than 2.6): "
                                        "check flash_supported() before calling flash_attend()")
    # All start+n keys go in, even with a window: the bottom-right alignment then puts query i
    # at position start+i, and the kernel skips the tiles the window masks.
    arguments = dict(dropout_p=0.0, softmax_scale=scale, causal=True,
                     window_size=(window - 1, 0) if window else (-1, -1), softcap=softcap or 0.0)
    q_b, k_b, v_b = q[None], keys[:, :total].transpose(0, 1)[None], values[:, :total].transpose(0, 1)[None]
    if sinks is None:
        return func(q_b, k_b, v_b, **arguments)[0].reshape(n, num_heads * d)
    out, lse, _ = func(q_b, k_b, v_b, return_attn_probs=True, **arguments)
    # out · e^lse / (e^lse + e^sink) = out · sigmoid(lse - sink) (the module docstring derives it)
    kept = torch.sigmoid(lse[0].transpose(0, 1).float() - sinks.to(device=q.device, dtype=torch.float32))
    return (out[0].float() * kept[..., None]).to(q.dtype).reshape(n, num_heads * d)
