"""Attention sinks (gpt-oss) on every attention path against transformers' eager formula.

The reference is ``eager_attention_forward`` of transformers' gpt_oss model written out: the sink
column is concatenated to the scaled, capped and masked scores, the softmax runs in float32, the
column is dropped, and what is left multiplies V. tierflow's paths must equal it: SDPA-bound calls
(which with sinks take the key tiles), ``attend_blocks``, ``attend_kv`` over several blocks (some
outside the window), and flash-attn through the fake module of ``test_flash``.

Tolerances. float32: rtol 1e-5, and an atol of 1e-5 times the reference's largest magnitude, so
that a sink of +20 (which scales every output down by about e^-17) is still compared to five
digits rather than passing against zero. bfloat16: the inputs are bf16, both sides compute in
float32 from them, and tierflow rounds its float32 result to bf16 once (a relative error of at
most 2^-9); rtol 2^-8 covers that with room for float32 accumulation. The flash path rounds twice
(the kernel's output to bf16, then the corrected output), so it gets 2^-7.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tierflow.adapters.attention as attention
from tierflow.adapters.attention import attend, attend_blocks, attend_kv, split_blocks
from tierflow.adapters.flash import flash_attend
from tierflow.adapters.kv import KVBlock, KVBlocks
from tests.adapters.test_attention import _case
from tests.adapters.test_flash import _fresh_import, fake_flash  # noqa: F401 - fixtures

SINKS = ["+20", "-30", "random"]


def _sinks(kind: str, heads: int, dtype=torch.float32) -> torch.Tensor:
    if kind == "random":
        return (torch.randn(heads, generator=torch.Generator().manual_seed(7)) * 2.0).to(dtype)
    return torch.full((heads,), float(kind)).to(dtype)


def _reference(q, keys, values, start, sinks, *, scale=None, window=None, softcap=None):
    """transformers' gpt-oss eager attention: [n, H, D] queries over [KVH, T, D] keys; [n, H*D] float32."""
    n, heads, d = q.shape
    group = heads // keys.shape[0]
    k = keys.float().repeat_interleave(group, dim=0)
    v = values.float().repeat_interleave(group, dim=0)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(start, start + n)[:, None]
    k_pos = torch.arange(keys.shape[1])[None, :]
    keep = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
    scores = scores.masked_fill(~keep, -math.inf)
    combined = torch.cat([scores, sinks.float().view(heads, 1, 1).expand(heads, n, 1)], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    probs = F.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1]
    return (probs @ v).transpose(0, 1).reshape(n, heads * d)


def _assert_close(got, expected, *, rtol_bf16=2.0 ** -8):
    if got.dtype == torch.float32:
        rtol = 1e-5
    else:
        assert got.dtype == torch.bfloat16
        rtol = rtol_bf16
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol)


CASES = {                       # n, start, heads, kv_heads, window, softcap, scale
    "decode-first": (1, 0, 4, 4, None, None, None),
    "decode": (1, 99, 8, 2, None, None, None),
    "decode-over-tiles": (1, 1300, 8, 2, None, None, None),      # 1301 keys: three key tiles
    "prefill": (17, 0, 8, 2, None, None, None),
    "chunk": (16, 40, 8, 2, None, None, None),
    "window-prefill": (20, 0, 8, 2, 6, None, None),
    "window-chunk": (12, 50, 8, 2, 5, None, None),
    "window-decode": (1, 60, 8, 2, 8, None, None),
    "softcap-window-chunk": (8, 24, 8, 2, 9, 2.0, 0.5),
}

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_attend_matches_eager(case, kind, dtype):
    n, start, heads, kv_heads, window, softcap, scale = case
    q, keys, values = _case(n, start, heads, kv_heads, dtype=dtype)
    sinks = _sinks(kind, heads)
    expected = _reference(q, keys, values, start, sinks, scale=scale, window=window, softcap=softcap)
    got = attend(q, keys, values, start, scale=scale, window=window, softcap=softcap, sinks=sinks)
    assert got.dtype == dtype and torch.isfinite(got).all()
    _assert_close(got, expected)


def test_the_sink_changes_the_result():
    """A positive control for the comparisons above: the reference without a sink is far off."""
    q, keys, values = _case(16, 40, 8, 2)
    for kind in ("+20", "random"):
        sinks = _sinks(kind, 8)
        with_sink = attend(q, keys, values, 40, sinks=sinks)
        without = _reference(q, keys, values, 40, torch.full((8,), -math.inf))
        assert not torch.allclose(with_sink, without, rtol=1e-2, atol=1e-5 * with_sink.abs().max().item())


@DTYPES
@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("block", [1, 7, 64])
@pytest.mark.parametrize("n,start,window", [(1, 99, None), (16, 40, None), (12, 50, 5), (1, 60, 8)])
def test_attend_blocks_matches_eager(n, start, window, block, kind, dtype):
    q, keys, values = _case(n, start, 8, 2, dtype=dtype)
    sinks = _sinks(kind, 8, dtype)
    blocks = split_blocks(keys, values, block)
    _assert_close(attend_blocks(q, blocks, start, window=window, sinks=sinks),
                  _reference(q, keys, values, start, sinks, window=window))


@DTYPES
@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("n,start", [(1, 200), (6, 194), (16, 100)])
def test_attend_kv_skips_blocks_outside_the_window(n, start, kind, dtype):
    """A paged layout: blocks of 8 from position 0, the window of 16 leaving the early ones unseen."""
    window, block = 16, 8
    q, keys, values = _case(n, start, 8, 2, dtype=dtype)
    held = [KVBlock(k, v, first) for k, v, first in split_blocks(keys, values, block)]
    fetched = []
    blocks = KVBlocks(tuple((b.first, b.keys.shape[1]) for b in held), lambda i: fetched.append(i) or held[i])
    sinks = _sinks(kind, 8)
    got = attend_kv(q, blocks, start, window=window, sinks=sinks)
    _assert_close(got, _reference(q, keys, values, start, sinks, window=window))
    first_seen = (start - window + 1) // block
    assert 0 < first_seen and fetched == list(range(first_seen, len(held)))


@pytest.mark.parametrize("kind", SINKS)
def test_attend_kv_of_one_block_from_zero(kind):
    q, keys, values = _case(9, 30, 8, 2)
    sinks = _sinks(kind, 8)
    got = attend_kv(q, KVBlocks.of([KVBlock(keys, values, 0)]), 30, sinks=sinks)
    _assert_close(got, _reference(q, keys, values, 30, sinks))


@pytest.mark.parametrize("n,start", [(1, 99), (1, 0), (7, 0)])
def test_sinks_never_reach_sdpa(monkeypatch, n, start):
    """The calls SDPA would take (one query; a causal chunk from 0) go to the tiles with sinks."""
    q, keys, values = _case(n, start, 8, 2)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    attend(q, keys, values, start)
    assert calls == [1]
    sinks = _sinks("random", 8)
    _assert_close(attend(q, keys, values, start, sinks=sinks), _reference(q, keys, values, start, sinks))
    assert calls == [1]


@pytest.mark.parametrize("n,start,window", [(1, 99, None), (7, 0, None), (1, 60, 8), (16, 40, None), (12, 50, 5)])
def test_sinks_none_is_todays_result(n, start, window):
    """sinks=None: the fused SDPA call where it was taken (bit for bit), the tiles elsewhere."""
    q, keys, values = _case(n, start, 8, 2)
    got = attend(q, keys, values, start, window=window, sinks=None)
    first = 0 if window is None else max(0, start - window + 1)
    if n == 1 or start == 0:
        fused = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None, :, first:], values[None, :, first:],
                                               is_causal=n > 1, enable_gqa=True)
        assert torch.equal(got, fused[0].transpose(0, 1).reshape(n, -1))
    else:
        tiles = split_blocks(keys[:, first:], values[:, first:], 512, first=first)
        assert torch.equal(got, attend_blocks(q, tiles, start, window=window))
    torch.testing.assert_close(got, _reference(q, keys, values, start, torch.full((8,), -math.inf), window=window),
                               rtol=1e-5, atol=1e-5)


@DTYPES
@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_flash_path_matches_eager(fake_flash, case, kind, dtype):
    n, start, heads, kv_heads, window, softcap, scale = case
    q, keys, values = _case(n, start, heads, kv_heads, dtype=dtype)
    sinks = _sinks(kind, heads, dtype)
    got = flash_attend(q, keys, values, start, scale=scale, window=window, softcap=softcap, sinks=sinks)
    assert len(fake_flash) == 1 and fake_flash[0]["return_attn_probs"] is True
    assert got.dtype == dtype and torch.isfinite(got).all()
    _assert_close(got, _reference(q, keys, values, start, sinks, scale=scale, window=window, softcap=softcap),
                  rtol_bf16=2.0 ** -7)


def test_attend_keeps_flash_with_sinks(fake_flash, monkeypatch):
    q, keys, values = _case(8, 24, 8, 2, dtype=torch.bfloat16)
    sinks = _sinks("random", 8)
    monkeypatch.setattr(attention, "flash_supported", lambda q, keys, softcap, window: True)
    got = attend(q, keys, values, 24, window=9, sinks=sinks)
    attend(q, keys, values, 24, window=9)
    with_sinks, without = fake_flash
    assert with_sinks["return_attn_probs"] is True and with_sinks["window_size"] == (8, 0)
    assert without["return_attn_probs"] is False
    _assert_close(got, _reference(q, keys, values, 24, sinks, window=9), rtol_bf16=2.0 ** -7)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(8, 1), torch.zeros(8, dtype=torch.int64)],
                         ids=["heads", "shape", "dtype"])
def test_malformed_sinks_are_an_error(fake_flash, bad):
    q, keys, values = _case(3, 10, 8, 2)
    for call in (lambda: attend(q, keys, values, 10, sinks=bad), lambda: flash_attend(q, keys, values, 10, sinks=bad)):
        with pytest.raises(ValueError, match=r"sinks must be a float tensor of shape \[8\]"):
            call()


@pytest.mark.parametrize("layer,start", [(0, 0), (0, 7), (1, 0), (1, 11)])
def test_gpt_oss_attention_layer(layer, start):
    """transformers' GptOssAttention (eager) against its own projections and rope through ``attend``:
    layer 0 slides a window of 4, layer 1 sees every key; ``start`` > 0 takes a chunk's queries."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss

    config = GptOssConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                          num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                          intermediate_size=32, num_local_experts=2, num_experts_per_tok=1, vocab_size=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = gpt_oss.GptOssAttention(config, layer).eval()
    with torch.no_grad():
        module.sinks.normal_(0.0, 2.0)
    tokens, window = 19, module.sliding_window
    hidden = torch.randn(1, tokens, 64)
    cos, sin = gpt_oss.GptOssRotaryEmbedding(config)(hidden, torch.arange(tokens)[None])
    q_pos, k_pos = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    keep = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window is not None else True)
    mask = torch.zeros(1, 1, tokens, tokens).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected, _ = module(hidden, (cos, sin), mask)
        shape = (1, tokens, -1, 16)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        q, k = gpt_oss.apply_rotary_pos_emb(q, k, cos, sin)
        out = attend(q[0, :, start:].transpose(0, 1), k[0], v[0], start, scale=module.scaling, window=window,
                     sinks=module.sinks)
        got = module.o_proj(out)
    assert window == (4 if layer == 0 else None)
    torch.testing.assert_close(got, expected[0, start:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["tiles", "flash"])
def test_large_scores_and_sinks_stay_finite(fake_flash, path):
    """Scores in the hundreds and sinks on either side of them: no exponent overflows."""
    q, keys, values = _case(4, 60, 8, 2)
    q = q * 200.0
    sinks = torch.tensor([300.0, -300.0, 150.0, -150.0, 0.0, 80.0, -80.0, 400.0])
    if path == "tiles":
        got = attend_blocks(q, split_blocks(keys, values, 8), 60, sinks=sinks)
    else:
        got = flash_attend(q, keys, values, 60, sinks=sinks)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(q, keys, values, 60, sinks), rtol=1e-4, atol=1e-4)
