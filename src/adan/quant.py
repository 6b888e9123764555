"""Compact number codes for optimizer state: blockwise 8-bit codes and bfloat16 rounding.

8-bit codes are *power codes*: a block of ``BLOCK`` values shares one float32 scale (its
absolute maximum) and each value keeps an integer ``k`` with ``value = scale * c(k)``:

* signed (for m, v and the previous gradient): ``c(k) = (k / 127) ** 3``, ``k`` in
  ``[-127, 127]`` (int8). Steps are fine near the block maximum (2.4 % of it at the top) and
  the code still resolves ``6e-8`` of the maximum, so small entries are not flushed to zero.
* unsigned (for n, which is never negative): ``c(k) = (k / 255) ** 4``, ``k`` in ``[0, 255]``
  (uint8); that is ``sqrt(n)`` on a square-law grid, the quantity the update divides by.

Rounding picks the lower or upper neighbour on the value grid: the nearer one, or, with
``noise`` (uniform in ``[0, 1)``), the upper one with probability proportional to the distance
from the lower, so the expected decoded value equals the input (stochastic rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "block_scales",
    "num_blocks",
    "per_element",
    "code_values",
    "dequantize_blockwise",
    "quantize_blockwise",
    "round_to_bf16",
]

BLOCK = 256
"""Elements per block; each block stores one float32 scale (4/256 = 0.016 B per element)."""

_SIGNED = (127, 3)
_UNSIGNED = (255, 4)


def _code(signed: bool) -> tuple[int, int]:
    """``(levels, power)`` of the signed or unsigned code."""
    return _SIGNED if signed else _UNSIGNED


def code_values(signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Every value the code can represent for a block scale of 1, ascending."""
    levels, power = _code(signed)
    k = torch.arange(-levels if signed else 0, levels + 1, dtype=torch.float64)
    return ((k / levels) ** power).to(dtype)


def per_element(scale: Tensor, numel: int) -> Tensor:
    """Each element's block scale, for a flattened tensor of ``numel`` elements."""
    return scale[:, None].expand(scale.numel(), BLOCK).reshape(-1)[:numel]


def num_blocks(numel: int) -> int:
    """Scales kept for ``numel`` elements: one per started block, plus one when none is partial.

    Always ``numel // BLOCK + 1``: a fixed formula lets compiled code avoid a shape branch.
    """
    return numel // BLOCK + 1


def block_scales(magnitude: Tensor) -> Tensor:
    """The maximum of each block of a flat non-negative tensor (0 for an empty last block)."""
    full = magnitude.numel() // BLOCK * BLOCK
    head = magnitude[:full].view(-1, BLOCK).amax(dim=1)
    tail = torch.cat([magnitude[full:], magnitude.new_zeros(1)]).amax(dim=0, keepdim=True)
    return torch.cat([head, tail])


def quantize_blockwise(
    x: Tensor, *, signed: bool, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Encode ``x`` as ``(codes, scales)``: one code per element, flat, and one scale per block.

    Blocks are runs of ``BLOCK`` consecutive elements of the flattened ``x`` (the last may be
    shorter). ``noise`` of ``x``'s size, uniform in ``[0, 1)``, selects stochastic rounding;
    without it values round to the nearest code.
    """
    levels, power = _code(signed)
    flat = x.reshape(-1)
    magnitude = flat.abs()
    scale = block_scales(magnitude)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    t = (magnitude / per_element(safe, flat.numel())).clamp(max=1.0)
    lower = torch.floor(t.pow(1.0 / power) * levels).clamp(0, levels - 1)
    lo = (lower / levels).pow(power)
    hi = ((lower + 1) / levels).pow(power)
    frac = ((t - lo) / (hi - lo)).clamp(0.0, 1.0)
    threshold = noise.reshape(-1) if noise is not None else 0.5
    k = lower + (frac > threshold).to(lower.dtype)
    if signed:
        return (k * torch.sign(flat)).to(torch.int8), scale.float()
    return k.to(torch.uint8), scale.float()


def dequantize_blockwise(
    codes: Tensor, scale: Tensor, shape: torch.Size | tuple[int, ...], *, signed: bool,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decode ``(codes, scales)`` from :func:`quantize_blockwise` into a tensor of ``shape``."""
    levels, power = _code(signed)
    unit = codes.reshape(-1).to(dtype) / levels
    values = unit * unit * unit if power == 3 else (unit * unit) * (unit * unit)
    return (values * per_element(scale.to(dtype), values.numel())).view(shape)


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
