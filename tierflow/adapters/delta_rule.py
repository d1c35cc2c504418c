"""Gated DeltaNet linear attention, the pure math: the causal depthwise convolution over the
projected q/k/v, the gated delta rule in its chunked form (prefill) and its recurrent form
(one token), and the gated RMSNorm of the output, each one sequence at a time.

Each function mirrors transformers' torch path of ``modeling_qwen3_next`` operation for
operation (``torch_causal_conv1d_update`` / the prefill ``F.conv1d``,
``torch_chunk_gated_delta_rule``, ``torch_recurrent_gated_delta_rule``,
``Qwen3NextRMSNormGated``), so results agree to rounding; only the batch dimension is gone
(tierflow packs sequences along the token axis and runs these per sequence, like attention).

A sequence's state is ``LinearState``: the last ``kernel`` inputs of the convolution (in the
activation dtype, as transformers' cache keeps them) and the delta rule's matrix per value head
[value_heads, key_dim, value_dim] (float32: the rule runs in float32 and transformers' cache
holds what it returns). Both are of fixed size: a linear layer's memory does not grow with the
context. Which form runs follows transformers: the recurrent one for a single token after a
state exists, the chunked one (from that state, or from zeros) for anything else, so a prefill
split into several sweeps continues each chunk from the state the last one left.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from tierflow.adapters.base import LINEAR_CHUNK_TOKENS

CHUNK_TOKENS = LINEAR_CHUNK_TOKENS     # transformers' chunk size for the chunked form (64)


class LinearState(NamedTuple):
    conv: torch.Tensor          # [channels, kernel]: the convolution's last inputs, activation dtype
    recurrent: torch.Tensor     # [value_heads, key_dim, value_dim], float32


def causal_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The depthwise causal convolution with SiLU over ``x`` [channels, n] after ``state``
    (None: zeros before the first token); (output [channels, n], the new state [channels, kernel])."""
    channels, n = x.shape
    kernel = weight.shape[-1]
    if state is not None and n == 1:             # transformers' torch_causal_conv1d_update
        full = torch.cat([state, x], dim=-1).to(weight.dtype)
        out = F.conv1d(full[None], weight[:, None], None, padding=0, groups=channels)[0, :, -n:]
        return F.silu(out).to(x.dtype), full[:, -kernel:].clone()
    full = x if state is None else torch.cat([state, x], dim=-1)
    out = F.conv1d(full[None].to(weight.dtype), weight[:, None], None, padding=kernel - 1,
                   groups=channels)[0, :, :full.shape[-1]]
    out = F.silu(out).to(x.dtype)[:, -n:]
    if full.shape[-1] < kernel:
        full = F.pad(full, (kernel - full.shape[-1], 0))
    return out, full[:, -kernel:].clone()


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
    """[n, heads, d] inputs as float32 [value_heads, n, d] (keys and queries repeated per value
    head group), queries and keys L2-normalised."""
    groups = v.shape[1] // k.shape[1]
    if groups != 1:
        q, k = q.repeat_interleave(groups, dim=1), k.repeat_interleave(groups, dim=1)
    q, k, v, beta, g = (x.transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
                        for x in (q, k, v, beta, g))
    return l2norm(q), l2norm(k), v, beta, g


def chunk_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor | None, chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over ``n`` tokens in chunks: q, k [n, key_heads, key_dim], v [n,
    value_heads, value_dim], g (log decay) and beta [n, value_heads]; from ``state`` (None:
    zeros). (output [n, value_heads, value_dim] in q's dtype, the new float32 state)."""
    dtype, n = q.dtype, q.shape[0]
    q, k, v, beta, g = _heads_first(q, k, v, g, beta)
    q = q * q.shape[-1] ** -0.5
    pad = (chunk - n % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)) for x in (beta, g))
    heads, dk, dv = v.shape[0], k.shape[-1], v.shape[-1]
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(heads, -1, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    g = g.reshape(heads, -1, chunk).cumsum(dim=-1)
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * g.exp().unsqueeze(-1), upper=False,
                                               unitriangular=True)
    s = torch.zeros(heads, dk, dv, dtype=new_values.dtype, device=q.device) if state is None \
        else state.to(new_values)
    out = torch.zeros_like(new_values)
    q = q * g.exp().unsqueeze(-1)
    k = k * (g[..., -1:] - g).exp().unsqueeze(-1)
    chunk_decay = g[..., -1].exp()[..., None, None]
    for i in range(q.shape[1]):
        v_new = new_values[:, i] - k_cumdecay[:, i] @ s
        out[:, i] = q[:, i] @ s + intra[:, i] @ v_new
        s = s * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    out = out.reshape(heads, -1, dv)[:, :n]
    return out.transpose(0, 1).to(dtype, memory_format=torch.contiguous_format), s


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule token by token (the same arguments and results as ``chunk_delta_rule``)."""
    dtype = q.dtype
    q, k, v, beta, g = _heads_first(q, k, v, g, beta)
    q = q / (q.shape[-1] ** 0.5)
    s = torch.zeros(v.shape[0], k.shape[-1], v.shape[-1], dtype=v.dtype, device=v.device) if state is None \
        else state.to(v)
    out = torch.zeros_like(v)
    for i in range(v.shape[1]):
        s = s * g[:, i].exp()[..., None, None]
        memory = (s * k[:, i].unsqueeze(-1)).sum(dim=-2)
        delta = (v[:, i] - memory) * beta[:, i].unsqueeze(-1)
        s = s + k[:, i].unsqueeze(-1) * delta.unsqueeze(-2)
        out[:, i] = (s * q[:, i].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(0, 1).contiguous().to(dtype), s


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x`` [..., d] (weight times the normalised values cast back, as Llama's), times
    SiLU of ``gate`` in float32, cast to x's dtype."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    return (h * F.silu(gate.to(torch.float32))).to(dtype)
