"""Compact number codes for optimizer state: blockwise 8-bit power codes and bf16 rounding.

Blocks of :data:`BLOCK` elements keep a meta row (scale, top value, top position); every other
element a code ``k`` with ``value = scale * c(k)``: ``(k/127)**3`` signed, ``(k/255)**4``
unsigned. Rounding is to nearest or, given noise, stochastic (docs/lowmem.md, "8-bit codes").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BLOCK",
    "META",
    "dequantize_blockwise",
    "num_blocks",
    "quantize_blockwise",
    "round_to_bf16",
]

BLOCK = 256
"""Elements per block."""

META = 3
"""Floats per block in the meta tensor: scale, top value, top position (0.047 B per element)."""

_SIGNED = (127, 3)
_UNSIGNED = (255, 4)


def code_levels(signed: bool) -> tuple[int, int]:
    """``(levels, power)`` of the signed or unsigned code."""
    return _SIGNED if signed else _UNSIGNED


def num_blocks(numel: int) -> int:
    """Meta rows kept for ``numel`` elements: one per started block, plus one when none is
    partial. Always ``numel // BLOCK + 1``, so that compiled code has no shape branch."""
    return numel // BLOCK + 1


def _blocks(flat: Tensor) -> Tensor:
    """``flat`` zero-padded to ``num_blocks`` full blocks plus one, as a ``(blocks + 1, BLOCK)``
    view: the extra row (dropped by the callers) keeps the row count above 1 for every size,
    so that a compiled kernel needs one graph for small and large tensors."""
    rows = num_blocks(flat.numel()) + 1
    return F.pad(flat, (0, rows * BLOCK - flat.numel())).view(rows, BLOCK)


def _power(u: Tensor, power: int) -> Tensor:
    return u * u * u if power == 3 else (u * u) * (u * u)


def quantize_blockwise(
    x: Tensor, *, signed: bool, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Encode ``x`` as ``(codes, meta)``: a code per element (flat) and the blocks' meta rows,
    flat float32; ``noise`` (uniform in ``[0, 1)``) rounds stochastically, else to nearest.
    Row reductions and elementwise ops only, so ``torch.compile`` fuses it for every size."""
    levels, power = code_levels(signed)
    numel = x.numel()
    blocks = _blocks(x.reshape(-1))
    mag = blocks.abs()
    mag = torch.where(torch.isnan(mag), torch.inf, mag)  # a NaN ranks with the largest
    column = torch.arange(BLOCK, device=x.device)
    top_mag = mag.amax(dim=1, keepdim=True)
    top_pos = torch.where(mag == top_mag, column, BLOCK).amin(dim=1, keepdim=True)
    is_top = column == top_pos
    top = torch.where(is_top, blocks, 0.0).sum(dim=1, keepdim=True)
    rest = torch.where(is_top | torch.isinf(mag), 0.0, mag)
    # Rounded to float32 first, so that decoding scales by exactly what encoding divided by.
    scale = rest.amax(dim=1, keepdim=True).float().to(rest.dtype)
    t = (rest * (1 / torch.where(scale > 0, scale, 1.0))).clamp(max=1.0)
    lower = code_below(t, signed)
    lo, hi = code_value(lower, signed), code_value(lower + 1, signed)
    # Up with probability (t - lo) / (hi - lo), or to the nearer code without noise.
    threshold = _blocks(noise.reshape(-1).to(t.dtype)) if noise is not None else 0.5
    k = lower + (t - lo > threshold * (hi - lo)).to(lower.dtype)
    rows = num_blocks(numel)
    meta = torch.cat([scale, top, top_pos.to(scale.dtype)], dim=1).reshape(-1)[: rows * META]
    meta = meta.float()
    if signed:
        return torch.where(blocks < 0, -k, k).reshape(-1)[:numel].to(torch.int8), meta
    return k.reshape(-1)[:numel].to(torch.uint8), meta


def code_value(k: Tensor, signed: bool) -> Tensor:
    """The value of code ``k`` (as a float tensor) relative to its block's scale:
    ``(k/127)**3`` or ``(k/255)**4``. Multiplications only (no division, no power function),
    so that every path, compiled or not and the Triton kernel too, computes the same bits."""
    levels, power = code_levels(signed)
    return _power(k * (1 / levels), power)


def code_below(t: Tensor, signed: bool) -> Tensor:
    """The largest code ``k < levels`` whose value is at most ``t`` (in ``[0, 1]``).

    A root (a cube root from exp2/log2, or two square roots) estimates it to within one code
    whatever its rounding, and one comparison with the neighbouring code values corrects
    that estimate exactly, so the result does not depend on how a path computes the root.
    """
    levels, power = code_levels(signed)
    if power == 3:
        root = torch.exp2(torch.log2(t.clamp(min=1e-30)) * (1 / 3))
    else:
        root = t.sqrt().sqrt()
    k = torch.floor(root * levels).clamp(0, levels - 1)
    k = k - (t < code_value(k, signed)).to(k.dtype)
    k = k + (t >= code_value(k + 1, signed)).to(k.dtype)
    return k.clamp(0, levels - 1)


def dequantize_blockwise(
    codes: Tensor, meta: Tensor, shape: torch.Size | tuple[int, ...], *, signed: bool,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decode ``(codes, meta)`` from :func:`quantize_blockwise` into a tensor of ``shape``
    (``meta`` as rows or flat)."""
    values = code_value(_blocks(codes.reshape(-1).to(dtype)), signed)
    meta = F.pad(meta.reshape(-1).to(dtype), (0, META)).view(-1, META)  # _blocks' extra row
    column = torch.arange(BLOCK, device=codes.device)
    values = torch.where(column == meta[:, 2:3], meta[:, 1:2], values * meta[:, 0:1])
    return values.reshape(-1)[: codes.numel()].view(shape)


M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
"""2**32 over the golden ratio: the step between the keys of successive noise words."""
_MIX = 0x45D9F3B


def mix32(x: Any) -> Any:
    """A 32-bit integer hash (two multiply-xorshift rounds) of ``x`` in ``[0, 2**32)``, the
    source of stochastic rounding's noise: a Python int or an int64 tensor, with the same
    result (products stay below 2**63)."""
    x = (((x >> 16) ^ x) * _MIX) & M32
    x = (((x >> 16) ^ x) * _MIX) & M32
    return (x >> 16) ^ x


def round_to_bf16(x: Tensor, noise: Tensor | None = None) -> Tensor:
    """Round float32 ``x`` to bfloat16: nearest-even, or stochastically given ``noise``.

    ``noise`` is an int32 tensor uniform in ``[0, 65536)``. Adding it to the 16 bits that
    bfloat16 drops and truncating rounds the magnitude up with probability equal to the
    dropped fraction, so the result is unbiased and small EMA increments are not lost.
    """
    if noise is None:
        return x.to(torch.bfloat16)
    bits = x.float().view(torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)
