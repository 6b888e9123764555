"""Compact number codes for optimizer state: 8-bit block codes, bf16 rounding, noise.

The 8-bit state (docs/lowmem.md, "8-bit codes") keeps blocks of :data:`MX_BLOCK` elements,
each with one byte ``s``, the block's power-of-two scale, and per element an 8-bit float of
the element over that scale: signed buffers OCP FP8 E4M3 (torch's ``float8_e4m3fn``: sign and
magnitude, code 0x7F means NaN), the never-negative second moment e5m3, the top byte of a
float16 (code 0xF8 means +inf). Both decode by a conversion a GPU does in hardware, and every
path (eager, compiled, C++, the Triton kernel) computes the same bits: encoding and decoding
are exact multiplications by powers of two, bit manipulation and one IEEE rounding. The codes
of before (version 2, :func:`mx2_decode`, and the power codes, :func:`dequantize_blockwise`)
are kept only to decode old checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "BLOCK",
    "META",
    "MX_BLOCK",
    "dequantize_blockwise",
    "e4m3_bits",
    "mx2_decode",
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
"""Elements per block of the 8-bit codes (one scale byte each: 1/32 B per element)."""


class MxCode:
    """One 8-bit code over its block's scale ``2**(s - bias)``: ``s`` the biased float32
    exponent of the block's largest finite magnitude plus ``bump`` (a mantissa above the top
    code's moves the block a binade up, so that nothing saturates), at least ``lowest`` (the
    scale and its inverse stay normal float32); ``reserved`` the code of a non-finite
    value."""

    def __init__(self, bias: int, lowest: int, bump: int, reserved: int, largest: float,
                 floor: float, nearest: int, noise_offset: int) -> None:
        self.bias, self.lowest, self.bump, self.reserved = bias, lowest, bump, reserved
        self.largest = largest
        """The largest finite code's value over the scale."""
        self.floor = floor
        """The largest coding error below the normal range, over the scale: where signed
        buffers rounded stochastically are zero (2**-6), n's subnormal step."""
        self.nearest = nearest
        """The addend to a value's bits that rounds it to nearest."""
        self.noise_offset = noise_offset

    def noise(self, random10: Tensor) -> Tensor:
        """The rounding addend of 10 random bits, added to the bits of a value whose code
        drops 20 of them: signed codes are then rounded to nearest (even) by the conversion,
        so the addend is centred, from -1/2 to 1/2 of a code gap in 1024 steps; n's code
        truncates, so it is 1/2048 to 2047/2048 of a gap. Either way a value rounds up with
        the probability of its fraction of the gap, to within 2**-11."""
        return (random10 << 10) + self.noise_offset


SIGNED_CODE = MxCode(bias=135, lowest=9, bump=0x1FFFFF, reserved=0x7F,
                     largest=448.0, floor=2.0**-6, nearest=0, noise_offset=0x200 - 0x80000)
"""m, v, prev: FP8 E4M3 over ``2**(s - 135)``: subnormals ``k * 2**-9``, then 8 codes per
binade up to 448 (the top binade [256, 512) holds the block's largest); 0x7F NaN."""
UNSIGNED_CODE = MxCode(bias=142, lowest=16, bump=0xFFFFF, reserved=0xF8,
                       largest=61440.0, floor=2.0**-17, nearest=0x80000, noise_offset=0x200)
"""n: e5m3, a float16's top byte, over ``2**(s - 142)``: subnormals ``k * 2**-17``, then 8
codes per binade up to 61440 (top binade [2**15, 2**16)); 0xF8 (float16 +inf) +inf."""


def mx_code(signed: bool) -> MxCode:
    """The code of a signed or an unsigned buffer."""
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


def pow2(exponent: Tensor) -> Tensor:
    """``2**exponent`` (int32, within float32's normal range) as float32, from its bits."""
    return ((exponent + 127) << 23).view(torch.float32)


def mx_noise(word: Tensor, index: int) -> Tensor | None:
    """Buffer ``index``'s (m, v, n, prev) rounding addend from an element's 32-bit noise
    ``word``: its bits ``10 * index`` to ``10 * index + 9`` for m, v and n; None (to nearest)
    for the previous gradient, which every step replaces."""
    if index == 3:
        return None
    return mx_code(index != 2).noise((word >> (10 * index)) & 0x3FF).to(torch.int32)


def e4m3_bits(y: Tensor) -> Tensor:
    """The E4M3 bytes (int32, 0..255) of finite float32 ``y``, rounded to nearest even and
    saturated at 448: what ``y.to(torch.float8_e4m3fn)`` and a GPU's
    ``cvt.rn.satfinite.e4m3x2.f32`` give, by integer operations (which every device has, and
    which the C++ kernel and Triton's interpreter repeat): in E4M3's normal range from the
    float's bits, below it by adding 2**23 to ``|y| * 2**9`` (a float addition that rounds at
    E4M3's last subnormal bit)."""
    bits = y.view(torch.int32)
    a = bits & 0x7FFFFFFF
    normal = (a + (0x7FFFF - (120 << 23)) + ((a >> 20) & 1)) >> 20
    sub = (a.view(torch.float32) * 512.0 + 2.0**23).view(torch.int32) - 0x4B000000
    mag = torch.where(a >= 0x3C800000, normal, sub).clamp(max=0x7E)
    return mag | ((bits >> 24) & 0x80)


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
    ``rows``) rounds stochastically, else to nearest. The scale comes from the block's
    largest finite magnitude; a non-finite element takes the reserved code and changes
    nothing else.

    Signed: ``y = x * 2**(135 - s)``, the noise added to its bits, converted to E4M3 rounding
    to nearest even; below E4M3's normal range (``|y| < 2**-6``, values under 2**-14.8 of the
    block's largest, which only an outlier's neighbours reach) m and v are zero of their sign
    (docs/lowmem.md, "Outliers"); without noise the conversion rounds there too. n: the
    noise added to the bits of
    ``y = |x| * 2**(30 - s)`` (two exact multiplications), whose bits shifted right by 20
    are the code, subnormal codes included; a nonzero n keeps code 1 or more."""
    code = mx_code(signed)
    finite = torch.isfinite(rows)
    mag = torch.where(finite, rows.abs(), 0.0)
    top = mag.amax(dim=1, keepdim=True)
    s = ((top.view(torch.int32) + code.bump) >> 23).clamp(min=code.lowest)
    if signed:
        y = rows * pow2(code.bias - s)
        if noise is not None:  # (a NaN's bits take no noise: no integer overflow)
            bits = (y.view(torch.int32) + noise).view(torch.float32)
            y = torch.where(y.abs() >= 2.0**-6, bits, y * 0.0)
        codes = torch.where(finite, e4m3_bits(y), code.reserved).to(torch.int8)
    else:
        t = mag * pow2(code.bias - 6 - s)  # exact; then into float32's subnormal range
        y = (t * 2.0**-106).view(torch.int32)
        k = (y + (code.nearest if noise is None else noise)) >> 20
        codes = torch.where(finite, torch.maximum(k, (rows > 0).to(k.dtype)), code.reserved)
        codes = codes.to(torch.uint8)
    return codes, s.reshape(-1).to(torch.uint8)


def mx_decode(codes: Tensor, scales: Tensor, shape: torch.Size | tuple[int, ...], *,
              signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode ``(codes, scales)`` from :func:`mx_encode` into a ``dtype`` tensor of ``shape``."""
    values = mx_decode_rows(codes, scales, signed)
    return values.reshape(-1)[: codes.numel()].view(shape).to(dtype)


def mx_decode_rows(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """The float32 values of ``codes`` (any shape, flat order) as :func:`mx_rows` of them:
    E4M3 (signed) or float16 (n, the code shifted into its top byte) to float32, exactly,
    times the block's scale, exactly."""
    code = mx_code(signed)
    k = mx_rows(codes.reshape(-1))
    if signed:  # the byte moved to the top and back down 4, its sign kept: bit 20 up
        value = (((k.to(torch.int32) << 24) >> 4) & 0x87FFFFFF).view(torch.float32) * 2.0**120
        value = torch.where(value.abs() > code.largest, torch.nan, value)  # 0x7F, 0xFF: 480
    else:
        value = (k.to(torch.int16) << 7).view(torch.float16).float()
    s = F.pad(scales.reshape(-1).to(torch.int32), (0, 1), value=code.lowest)  # the extra row
    return value * pow2(s - code.bias)[:, None]


# The 8-bit codes of version 2 (decoded only, from checkpoints): two's complement sign +
# e4m3 (-128 NaN) and e5m3 (255 +inf) over 2**(s - 128), top binade [2, 4), the code's bits
# at a float32's bit 20 times 2**offset (subnormals as float32 subnormals).
_MX2 = {True: (113, -128, math.nan), False: (97, 255, math.inf)}


def mx2_decode(codes: Tensor, scales: Tensor, shape: torch.Size | tuple[int, ...], *,
               signed: bool, dtype: torch.dtype = torch.float32) -> Tensor:
    """Decode a version-2 buffer (codes and scale bytes) into a ``dtype`` tensor of
    ``shape``."""
    offset, reserved, special = _MX2[signed]
    k = mx_rows(codes.reshape(-1).to(torch.int32))
    bits = ((k.abs() << 20) | (k & -0x80000000)) if signed else k << 20
    value = bits.view(torch.float32) * 2.0**offset
    value = torch.where(k == reserved, special, value)
    s = F.pad(scales.reshape(-1).to(torch.int32), (0, 1), value=2)
    value = value * pow2(s - 128)[:, None]
    return value.reshape(-1)[: codes.numel()].view(shape).to(dtype)


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
