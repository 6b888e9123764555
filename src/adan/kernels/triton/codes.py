"""Device twins of the number codes: ``@triton.jit`` functions that compute what
:mod:`adan.numeric.codes` and :mod:`adan.kernels.compact` compute (rounding noise, 8-bit code
values and their stochastic choice, bfloat16 rounding, the float64 ``expm1`` of the bias
corrections) in the same expressions, and the per-block reductions of an 8-bit tile."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["HALVES", "TRITON_BEFORE_3_8", "block_columns", "block_max", "block_min",
           "block_sum", "cast", "code_value", "cube_root", "expm1", "mix32", "noise_word",
           "per_element", "pick_code", "round_bf16"]

TRITON_BEFORE_3_8 = (tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit())
                     < (3, 8))
"""Whether the installed Triton is older than 3.8, which lays tiles out differently."""

# A tile of 8-bit state is (2, ROWS, QBLOCK // 2): block r's two halves at [0, r] and [1, r],
# or (ROWS, 2, QBLOCK // 2). HALVES is the axis holding the halves: the one that keeps each
# block in one warp under this Triton's layout, so that its reductions need no shared memory
# (why it depends on the version: docs/benchmarks.md, "What the compiled kernel predicts").
HALVES: tl.constexpr = tl.constexpr(1 if TRITON_BEFORE_3_8 else 0)


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


@triton.jit
def code_value(k, SIGNED: tl.constexpr):
    """Code ``k``'s value relative to its block's scale (:func:`adan.numeric.codes.code_value`)."""
    if SIGNED:
        u = k * (1.0 / 127)
        return u * u * u
    else:
        u = k * (1.0 / 255)
        return (u * u) * (u * u)


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


@triton.jit
def block_columns(QBLOCK: tl.constexpr):
    """Each element's column in its block of ``QBLOCK``, shaped to broadcast over a tile's
    rows (see :data:`HALVES`)."""
    HALF: tl.constexpr = QBLOCK // 2
    halves = tl.expand_dims(tl.expand_dims(tl.arange(0, 2), 1), 1 - HALVES)
    return halves * HALF + tl.arange(0, HALF)[None, None, :]


@triton.jit
def block_max(x):
    """The largest element of each block of a tile, one per row: a block's halves lie in one
    thread's registers and its columns in one warp, so this takes shuffles, no barrier."""
    return tl.max(tl.max(x, axis=HALVES), axis=1)


@triton.jit
def block_min(x):
    """The smallest element of each block of a tile, as :func:`block_max`."""
    return tl.min(tl.min(x, axis=HALVES), axis=1)


@triton.jit
def block_sum(x):
    """The sum of each block of a tile, as :func:`block_max`."""
    return tl.sum(tl.sum(x, axis=HALVES), axis=1)


@triton.jit
def per_element(block_values):
    """Per-block values (from the reductions above) broadcast to the tile's shape, in the
    order of axes that keeps their layout (no conversion through shared memory)."""
    return tl.expand_dims(tl.expand_dims(block_values, 1), HALVES)


@triton.jit
def cube_root(t):
    """``t ** (1/3)`` for ``t`` in ``[0, 1]`` to a relative 3e-5 (0.003 of a signed code): an
    inverse cube root from the float's bits and two Newton steps, multiplications only (no
    ``log2``), then ``t * y * y``."""
    t = tl.maximum(t, 1e-30)
    y = (0x54A21D2A - t.to(tl.int32, bitcast=True) // 3).to(tl.float32, bitcast=True)
    third = t * (1.0 / 3)
    for _ in tl.static_range(2):
        y = y * (4.0 / 3 - third * (y * y * y))
    return t * y * y


@triton.jit
def pick_code(t, uniform, SIGNED: tl.constexpr):
    """The code of ``t`` (in ``[0, 1]``) rounded stochastically, as :mod:`adan.numeric.codes`:
    the bracket ``[c(k), c(k+1)]`` of :func:`adan.numeric.codes.code_below`, then up with
    probability ``(t - c(k)) / (c(k+1) - c(k))``."""
    # A root estimate lowered by 1/64 of a code (far above its error, a few units in the last
    # place) is the bracket or the one below it: one comparison with a code value finds it.
    if SIGNED:
        levels = 127.0
        root = cube_root(t)
    else:
        levels = 255.0
        root = tl.sqrt(tl.sqrt(t))
    k = tl.minimum(tl.maximum(tl.floor(root * levels - (1.0 / 64)), 0.0), levels - 2.0)
    c1 = code_value(k + 1.0, SIGNED)
    up = t >= c1
    other = code_value(k + tl.where(up, 2.0, 0.0), SIGNED)  # the bracket's other end
    lo = tl.where(up, c1, other)
    hi = tl.where(up, other, c1)
    k = k + tl.where(up, 1.0, 0.0)
    return k + tl.where(t - lo > uniform * (hi - lo), 1.0, 0.0)
