"""The flash-attn dispatch: ``flash_attend`` against ``attend``'s SDPA / online-softmax path.

flash-attn needs CUDA, so on CPU a fake ``flash_attn`` module stands in: its ``flash_attn_func``
is a plain float32 reference of the documented semantics (KV heads shared by consecutive query
heads, a causal mask aligned to the bottom-right corner, ``window_size=(left, right)`` relative to
that corner, softcap applied to the scaled scores) and records every call. Asked for
``return_attn_probs``, it returns ``(out, softmax_lse, None)`` as flash-attn 2.x does without
dropout: the float32 log-sum-exp [batch, heads, seqlen_q] of the scores each row keeps.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import tierflow.adapters.attention as attention
from tierflow.adapters.attention import attend, attention_backend
from tierflow.adapters.flash import flash_attend, flash_module, flash_supported
from tierflow.errors import FlashAttnUnavailableError
from tests.adapters.test_attention import _case


def _reference_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                               softcap=0.0, return_attn_probs=False):
    """flash_attn_func's documented forward, computed naively in float32."""
    _, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    assert num_heads % kv_heads == 0 and dropout_p == 0.0
    k = k.float().repeat_interleave(num_heads // kv_heads, dim=2)     # heads g*G..g*G+G-1 use KV head g
    v = v.float().repeat_interleave(num_heads // kv_heads, dim=2)
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    row = torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)      # bottom-right alignment
    col = torch.arange(seqlen_k)[None, :]
    left, right = window_size
    if causal:
        right = 0
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        keep &= col >= row - left
    if right >= 0:
        keep &= col <= row + right
    scores = scores.masked_fill(~keep, -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).to(q.dtype)
    return (out, scores.logsumexp(dim=-1), None) if return_attn_probs else out


@pytest.fixture(autouse=True)
def _fresh_import():
    flash_module.cache_clear()
    yield
    flash_module.cache_clear()


@pytest.fixture
def fake_flash(monkeypatch):
    """Installs the fake ``flash_attn``; yields the list of its calls."""
    calls = []

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        calls.append(dict(q_shape=tuple(q.shape), k_shape=tuple(k.shape), v_shape=tuple(v.shape),
                          k_ptr=k.data_ptr(), v_ptr=v.data_ptr(), last_strides=(q.stride(-1), k.stride(-1), v.stride(-1)),
                          dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
                          window_size=tuple(window_size), softcap=softcap, return_attn_probs=return_attn_probs))
        return _reference_flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                                          return_attn_probs)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


@pytest.fixture
def sm90(monkeypatch):
    """Makes a "cuda" device report an H100's compute capability (the CPU build has no CUDA)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def _assert_matches(got, expected):
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


CASES = {                   # n, start, heads, kv_heads, window, softcap, scale
    "prefill": (7, 0, 4, 4, None, None, None),
    "chunk": (16, 40, 4, 4, None, None, None),
    "decode": (1, 99, 4, 4, None, None, None),
    "gqa": (9, 30, 8, 2, None, None, None),
    "mqa-scale": (5, 12, 6, 1, None, None, 0.3),
    "window-prefill": (20, 0, 8, 2, 6, None, None),
    "window-chunk": (12, 50, 8, 2, 5, None, None),
    "window-decode": (1, 60, 8, 2, 8, None, None),
    "window-wider-than-context": (6, 4, 4, 2, 64, None, None),
    "softcap": (10, 20, 8, 2, None, 5.0, None),
    "softcap-window-decode": (1, 33, 4, 2, 7, 3.0, None),
    "softcap-window-chunk": (8, 24, 8, 2, 9, 2.0, 0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_flash_attend_matches_attend(fake_flash, case, dtype):
    n, start, heads, kv_heads, window, softcap, scale = case
    q, keys, values = _case(n, start, heads, kv_heads, dtype=dtype)
    expected = attend(q, keys, values, start, scale=scale, window=window, softcap=softcap)
    got = flash_attend(q, keys, values, start, scale=scale, window=window, softcap=softcap)
    assert got.shape == (n, heads * 16) and len(fake_flash) == 1
    _assert_matches(got, expected)


def test_arguments_follow_the_flash_attn_convention(fake_flash):
    q, keys, values = _case(12, 50, 8, 2)
    flash_attend(q, keys, values, 50, window=5, softcap=4.0, scale=0.25)
    flash_attend(q, keys, values, 50)
    windowed, plain = fake_flash
    assert windowed["q_shape"] == (1, 12, 8, 16)
    assert windowed["k_shape"] == windowed["v_shape"] == (1, 62, 2, 16)      # every key, seqlen-major
    assert windowed["window_size"] == (4, 0) and windowed["causal"] is True and windowed["dropout_p"] == 0.0
    assert windowed["softcap"] == 4.0 and windowed["softmax_scale"] == 0.25
    assert plain["window_size"] == (-1, -1) and plain["softcap"] == 0.0 and plain["softmax_scale"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["head-major", "token-major"])
def test_kv_as_a_view_of_a_longer_buffer(fake_flash, layout, dtype):
    """KV views of a cache buffer go in without a copy; keys past start+n are ignored."""
    n, start, heads, kv_heads, d, capacity = 6, 25, 8, 2, 16, 64
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(n, heads, d, generator=gen).to(dtype)
    if layout == "head-major":          # [KVH, capacity, D], sliced on the token dim
        key_buf, value_buf = (torch.randn(kv_heads, capacity, d, generator=gen).to(dtype) for _ in range(2))
        keys, values = key_buf, value_buf
    else:                               # [capacity, KVH, D], seen as [KVH, capacity, D]
        key_buf, value_buf = (torch.randn(capacity, kv_heads, d, generator=gen).to(dtype) for _ in range(2))
        keys, values = key_buf.transpose(0, 1), value_buf.transpose(0, 1)
    assert not keys[:, :start + n].is_contiguous()
    for window in (None, 4):
        expected = attend(q, keys[:, :start + n], values[:, :start + n], start, window=window)
        _assert_matches(flash_attend(q, keys[:, :start + n], values[:, :start + n], start, window=window), expected)
        _assert_matches(flash_attend(q, keys, values, start, window=window), expected)
    for call in fake_flash:
        assert call["k_ptr"] == key_buf.data_ptr() and call["v_ptr"] == value_buf.data_ptr()
        assert call["k_shape"] == (1, start + n, kv_heads, d) and call["last_strides"] == (1, 1, 1)


def test_too_few_keys_is_an_error(fake_flash):
    q, keys, values = _case(4, 10, 4, 2)
    with pytest.raises(ValueError, match="need 14 keys"):
        flash_attend(q, keys[:, :13], values[:, :13], 10)
    assert fake_flash == []


def test_flash_attend_without_the_package_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    q, keys, values = _case(2, 3, 4, 2)
    with pytest.raises(FlashAttnUnavailableError, match="flash_supported"):
        flash_attend(q, keys, values, 3)


def test_flash_module_finds_the_fake_and_caches(fake_flash, monkeypatch):
    func = flash_module()
    assert func is sys.modules["flash_attn"].flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert flash_module() is func                   # cached for the process
    flash_module.cache_clear()
    assert flash_module() is None


def test_missing_package_is_not_a_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with caplog.at_level("DEBUG", logger="tierflow.adapters.flash"):
        assert flash_module() is None
    assert caplog.records and all(r.levelname == "DEBUG" for r in caplog.records)


def test_flash_module_rejects_a_version_without_softcap(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = lambda q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1): q
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    assert flash_module() is None


def test_flash_module_never_raises(monkeypatch, caplog):
    class Broken(types.ModuleType):
        def __getattr__(self, name):
            raise OSError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setitem(sys.modules, "flash_attn", Broken("flash_attn"))
    assert flash_module() is None
    assert "libcudart" in caplog.text


def _cuda_query(dtype=torch.bfloat16, head_dim=64):
    """Stands in for a CUDA query tensor: flash_supported reads only these attributes of q."""
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(3, 8, head_dim))


def test_flash_supported_positive_control(fake_flash, sm90):
    assert flash_supported(_cuda_query(), torch.zeros(2, 10, 64, dtype=torch.bfloat16), None, None)
    assert flash_supported(_cuda_query(torch.float16, 256), torch.zeros(2, 10, 256, dtype=torch.float16), 50.0, 4096)
    assert flash_supported(_cuda_query(head_dim=8), torch.zeros(2, 10, 8, dtype=torch.bfloat16), None, 1)


@pytest.mark.parametrize("why", ["cpu", "fp32", "odd-head-dim", "head-dim-over-256", "key-dtype", "strided-keys",
                                 "zero-softcap", "zero-window", "old-gpu", "no-module"])
def test_flash_supported_rejects(fake_flash, sm90, monkeypatch, why):
    q, keys, softcap, window = _cuda_query(), torch.zeros(2, 10, 64, dtype=torch.bfloat16), None, None
    if why == "cpu":
        q = torch.zeros(3, 8, 64, dtype=torch.bfloat16)
    elif why == "fp32":
        q, keys = _cuda_query(torch.float32), keys.float()
    elif why == "odd-head-dim":
        q, keys = _cuda_query(head_dim=12), torch.zeros(2, 10, 12, dtype=torch.bfloat16)
    elif why == "head-dim-over-256":
        q, keys = _cuda_query(head_dim=264), torch.zeros(2, 10, 264, dtype=torch.bfloat16)
    elif why == "key-dtype":
        keys = keys.half()
    elif why == "strided-keys":
        keys = torch.zeros(2, 10, 128, dtype=torch.bfloat16)[..., ::2]
    elif why == "zero-softcap":
        softcap = 0.0
    elif why == "zero-window":
        window = 0
    elif why == "old-gpu":
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    elif why == "no-module":
        monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert not flash_supported(q, keys, softcap, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["chunk", "window-decode", "softcap"])
def test_attend_on_cpu_never_calls_flash(fake_flash, name, dtype):
    n, start, heads, kv_heads, window, softcap, scale = CASES[name]
    q, keys, values = _case(n, start, heads, kv_heads, dtype=dtype)
    attend(q, keys, values, start, scale=scale, window=window, softcap=softcap)
    assert fake_flash == []


def test_attend_hands_its_arguments_to_flash(fake_flash, monkeypatch):
    q, keys, values = _case(8, 24, 8, 2)
    expected = attend(q, keys, values, 24, scale=0.5, window=9, softcap=2.0)
    monkeypatch.setattr(attention, "flash_supported", lambda q, keys, softcap, window: True)
    got = attend(q, keys, values, 24, scale=0.5, window=9, softcap=2.0)
    assert len(fake_flash) == 1 and fake_flash[0]["window_size"] == (8, 0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_backend(fake_flash, sm90, monkeypatch):
    cuda = torch.device("cuda")
    assert attention_backend(torch.device("cpu"), torch.bfloat16) == "sdpa-cpu"
    assert attention_backend(cuda, torch.bfloat16) == "flash-attn"
    assert attention_backend("cuda:0", torch.float16, head_dim=128) == "flash-attn"
    assert attention_backend(cuda, torch.float32) == "sdpa"
    assert attention_backend(cuda, torch.bfloat16, head_dim=84) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    flash_module.cache_clear()
    assert attention_backend(cuda, torch.bfloat16) == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_attend_with_real_flash_attn_matches_sdpa_on_cuda(monkeypatch, case):
    if flash_module() is None:
        pytest.skip("flash-attn is not importable (or older than 2.6)")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("flash-attn needs compute capability 8.0+")
    n, start, heads, kv_heads, window, softcap, scale = case
    q, keys, values = (t.cuda() for t in _case(n, start, heads, kv_heads, d=64, dtype=torch.bfloat16))
    assert flash_supported(q, keys, softcap, window) and attention_backend(q.device, q.dtype) == "flash-attn"
    got = attend(q, keys, values, start, scale=scale, window=window, softcap=softcap)
    monkeypatch.setattr(attention, "flash_supported", lambda q, keys, softcap, window: False)
    expected = attend(q, keys, values, start, scale=scale, window=window, softcap=softcap)
    _assert_matches(got, expected)
