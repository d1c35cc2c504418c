"""MXFP4, the 4-bit format gpt-oss stores its experts in: unpacking on the compute device, and
packing (for building checkpoints).

A weight matrix [rows, columns] in MXFP4 is two uint8 tensors: ``blocks`` [rows, columns / 32,
16] — 32 FP4 (E2M1) values per block, two to a byte, the even column in the low nibble — and
``scales`` [rows, columns / 32], one power-of-two exponent per block stored with a bias of 127.
An element is ``FP4_VALUES[code] * 2 ** (scale - 127)``: 4.25 bits a value against bf16's 16.

``dequantize`` is what the gpt-oss experts run right before their matmuls, on whatever device
the packed bytes are: one table lookup per byte (its two values) and a product by the block's
power of two, vectorised over the whole tensor (no loop over blocks). The weights equal
transformers' own unpacking (``Mxfp4Config(dequantize=True)``: a lookup in the target dtype,
then ``ldexp``) bit for bit: an FP4 value times a power of two is exact in bf16 and fp32, and
where it is not (underflow) a product rounds once, as ldexp does.

``quantize`` packs a float tensor the way a checkpoint would hold it: per block the smallest
exponent that puts the block's largest magnitude within FP4's ±6, then each value rounded to
the nearest FP4 value (ties to the lower magnitude). Tests and benchmarks use it to build MXFP4
checkpoints from random weights; ``dequantize(*quantize(w))`` is the weight both transformers
and tierflow then compute with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 32                  # values per scale
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pairs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: a byte's two FP4 values, low nibble first."""
    key = (device, dtype)
    if key not in _LUTS:
        lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
        _LUTS[key] = torch.stack((lut.repeat(16), lut.repeat_interleave(16)), dim=-1)
    return _LUTS[key]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``blocks`` [..., G, 16] and ``scales`` [..., G] (uint8) → the weights [..., G * 32] in ``dtype``."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)}: expected "
                         f"blocks [..., G, {BLOCK // 2}] and scales [..., G]")
    # one lookup of each byte's pair of values (an embedding gather: the fastest gather on the CPU)
    values = F.embedding(blocks.reshape(-1).long(), _pairs(blocks.device, dtype)).view(*scales.shape, BLOCK)
    # times 2**(scale - 127) in two exact power-of-two steps, each within the dtype's range (2**128
    # alone would overflow): a product by a power of two rounds once, as ldexp does
    exponent = scales.to(torch.int32) - SCALE_BIAS
    half = exponent.div(2, rounding_mode="floor")
    values.mul_(torch.exp2(half.to(dtype)).unsqueeze(-1)).mul_(torch.exp2((exponent - half).to(dtype)).unsqueeze(-1))
    return values.view(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def quantize(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float tensor [..., K] (K a multiple of 32) → (blocks [..., K/32, 16], scales [..., K/32]), uint8."""
    if weights.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 packs rows of a multiple of {BLOCK} values, got {weights.shape[-1]}")
    w = weights.float().reshape(*weights.shape[:-1], weights.shape[-1] // BLOCK, BLOCK)
    largest = w.abs().amax(dim=-1, keepdim=True)
    # the smallest e with largest / 2**e <= 6 (FP4's largest magnitude); all-zero blocks take the lowest
    exponent = torch.where(largest > 0, torch.ceil(torch.log2(largest / 6.0)), torch.full_like(largest, -SCALE_BIAS))
    exponent = exponent.clamp(-SCALE_BIAS, 255 - SCALE_BIAS)
    scaled = w / torch.exp2(exponent)
    magnitudes = torch.tensor(FP4_VALUES[:8])
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)          # nearest, ties to the lower
    codes = codes + 8 * (scaled < 0)
    codes = codes.to(torch.uint8).view(*codes.shape[:-1], BLOCK // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exponent.squeeze(-1) + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def packed_bytes(rows: int, columns: int) -> int:
    """Bytes of an MXFP4 [rows, columns] matrix: its blocks and its scales."""
    return rows * columns // 2 + rows * columns // BLOCK
