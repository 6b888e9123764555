"""Device twins of the number codes: ``@triton.jit`` functions that compute what
:mod:`adan.numeric.codes` and :mod:`adan.kernels.compact` compute (rounding noise, the 8-bit
block minifloats, bfloat16 rounding, the float64 ``expm1`` of the bias corrections) in the
same expressions."""

from __future__ import annotations

import triton
import triton.language as tl

from adan.numeric.codes import SIGNED_CODE, UNSIGNED_CODE

__all__ = ["cast", "expm1", "mix32", "mx_decode", "mx_encode", "mx_nearest", "mx_noise",
           "noise_word", "round_bf16"]


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


# The constants of adan.numeric.codes.MxCode for the signed and the unsigned minifloat, and
# the largest finite value of each over its scale (its top binade is [2, 4)): the reserved
# code, decoded as the others are, gives the next value up.
_S_NORMAL: tl.constexpr = tl.constexpr(SIGNED_CODE.normal)
_S_TOP: tl.constexpr = tl.constexpr(SIGNED_CODE.top)
_S_BUMP: tl.constexpr = tl.constexpr(SIGNED_CODE.bump)
_S_SHIFT: tl.constexpr = tl.constexpr(SIGNED_CODE.shift)
_S_LARGEST: tl.constexpr = tl.constexpr(SIGNED_CODE.largest)
_S_NEAREST: tl.constexpr = tl.constexpr(SIGNED_CODE.nearest)
_S_NOISE_SHIFT: tl.constexpr = tl.constexpr(SIGNED_CODE.noise_shift)
_S_NOISE_HALF: tl.constexpr = tl.constexpr(SIGNED_CODE.noise_half)
_U_NORMAL: tl.constexpr = tl.constexpr(UNSIGNED_CODE.normal)
_U_TOP: tl.constexpr = tl.constexpr(UNSIGNED_CODE.top)
_U_BUMP: tl.constexpr = tl.constexpr(UNSIGNED_CODE.bump)
_U_SHIFT: tl.constexpr = tl.constexpr(UNSIGNED_CODE.shift)
_U_LARGEST: tl.constexpr = tl.constexpr(UNSIGNED_CODE.largest)
_U_NEAREST: tl.constexpr = tl.constexpr(UNSIGNED_CODE.nearest)
_U_NOISE_SHIFT: tl.constexpr = tl.constexpr(UNSIGNED_CODE.noise_shift)
_U_NOISE_HALF: tl.constexpr = tl.constexpr(UNSIGNED_CODE.noise_half)


@triton.jit
def _mx_constants(SIGNED: tl.constexpr):
    """The attributes of :class:`adan.numeric.codes.MxCode` (normal, top, bump, shift, then
    the largest finite value, then nearest, noise_shift, noise_half) of a minifloat."""
    if SIGNED:
        return (_S_NORMAL, _S_TOP, _S_BUMP, _S_SHIFT, _S_LARGEST, _S_NEAREST, _S_NOISE_SHIFT,
                _S_NOISE_HALF)
    else:
        return (_U_NORMAL, _U_TOP, _U_BUMP, _U_SHIFT, _U_LARGEST, _U_NEAREST, _U_NOISE_SHIFT,
                _U_NOISE_HALF)


@triton.jit
def mx_noise(word, SIGNED: tl.constexpr):
    """The rounding addend of 10 random bits (the low ones of int32 ``word``), as
    :meth:`adan.numeric.codes.MxCode.noise`."""
    _, _, _, _, _, _, noise_shift, noise_half = _mx_constants(SIGNED)
    return ((word & 0x3FF) << noise_shift) + noise_half  # (+: one add with the code's bits)


@triton.jit
def mx_nearest(SIGNED: tl.constexpr):
    """The rounding addend that rounds to nearest."""
    _, _, _, _, _, nearest, _, _ = _mx_constants(SIGNED)
    return nearest


@triton.jit
def mx_encode(x, noise, SIGNED: tl.constexpr):
    """Codes (int32) of a ``(rows, 32)`` float32 tile and each row's scale byte ``s`` (int32),
    as :func:`adan.numeric.codes.mx_encode`: one max per row over a warp's 8 threads, then bit
    arithmetic; ``noise`` the int32 addends (a NaN never reaches min/max). Scaling ``t`` by
    ``2**(1 - lowest)`` makes the subnormal codes float32 subnormals, rounded as ``t + normal``
    is, so that one expression gives every code (docs/triton.md)."""
    normal, top, bump, shift, _, _, _, _ = _mx_constants(SIGNED)
    finite = tl.abs(x) < float("inf")
    mag = tl.where(finite, tl.abs(x), 0.0)
    s = (tl.max(mag, axis=1).to(tl.int32, bitcast=True) + bump) >> 23
    s = tl.minimum(tl.maximum(s, 2), 254)
    t = mag * ((255 - s) << 23).to(tl.float32, bitcast=True)[:, None]
    y = (t * (2.0**-126 / normal)).to(tl.int32, bitcast=True)
    rounded = y + noise
    if SIGNED:
        rounded = tl.where(y < 0x800000, y, rounded)
    k = tl.minimum(rounded >> shift, top)
    if SIGNED:
        k = tl.where(finite, tl.where(x < 0, -k, k), -128)
    else:
        k = tl.where(finite, tl.maximum(k, (x > 0).to(tl.int32)), 255)
    return k, s


@triton.jit
def mx_decode(k, s, SIGNED: tl.constexpr):
    """The float32 values of codes ``k`` (int32, ``(rows, 32)``) under their rows' scale
    bytes ``s`` (int32), as :func:`adan.numeric.codes.mx_decode` computes them: the code's
    magnitude shifted into a float32's bits (a subnormal one below ``normal``), times
    ``2**(lowest - 1)``, exact, in fewer instructions than a branch per range."""
    normal, _, _, shift, largest, _, _, _ = _mx_constants(SIGNED)
    if SIGNED:
        bits = (tl.abs(k) << shift) | (k & -2147483648)
    else:
        bits = k << shift
    value = bits.to(tl.float32, bitcast=True) * (normal * 2.0**126)
    if SIGNED:  # code -128
        value = tl.where(tl.abs(value) > largest, float("nan"), value)
    else:  # code 255
        value = tl.where(value > largest, float("inf"), value)
    return value * ((s - 1) << 23).to(tl.float32, bitcast=True)[:, None]


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
