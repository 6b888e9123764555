"""Compact number codes for optimizer state: 8-bit block minifloats, bf16 rounding, noise.

The 8-bit state (docs/lowmem.md, "8-bit codes") keeps blocks of :data:`MX_BLOCK` elements,
each with one byte ``s``, the block's power-of-two scale ``2**(s - 128)``, and per element
an 8-bit minifloat of the element over that scale: signed buffers sign + e4m3 (code -128
means NaN), the never-negative second moment e5m3 (code 255 means +inf). Encoding and
decoding are float bit manipulations and exact multiplications by powers of two, so every
path (eager, compiled, the Triton kernel) computes the same bits. The power codes of before
(:func:`dequantize_blockwise`) are kept only to decode old checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BLOCK",
    "META",
    "MX_BLOCK",
    "dequantize_blockwise",
    "mx_blocks",
    "mx_decode",
    "mx_decode_rows",
    "mx_encode",
    "mx_encode_rows",
    "mx_noise",
    "mx_rows",
    "num_blocks",
    "round_to_bf16",
]

MX_BLOCK = 32
"""Elements per block of the 8-bit minifloats (one scale byte each: 1/32 B per element)."""


class MxCode:
    """The constants of one 8-bit minifloat (``exponent_bits``, ``mantissa_bits``, with
    subnormals) over a block scale whose top binade is [2, 4); ``top`` the largest finite
    code, the next reserved for a non-finite value."""

    def __init__(self, exponent_bits: int, mantissa_bits: int, top: int) -> None:
        self.top = top
        self.mantissa = 1 << mantissa_bits
        """Codes per binade; the codes below it are the subnormals k/mantissa * normal."""
        self.shift = 23 - mantissa_bits
        """float32 bits dropped by a code."""
        self.nearest = 1 << (self.shift - 1)
        """The addend that rounds to nearest: half of the last kept bit."""
        self.noise_shift = self.shift - 10
        self.noise_half = 1 << (self.shift - 11)
        """10 random bits go at the top of the dropped bits, plus half of their last."""
        lowest = 130 - 2**exponent_bits  # float32's biased exponent of the lowest normal binade
        self.normal = 2.0 ** (lowest - 127)
        """The smallest normal value."""
        self.offset = (lowest - 1) << mantissa_bits
        """Code = (float32 bits >> shift) - offset in the normal range."""
        self.sub_offset = lowest << mantissa_bits
        """The same for ``t + normal`` in the subnormal range."""
        self.largest = 2 + 2 * (top % self.mantissa) / self.mantissa
        """The largest finite value over the scale (the top code, in the top binade [2, 4))."""
        top_mantissa = (top & (self.mantissa - 1)) + 1
        self.bump = 0x800000 - (top_mantissa << self.shift) + (1 << self.shift) - 1
        """Added to the block maximum's bits before taking its exponent: a mantissa above the
        top code's moves the block to the next binade, so that nothing saturates."""

    def noise(self, random10: Tensor) -> Tensor:
        """The rounding addend of 10 random bits: at the top of the dropped bits, plus half of
        their last, so that rounding up has the probability of the dropped fraction."""
        return (random10 << self.noise_shift) | self.noise_half


SIGNED_CODE = MxCode(4, 3, 127)
"""Signed buffers (m, v, prev): sign + e4m3 magnitude, 2**-16 .. 3.75 times the scale; their
subnormal codes (below 2**-13, reached next to outliers) round towards zero."""
UNSIGNED_CODE = MxCode(5, 3, 254)
"""The second moment n: e5m3, 2**-32 .. 3.5 times the scale; a nonzero n keeps code >= 1."""


def mx_code(signed: bool) -> MxCode:
    """The minifloat of a signed or an unsigned buffer."""
    return SIGNED_CODE if signed else UNSIGNED_CODE


def mx_blocks(numel: int) -> int:
    """Scale bytes kept for ``numel`` elements: one per started block, plus one when none is
    partial (``numel // MX_BLOCK + 1``, so that compiled code has no shape branch)."""
    return numel // MX_BLOCK + 1


def mx_rows(flat: Tensor) -> Tensor:
    """``flat`` zero-padded to ``mx_blocks`` full blocks plus one, as ``(rows, MX_BLOCK)``:
    the extra row keeps the row count above 1 for every size (one compiled graph)."""
    rows = mx_blocks(flat.numel()) + 1
    return F.pad(flat, (0, rows * MX_BLOCK - flat.numel())).view(rows, MX_BLOCK)


def mx_noise(word: Tensor, index: int) -> Tensor | None:
    """Buffer ``index``'s (m, v, n, prev) rounding addend from an element's 32-bit noise
    ``word``: its bits ``10 * index`` to ``10 * index + 9`` for m, v and n; None (to nearest)
    for the previous gradient, which every step replaces."""
    if index == 3:
        return None
    return mx_code(index != 2).noise((word >> (10 * index)) & 0x3FF).to(torch.int32)


def mx_encode(x: Tensor, signed: bool, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Encode float32 ``x`` as ``(codes, scales)``: a code per element (flat int8 or uint8)
    and a uint8 ``s`` per block (:func:`mx_encode_rows` on :func:`mx_rows`)."""
    numel = x.numel()
    add = None if noise is None else mx_rows(noise.reshape(-1))
    codes, s = mx_encode_rows(mx_rows(x.reshape(-1).float()), signed, add)
    return codes.reshape(-1)[:numel], s[: mx_blocks(numel)]


def mx_encode_rows(rows: Tensor, signed: bool, noise: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The codes (int8 or uint8, shaped as ``rows``) of float32 ``rows`` (one block each) and
    their uint8 scale bytes; ``noise`` (int32 addends from :func:`mx_noise`, shaped as
    ``rows``) rounds stochastically, else to nearest (signed subnormal codes towards zero).
    The scale comes from the block's largest finite magnitude; a non-finite element takes
    the reserved code and changes nothing else."""
    code = mx_code(signed)
    finite = torch.isfinite(rows)
    mag = torch.where(finite, rows.abs(), 0.0)
    top = mag.amax(dim=1, keepdim=True)
    s = ((top.view(torch.int32) + code.bump) >> 23).clamp(2, 254)
    t = mag * ((255 - s) << 23).view(torch.float32)  # mag * 2**(128 - s), exact
    sub = t < code.normal
    y = torch.where(sub, t + code.normal, t)
    add = code.nearest if noise is None else noise
    if signed:  # towards zero: a rare round-up there would be many times the value
        add = torch.where(sub, 0, add)
    k = ((y.view(torch.int32) + add) >> code.shift) - torch.where(sub, code.sub_offset,
                                                                  code.offset)
    k = k.clamp(max=code.top)
    if signed:
        codes = torch.where(finite, torch.where(rows < 0, -k, k), -128).to(torch.int8)
    else:
        codes = torch.where(finite, torch.maximum(k, (rows > 0).to(k.dtype)), 255)
        codes = codes.to(torch.uint8)
    return codes, s.reshape(-1).to(torch.uint8)


def mx_decode(codes: Tensor, scales: Tensor, shape: torch.Size | tuple[int, ...], *,
              signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode ``(codes, scales)`` from :func:`mx_encode` into a ``dtype`` tensor of ``shape``."""
    values = mx_decode_rows(codes, scales, signed)
    return values.reshape(-1)[: codes.numel()].view(shape).to(dtype)


def mx_decode_rows(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """The float32 values of ``codes`` (any shape, flat order) as :func:`mx_rows` of them."""
    code = mx_code(signed)
    k = mx_rows(codes.reshape(-1).to(torch.int32))
    mag = k.abs() if signed else k
    normal = ((mag + code.offset) << code.shift).view(torch.float32)
    value = torch.where(mag < code.mantissa, mag.float() * (code.normal / code.mantissa), normal)
    if signed:
        value = torch.where(k == -128, torch.nan, torch.where(k < 0, -value, value))
    else:
        value = torch.where(k == code.top + 1, torch.inf, value)
    s = F.pad(scales.reshape(-1).to(torch.int32), (0, 1), value=2)  # mx_rows' extra row
    return value * ((s - 1) << 23).view(torch.float32)[:, None]  # * 2**(s - 128), exact


# The power codes of before (decoded only, from old checkpoints): blocks of BLOCK elements
# with a meta row (scale, top value, top position); code k means scale * (k/127)**3 (signed)
# or scale * (k/255)**4, but at the top position, which holds its value exactly.

BLOCK = 256
"""Elements per block of the old power codes."""

META = 3
"""Floats per block in an old meta tensor: scale, top value, top position."""


def num_blocks(numel: int) -> int:
    """Meta rows of an old power-code buffer of ``numel`` elements (``numel // BLOCK + 1``)."""
    return numel // BLOCK + 1


def _code_value(k: Tensor, signed: bool) -> Tensor:
    """The value of old code ``k`` relative to its block's scale."""
    if signed:
        u = k * (1 / 127)
        return u * u * u
    u = k * (1 / 255)
    return (u * u) * (u * u)


def dequantize_blockwise(
    codes: Tensor, meta: Tensor, shape: torch.Size | tuple[int, ...], *, signed: bool,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decode an old power-code buffer and its meta rows (as rows or flat) into a tensor of
    ``shape``."""
    rows = num_blocks(codes.numel()) + 1
    flat = codes.reshape(-1).to(dtype)
    values = _code_value(F.pad(flat, (0, rows * BLOCK - flat.numel())).view(rows, BLOCK), signed)
    meta = F.pad(meta.reshape(-1).to(dtype), (0, META)).view(-1, META)  # the extra row
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
