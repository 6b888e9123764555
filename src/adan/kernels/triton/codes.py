"""Device twins of the number codes: ``@triton.jit`` functions that compute what
:mod:`adan.numeric.codes` and :mod:`adan.kernels.compact` compute (rounding noise, the 8-bit
block codes, bfloat16 rounding, the float64 ``expm1`` of the bias corrections) in the
same expressions."""

from __future__ import annotations

import triton
import triton.language as tl

from adan.numeric.codes import SIGNED_CODE, UNSIGNED_CODE

__all__ = ["cast", "expm1", "mix32", "mx_decode", "mx_encode", "mx_noise", "noise_word",
           "round_bf16"]


@triton.jit
def expm1(x):
    """``exp(x) - 1`` in float64 without cancellation for small ``|x|``: a 7-term series below
    ``2**-6``, ``exp(x) - 1`` above it (losing at most 6 of float64's 53 bits there, which the
    callers' rounding to float32 hides)."""
    s = x * (1.0 / 7)  # x * (1 + x/2 * (1 + x/3 * (... * (1 + x/7))))
    for k in tl.static_range(6, 1, -1):
        s = x * (1.0 / k) * (1.0 + s)
    series = x * (1.0 + s)
    return tl.where(tl.abs(x) < 2.0**-6, series, tl.exp(x) - 1.0)


@triton.jit
def mix32(x):
    """The 32-bit integer hash of :func:`adan.numeric.codes.mix32`, on uint32 (whose
    products wrap as that function's masks do)."""
    mul = tl.full((), 0x45D9F3B, tl.uint32)
    x = ((x >> 16) ^ x) * mul
    x = ((x >> 16) ^ x) * mul
    return (x >> 16) ^ x


@triton.jit
def noise_word(index, key, WORD: tl.constexpr):
    """Random word ``WORD`` per element (:func:`adan.kernels.compact.noise_word`)."""
    base = mix32(key + tl.full((), (WORD * 0x9E3779B9) % 2**32, tl.uint32))
    return mix32(index + base)


# The constants of adan.numeric.codes.MxCode for the signed and the unsigned code.
_S_BIAS: tl.constexpr = tl.constexpr(SIGNED_CODE.bias)
_S_LOWEST: tl.constexpr = tl.constexpr(SIGNED_CODE.lowest)
_S_BUMP: tl.constexpr = tl.constexpr(SIGNED_CODE.bump)
_S_RESERVED: tl.constexpr = tl.constexpr(SIGNED_CODE.reserved)
_S_LARGEST: tl.constexpr = tl.constexpr(SIGNED_CODE.largest)
_S_NOISE_OFFSET: tl.constexpr = tl.constexpr(SIGNED_CODE.noise_offset)
_U_BIAS: tl.constexpr = tl.constexpr(UNSIGNED_CODE.bias)
_U_LOWEST: tl.constexpr = tl.constexpr(UNSIGNED_CODE.lowest)
_U_BUMP: tl.constexpr = tl.constexpr(UNSIGNED_CODE.bump)
_U_RESERVED: tl.constexpr = tl.constexpr(UNSIGNED_CODE.reserved)
_U_NOISE_OFFSET: tl.constexpr = tl.constexpr(UNSIGNED_CODE.noise_offset)


@triton.jit
def _pow2(e):
    """``2**e`` (int32, within float32's normal range) as float32, from its bits (callers
    write ``-s + BIAS``: the interpreter's constexpr minus a tensor is not a tensor)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def mx_noise(word, SIGNED: tl.constexpr):
    """The rounding addend of 10 random bits (the low ones of int32 ``word``), as
    :meth:`adan.numeric.codes.MxCode.noise`."""
    if SIGNED:
        return ((word & 0x3FF) << 10) + _S_NOISE_OFFSET
    else:
        return ((word & 0x3FF) << 10) + _U_NOISE_OFFSET


@triton.jit
def _to_e4m3(y, COMPILED: tl.constexpr):
    """float32 ``y`` as E4M3 codes (int8), rounded to nearest even, saturated at 448 (as
    torch's conversion and the GPU's ``satfinite`` do): compiled, by the GPU's conversion (two
    values per instruction); in the interpreter, whose float8 conversion is its own, by bits
    as adan's C++ kernel does."""
    if COMPILED:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.int8, bitcast=True)
    else:
        bits = y.to(tl.int32, bitcast=True)
        a = bits & 0x7FFFFFFF
        normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
        sub = (a.to(tl.float32, bitcast=True) * 512.0 + 8388608.0).to(tl.int32, bitcast=True)
        k = tl.minimum(tl.where(a >= 0x3C800000, normal, sub - 0x4B000000), 0x7E)  # saturated
        k = tl.where(a > 0x7F800000, _S_RESERVED, k)
        return (k | ((bits >> 24) & 0x80)).to(tl.int8)


@triton.jit
def mx_encode(x, noise, SIGNED: tl.constexpr, NOISE: tl.constexpr, COMPILED: tl.constexpr):
    """Codes (int8 signed, int32 unsigned) of a ``(rows, 32)`` float32 tile and each row's
    scale byte ``s`` (int32), as :func:`adan.numeric.codes.mx_encode`: one max per row over a
    warp's 8 threads, then a multiplication and, signed, the conversion to E4M3 (two values
    per instruction on a GPU), n by bits; ``noise`` the int32 addends if ``NOISE`` (a NaN
    never reaches min/max)."""
    finite = tl.abs(x) < float("inf")
    mag = tl.where(finite, tl.abs(x), 0.0)
    top = tl.max(mag, axis=1).to(tl.int32, bitcast=True)
    if SIGNED:
        s = tl.maximum((top + _S_BUMP) >> 23, _S_LOWEST)
        y = x * _pow2(-s + _S_BIAS)[:, None]
        if NOISE:  # stochastically, but zero below E4M3's normal range
            noised = (y.to(tl.int32, bitcast=True) + noise).to(tl.float32, bitcast=True)
            y = tl.where(tl.abs(y) >= 2.0**-6, noised, y * 0.0)
        return _to_e4m3(tl.where(finite, y, float("nan")), COMPILED), s
    else:
        s = tl.maximum((top + _U_BUMP) >> 23, _U_LOWEST)
        t = mag * _pow2(-s + (_U_BIAS - 6))[:, None]
        y = (t * 2.0**-106).to(tl.int32, bitcast=True)
        k = (y + noise) >> 20
        return tl.where(finite, tl.maximum(k, (x > 0).to(tl.int32)), _U_RESERVED), s


@triton.jit
def mx_decode(k, s, SIGNED: tl.constexpr, COMPILED: tl.constexpr):
    """The float32 values of codes ``k`` (int8 signed, uint8 unsigned, ``(rows, 32)``) under
    their rows' scale bytes ``s`` (int32), as :func:`adan.numeric.codes.mx_decode` computes
    them: E4M3 by the GPU's conversion (by bits in the interpreter), n as a float16's top
    byte, then times the scale; every step exact."""
    if SIGNED:
        if COMPILED:
            value = k.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            # as adan.numeric.codes decodes: & 0x87FFFFFF, written as an int32
            bits = ((k.to(tl.int32) << 24) >> 4) & -0x78000001
            value = bits.to(tl.float32, bitcast=True) * 2.0**120
            value = tl.where(tl.abs(value) > _S_LARGEST, float("nan"), value)  # 0x7F: 480
        return value * _pow2(s - _S_BIAS)[:, None]
    else:
        value = (k.to(tl.int16) << 7).to(tl.float16, bitcast=True).to(tl.float32)
        return value * _pow2(s - _U_BIAS)[:, None]


@triton.jit
def round_bf16(x, noise16):
    """``x`` rounded to bfloat16 stochastically: add 16 random bits below bf16's, truncate."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + noise16) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def cast(x, DT: tl.constexpr):
    """``x`` in dtype ``DT``, rounded to nearest-even (bfloat16 by its bits: Triton's
    interpreter truncates that conversion)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 32767)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DT)
