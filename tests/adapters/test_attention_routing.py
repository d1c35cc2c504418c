"""Which kernel ``attend`` gives contiguous KV, and what the masked calls cost.

Calls that need no mask (one query; a causal chunk from position 0 that no narrower window
cuts) stay one fused SDPA call. Calls that need one (a prefill chunk after position 0, a
window narrower than the chunk) go through the online softmax in key tiles: their results
equal SDPA with an explicit mask and a softmax written out in full, they never call SDPA, and
the tensors they hold at once stay O(queries x tile) — where SDPA's math backend, which CUDA
falls back to for a masked grouped-query call, holds the whole score matrix.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tierflow.adapters import attention
from tierflow.adapters.attention import KEY_TILE_TOKENS, attend
from tierflow.tiers.plan.costmodel import ModelCosts


def _case(n, start, heads, kv_heads, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, heads, d, generator=gen).to(dtype)
    keys = torch.randn(kv_heads, start + n, d, generator=gen).to(dtype)
    values = torch.randn(kv_heads, start + n, d, generator=gen).to(dtype)
    return q, keys, values


def _mask(start, n, total, window):
    q_pos = torch.arange(start, start + n)[:, None]
    k_pos = torch.arange(total)[None, :]
    return (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)


def _sdpa_with_mask(q, keys, values, start, *, scale=None, window=None):
    """What ``attend`` did before for a masked call: one SDPA call with the mask spelled out."""
    n, heads, d = q.shape
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], scale=scale,
                                         attn_mask=_mask(start, n, keys.shape[1], window),
                                         enable_gqa=heads != keys.shape[0])
    return out[0].transpose(0, 1).reshape(n, heads * d)


def _reference(q, keys, values, start, *, scale=None, window=None):
    """Every score in float64, the causal and window masks, softmax."""
    n, heads, d = q.shape
    group = heads // keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=0)
    v = values.double().repeat_interleave(group, dim=0)
    scores = (q.double().transpose(0, 1) @ k.transpose(1, 2)) * (d ** -0.5 if scale is None else scale)
    weights = torch.softmax(scores.masked_fill(~_mask(start, n, keys.shape[1], window), float("-inf")), dim=-1)
    return (weights @ v).transpose(0, 1).reshape(n, heads * d).float()


# (queries, start, window): chunks after position 0, windows narrower than the chunk, and both;
# at the default tile, keys 500..529 and 1000..1039 cross a tile's edge, as do 600 queries
MASKED = [(2, 511, None), (30, 500, None), (40, 1000, None), (600, 0, 100), (513, 600, None),
          (30, 500, 64), (40, 1000, 700), (17, 3, 5), (64, 64, 1)]


@pytest.mark.parametrize("n,start,window", MASKED)
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("tile", [KEY_TILE_TOKENS, 64, 7])
def test_masked_calls_match_sdpa_and_the_reference(n, start, window, heads, kv_heads, tile, monkeypatch):
    monkeypatch.setattr(attention, "KEY_TILE_TOKENS", tile)
    q, keys, values = _case(n, start, heads, kv_heads, seed=n + start)
    got = attend(q, keys, values, start, window=window)
    torch.testing.assert_close(got, _sdpa_with_mask(q, keys, values, start, window=window), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, _reference(q, keys, values, start, window=window), rtol=1e-5, atol=1e-5)


def test_a_scale_is_applied_on_the_tiled_path():
    q, keys, values = _case(30, 500, 8, 2)
    torch.testing.assert_close(attend(q, keys, values, 500, scale=0.3),
                               _reference(q, keys, values, 500, scale=0.3), rtol=1e-5, atol=1e-5)


def test_bf16_masked_call_matches_within_its_precision():
    q, keys, values = _case(40, 1000, 8, 2, dtype=torch.bfloat16)
    got = attend(q, keys, values, 1000)
    assert got.dtype == torch.bfloat16
    expected = _reference(q, keys, values, 1000)
    assert ((got.float() - expected).abs().max() / expected.abs().max()).item() < 2e-2


@contextlib.contextmanager
def _sdpa_calls(monkeypatch):
    """The keyword arguments of every SDPA call made meanwhile (each still runs)."""
    calls: list[dict] = []
    original = F.scaled_dot_product_attention

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    yield calls


@pytest.mark.parametrize("n,start,window", MASKED)
def test_masked_gqa_calls_never_reach_sdpa(n, start, window, monkeypatch):
    q, keys, values = _case(n, start, 8, 2)
    with _sdpa_calls(monkeypatch) as calls:
        attend(q, keys, values, start, window=window)
    assert calls == []


@pytest.mark.parametrize("n,start,window", [(1, 0, None), (1, 999, None), (1, 999, 64), (64, 0, None),
                                            (64, 0, 64), (64, 0, 4096)])
def test_calls_without_a_mask_stay_one_fused_sdpa_call(n, start, window, monkeypatch):
    """Decode (one query, whatever the window: it sees every key from its window's first) and a
    causal chunk from 0 that no narrower window cuts: one SDPA call, with no mask."""
    q, keys, values = _case(n, start, 8, 2)
    with _sdpa_calls(monkeypatch) as calls:
        got = attend(q, keys, values, start, window=window)
    assert len(calls) == 1 and calls[0].get("attn_mask") is None and calls[0]["enable_gqa"]
    assert calls[0]["is_causal"] == (n > 1)
    torch.testing.assert_close(got, _reference(q, keys, values, start, window=window), rtol=1e-5, atol=1e-5)


class LiveTensorBytes(TorchDispatchMode):
    """The most bytes that storages made inside the mode held at once, while any tensor on them
    lived. Sampled after every op, when its inputs and its output are both alive; storages that
    existed before (the arguments, and views or in-place results on them) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_bytes = 0
        self._live: dict[int, tuple[int, list[weakref.ref]]] = {}    # storage pointer -> (bytes, tensors on it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        storage = t.untyped_storage()
        key, entry = storage.data_ptr(), self._live.get(storage.data_ptr())
        alive = entry is not None and any(ref() is not None for ref in entry[1])
        if alive:
            entry[1].append(weakref.ref(t))
        elif key not in inputs and storage.nbytes():     # a storage made by this op
            self._live[key] = (storage.nbytes(), [weakref.ref(t)])

    def live_bytes(self) -> int:
        return sum(nbytes for nbytes, refs in self._live.values() if any(ref() is not None for ref in refs))


def peak_bytes(fn, *args, **kwargs) -> int:
    """The peak of ``LiveTensorBytes`` over ``fn(*args, **kwargs)``, its result included."""
    with LiveTensorBytes() as mode:
        fn(*args, **kwargs)
    return mode.peak_bytes


def costs_for(heads: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> ModelCosts:
    """The fields of ``ModelCosts`` that ``attention_bytes`` reads; the rest are placeholders."""
    return ModelCosts(name="attention", units=(), num_layers=1, hidden_size=heads * head_dim, num_heads=heads,
                      head_dim=head_dim, intermediate_size=1, vocab_size=1,
                      kv_bytes_per_token_layer=2 * kv_heads * head_dim * dtype_bytes, dtype_bytes=dtype_bytes,
                      tied=False)


def test_masked_gqa_memory_is_bounded_by_the_tile_not_the_context():
    """A prefill chunk of 256 queries after 3840 keys, 8 query heads on 2 KV heads: the tiled
    path holds at most what the planner budgets (a tile of scores, float32 state), the same at
    4096 and 16384 keys; the math backend, where CUDA's SDPA falls back to for this call, holds
    the whole score matrix and K/V repeated per query head."""
    n, heads, kv_heads, d = 256, 8, 2, 64
    budget = costs_for(heads, kv_heads, d, 4).attention_bytes(n, 4096)
    peaks = []
    for context in (4096, 16384):
        q, keys, values = _case(n, context - n, heads, kv_heads, d=d)
        peaks.append(peak_bytes(attend, q, keys, values, context - n))
    tile_scores = heads * n * KEY_TILE_TOKENS * 4
    assert tile_scores <= peaks[0] == peaks[1] <= budget
    q, keys, values = _case(n, 4096 - n, heads, kv_heads, d=d)
    with sdpa_kernel([SDPBackend.MATH]):
        math_peak = peak_bytes(_sdpa_with_mask, q, keys, values, 4096 - n)
    assert math_peak >= heads * n * 4096 * 4 > 4 * budget


def test_cuda_gqa_without_the_flash_backend_takes_the_tiles():
    """On CUDA, unmasked grouped-query calls that PyTorch's flash backend cannot take (fp32, or
    head_dim > 256) would fall to the math backend too: they go to the tiles instead."""
    from types import SimpleNamespace

    from tierflow.adapters.attention import fused_sdpa_is_lean

    def query(dtype, heads=8, d=64, device="cuda"):
        return SimpleNamespace(device=torch.device(device), shape=(4, heads, d), dtype=dtype)

    keys = SimpleNamespace(shape=(2, 100, 64))
    assert fused_sdpa_is_lean(query(torch.bfloat16), keys)
    assert not fused_sdpa_is_lean(query(torch.float32), keys)
    assert not fused_sdpa_is_lean(query(torch.bfloat16, d=512), keys)
    assert fused_sdpa_is_lean(query(torch.float32, heads=2), keys)             # MHA: the efficient backend
    assert fused_sdpa_is_lean(query(torch.float32, device="cpu"), keys)
