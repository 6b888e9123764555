"""CUDA Adan in Triton: one launch per step for all tensors of a group that share dtypes.

The kernel walks a table of the tensors' addresses and sizes. Each program updates one tile
of ``BLOCK`` elements of one tensor, ``TILE`` at a time (so that the per-program set-up, the
step's float64 scalars above all, is paid once for both halves while registers hold one),
with the math in float32 registers, reading and writing every element once: param, gradient
and the four state buffers, in any storage format (the parameter's dtype, float32, bfloat16
with stochastic rounding, or 8-bit blockwise codes whose blocks are tiles' rows, each in one
warp, so each program owns its blocks and their meta rows). It computes
the same expressions, in the same order, as :func:`adan.kernels.compact.adan_update` and
:mod:`adan.numeric.codes`, with the same scalars (step-dependent ones in float64, rounded once) and
the same rounding noise, so that under Triton's interpreter it agrees with the CPU paths bit
for bit (on a GPU, fused multiply-adds and the hardware's division differ in the last bit).

Nothing reads device memory on the host. Python-float hyperparameters are kernel arguments;
a tensor lr, the step counts, the seeds and the gradient factor (AMP unscale times clipping)
are read by the kernel from device memory. A non-finite factor means "skip this step": no
program writes anything, so a GradScaler overflow or a NaN clipping norm leaves params,
state and step counts as they were without a host synchronisation. Each tensor's step count
is advanced by the last of its programs to finish (a per-tensor completion counter), so that
no program reads a count another has already advanced; the step can therefore be captured in
a CUDA graph.

A group's tensors are launched in parts: by dtypes, by alignment (a tensor whose addresses
are not all 16-byte aligned, e.g. a view into a flat buffer, would make every tensor of its
launch use narrow accesses) and by tile kind (full tiles without masks, then partial ones:
one kernel with both branches needs more registers). What a part's table holds (parameters,
state buffers, step counts, seeds, sizes) is uploaded when it is built; the gradients'
addresses, which change at every step under ``zero_grad(set_to_none=True)``, travel in a
small array of their own, copied without blocking. During CUDA graph capture nothing is
allocated on the host: the copy reads a pinned buffer reserved before, which the graph keeps.
Under Triton's interpreter (``TRITON_INTERPRET=1``) the same kernel runs on CPU tensors,
which is how CI tests it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from adan.kernels.common import StepArgs
from adan.numeric.scalars import decay_factors, log_beta, real_view
from adan.state.formats import BUFFER_KEYS

__all__ = ["BLOCK", "triton_adan", "triton_unsupported"]

BLOCK = 4096
"""Elements per program."""
TILE = 2048
"""Elements a program updates at a time (BLOCK is a multiple): a multiple of the 8-bit code's
block (256)."""
QBLOCK = 256
NUM_WARPS = 8


_BEFORE_3_8 = tuple(int(x) for x in triton.__version__.split(".")[:2] if x.isdigit()) < (3, 8)
"""Whether the installed Triton is older than 3.8, whose layouts differ (see below)."""

# The axis of a tile's (2, ROWS, QBLOCK // 2) or (ROWS, 2, QBLOCK // 2) shape that holds each
# 8-bit block's two halves. Triton lays tiles out by the axes' contiguity, and these two axes
# tie: Triton 3.8 and 3.9 then spread the warps over the middle axis, 3.6 (the GPU machine's)
# over the first, so that with the other shape a block spans two warps, whose reductions go
# through shared memory (113 barriers per program on sm_90 instead of 17). So the halves take
# the axis that keeps a block in one warp. (3.7 was not built; it is taken to act as 3.6.)
HALVES: tl.constexpr = tl.constexpr(1 if _BEFORE_3_8 else 0)

REGISTER_CAP = 128
"""Registers of 2 CTAs of NUM_WARPS warps per SM: the limit given to the kernels that would
take more (the 8-bit one; with Triton before 3.8, partial tiles), which then fit without
spilling, instead of 1 CTA per SM."""


def register_cap(fmt: int, masked: bool) -> int | None:
    """The ``maxnreg`` launch option of a kernel variant (None: the compiler's choice, which
    for the others is below the cap, and lower than under it)."""
    return REGISTER_CAP if fmt == 2 or (masked and _BEFORE_3_8) else None


# Columns of the address table, one row per tensor: param, m, v, n, prev_grad, step, number
# of (real) elements, the 8-bit block data of m, v, n, prev_grad (0 if none), and the seed.
# (The gradients' addresses live in an array of their own.) 12 columns keep rows 16-byte
# aligned.
NCOL = 12

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}
_ALIGN = 16


@triton.jit
def _ptr(base, addr, DT: tl.constexpr, VEC: tl.constexpr):
    """The address ``addr`` as a pointer to ``DT``, formed as ``base`` (a 16-byte aligned
    pointer: a table row or the gradients' array) plus an element offset rather than cast
    from the integer, so that the compiler knows that it is aligned to ``VEC`` elements (at
    most 16 bytes; 0: no promise) and can use vector accesses; a pointer cast from an
    integer would lose that."""
    SIZE: tl.constexpr = DT.primitive_bitwidth // 8
    offset = addr - base.to(tl.int64, bitcast=True)
    if SIZE > 1:  # (a division by 1 would be folded away with the hint below on it)
        offset = offset // SIZE
    if VEC > 0:
        offset = tl.multiple_of(offset, min(VEC, 16 // SIZE))
    return base.to(tl.pointer_type(DT), bitcast=True) + offset


@triton.jit
def _col(row, col: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr):
    """The address in column ``col`` of a table row, as a pointer to ``DT``."""
    return _ptr(row, tl.load(row + col), DT, VEC)


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` in float64, without cancellation for small ``|x|``: below ``2**-6`` a
    7-term series (truncated at ``x**8 / 8!``, under float64's rounding), above it
    ``exp(x) - 1``, whose cancellation there costs at most 6 of float64's 53 bits (the
    callers round to float32)."""
    s = x * (1.0 / 7)  # x * (1 + x/2 * (1 + x/3 * (... * (1 + x/7))))
    for k in tl.static_range(6, 1, -1):
        s = x * (1.0 / k) * (1.0 + s)
    series = x * (1.0 + s)
    return tl.where(tl.abs(x) < 2.0**-6, series, tl.exp(x) - 1.0)


@triton.jit
def _mix32(x):
    """The 32-bit integer hash of :func:`adan.numeric.codes.mix32`, on uint32 (whose
    products wrap as that function's masks do)."""
    mul = tl.full((), 0x45D9F3B, tl.uint32)
    x = ((x >> 16) ^ x) * mul
    x = ((x >> 16) ^ x) * mul
    return (x >> 16) ^ x


@triton.jit
def _noise_word(index, key, WORD: tl.constexpr):
    """Random word ``WORD`` per element (:func:`adan.kernels.compact.noise_word`)."""
    base = _mix32(key + tl.full((), (WORD * 0x9E3779B9) % 2**32, tl.uint32))
    return _mix32(index + base)


@triton.jit
def _code_value(k, SIGNED: tl.constexpr):
    """Code ``k``'s value relative to its block's scale (:func:`adan.numeric.codes.code_value`)."""
    if SIGNED:
        u = k * (1.0 / 127)
        return u * u * u
    else:
        u = k * (1.0 / 255)
        return (u * u) * (u * u)


@triton.jit
def _ld(ptr, mask, MASKED: tl.constexpr):
    """Load a tile: masked only for a tensor's last tile, so that full tiles load in wide,
    unpredicated accesses (a mask against a bound read from memory stops vectorisation)."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0)
    else:
        return tl.load(ptr)


@triton.jit
def _st(ptr, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, x, mask=mask)
    else:
        tl.store(ptr, x)


@triton.jit
def _load(row, col: tl.constexpr, meta_col: tl.constexpr, offs, mask, qrow, qmask, cols,
          S_DT: tl.constexpr, FMT: tl.constexpr, SIGNED: tl.constexpr, VEC: tl.constexpr,
          MASKED: tl.constexpr):
    """Decode one state buffer's tile to float32 (masked elements read as 0)."""
    if FMT == 2:
        if SIGNED:
            codes = _ld(_col(row, col, tl.int8, VEC) + offs, mask, MASKED)
        else:
            codes = _ld(_col(row, col, tl.uint8, VEC) + offs, mask, MASKED)
        value = _code_value(codes.to(tl.float32), SIGNED)
        meta = _col(row, meta_col, tl.float32, 0) + qrow * 3
        scale = tl.load(meta, mask=qmask, other=0.0)
        top = tl.load(meta + 1, mask=qmask, other=0.0)
        pos = tl.load(meta + 2, mask=qmask, other=-1.0).to(tl.int32)
        return tl.where(cols == _per_element(pos), _per_element(top),
                        value * _per_element(scale))
    else:
        return _ld(_col(row, col, S_DT, VEC) + offs, mask, MASKED).to(tl.float32)


@triton.jit
def _round_bf16(x, noise16):
    """``x`` rounded to bfloat16 stochastically: add 16 random bits below bf16's, truncate."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + noise16) & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _cast(x, DT: tl.constexpr):
    """``x`` in dtype ``DT``, rounded to nearest-even (bfloat16 by its bits: Triton's
    interpreter truncates that conversion)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 32767)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DT)


@triton.jit
def _block_max(x):
    """The largest element of each block of a tile (see :data:`HALVES`): one per row. A
    block's halves lie in one thread's registers and its columns in one warp (see the
    kernel's tile layout), so this needs shuffles but no shared memory or barrier."""
    return tl.max(tl.max(x, axis=HALVES), axis=1)


@triton.jit
def _block_min(x):
    """The smallest element of each block of a tile, as :func:`_block_max`."""
    return tl.min(tl.min(x, axis=HALVES), axis=1)


@triton.jit
def _block_sum(x):
    """The sum of each block of a tile, as :func:`_block_max`."""
    return tl.sum(tl.sum(x, axis=HALVES), axis=1)


@triton.jit
def _per_element(block_values):
    """Per-block values (from the reductions above) broadcast to the tile's shape, in the
    order of axes that keeps their layout (no conversion through shared memory)."""
    return tl.expand_dims(tl.expand_dims(block_values, 1), HALVES)


@triton.jit
def _cube_root(t):
    """``t ** (1/3)`` for ``t`` in ``[0, 1]`` to a relative 3e-5 (0.003 of a signed code):
    an inverse cube root from the float's bits, two Newton steps (multiplications only; a
    float32 ``log2``, which the estimate would otherwise take, is a 20-instruction
    polynomial on a GPU), then ``t * y * y``."""
    t = tl.maximum(t, 1e-30)
    y = (0x54A21D2A - t.to(tl.int32, bitcast=True) // 3).to(tl.float32, bitcast=True)
    third = t * (1.0 / 3)
    for _ in tl.static_range(2):
        y = y * (4.0 / 3 - third * (y * y * y))
    return t * y * y


@triton.jit
def _pick_code(t, uniform, SIGNED: tl.constexpr):
    """The code of ``t`` (in ``[0, 1]``) rounded stochastically, as :mod:`adan.numeric.codes`: the
    bracket ``[c(k), c(k+1)]`` of :func:`adan.numeric.codes.code_below`, then up with probability
    ``(t - c(k)) / (c(k+1) - c(k))``. A root estimate lowered by 1/64 of a code (far above its
    error, at most a few units in the last place) is the bracket or one below it, so one
    comparison finds it exactly; the code value compared and one more bound the bracket."""
    if SIGNED:
        levels = 127.0
        root = _cube_root(t)
    else:
        levels = 255.0
        root = tl.sqrt(tl.sqrt(t))
    k = tl.minimum(tl.maximum(tl.floor(root * levels - (1.0 / 64)), 0.0), levels - 2.0)
    c1 = _code_value(k + 1.0, SIGNED)
    up = t >= c1
    other = _code_value(k + tl.where(up, 2.0, 0.0), SIGNED)  # the bracket's other end
    lo = tl.where(up, c1, other)
    hi = tl.where(up, other, c1)
    k = k + tl.where(up, 1.0, 0.0)
    return k + tl.where(t - lo > uniform * (hi - lo), 1.0, 0.0)


@triton.jit
def _store(row, col: tl.constexpr, meta_col: tl.constexpr, x, offs, mask, qrow, qmask, cols,
           noise16, S_DT: tl.constexpr, FMT: tl.constexpr, SIGNED: tl.constexpr,
           VEC: tl.constexpr, MASKED: tl.constexpr, QBLOCK: tl.constexpr):
    """Encode a float32 tile into one state buffer (see :mod:`adan.numeric.codes` for the codes)."""
    if FMT == 2:
        inf = float("inf")
        mag = tl.where(x != x, inf, tl.abs(x))  # a NaN ranks with the largest
        if MASKED:
            mag = tl.where(mask, mag, -1.0)
        top_mag = _block_max(mag)
        pos = _block_min(tl.where(mag == _per_element(top_mag), cols, QBLOCK))
        is_top = cols == _per_element(pos)
        top = _block_sum(tl.where(is_top, x, 0.0))
        rest = tl.where(is_top | (mag == inf) | (mag < 0), 0.0, mag)
        scale = _block_max(rest)
        t = tl.minimum(rest * _per_element(1.0 / tl.where(scale > 0, scale, 1.0)), 1.0)
        uniform = (noise16.to(tl.float32) + 0.5) * (1.0 / 65536)
        k = _pick_code(t, uniform, SIGNED)
        if SIGNED:
            _st(_col(row, col, tl.int8, VEC) + offs, tl.where(x < 0, -k, k).to(tl.int8),
                mask, MASKED)
        else:
            _st(_col(row, col, tl.uint8, VEC) + offs, k.to(tl.uint8), mask, MASKED)
        # The meta rows as one (ROWS, 4) store of 3 columns: one layout conversion, not three.
        # (join stacks on a new last axis: [r, i, j] is the j-th argument's i-th)
        rows = tl.reshape(tl.join(tl.join(scale, pos.to(tl.float32)), tl.join(top, scale)),
                          (scale.shape[0], 4))
        col4 = tl.arange(0, 4)[None, :]
        meta = _col(row, meta_col, tl.float32, 0) + qrow[:, None] * 3 + col4
        tl.store(meta, rows, mask=qmask[:, None] & (col4 < 3))
    elif FMT == 1:
        _st(_col(row, col, tl.bfloat16, VEC) + offs, _round_bf16(x, noise16), mask, MASKED)
    else:
        _st(_col(row, col, S_DT, VEC) + offs, _cast(x, S_DT), mask, MASKED)


@triton.jit
def _adan_kernel(
    table, tiles, grads, counters, factor_ptr, lr_ptr, hyper,
    keep_value, scale_value, beta1, omb1, beta2, omb2, beta3, omb3, eps,
    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, STEP_DT: tl.constexpr,
    FMT: tl.constexpr, NO_PROX: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_FACTOR: tl.constexpr, LR_ON_DEVICE: tl.constexpr, SR_PARAM: tl.constexpr,
    ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
    QBLOCK: tl.constexpr, NCOL: tl.constexpr,
):
    """One tile of one tensor per program: load, Adan's step in float32, store. ``hyper``
    holds float64 ``log(b1), log(b2), log(b3), b2, weight_decay``."""
    # Vector accesses promised to the compiler, in elements: 16 bytes; with 8-bit codes 4
    # elements, so that code tiles take the float32 tiles' layout (4 per thread) and a block
    # stays in one warp rather than the compiler converting between layouts.
    VEC: tl.constexpr = (4 if FMT == 2 else 16) if ALIGNED else 0
    pid = tl.program_id(0)
    t = tl.load(tiles + 2 * pid).to(tl.int64)
    tile = tl.load(tiles + 2 * pid + 1).to(tl.int64)
    row = table + t * NCOL
    numel = tl.load(row + 6)
    step_ptr = tl.load(row + 5).to(tl.pointer_type(STEP_DT))
    k_old = tl.load(step_ptr).to(tl.float32)
    k = k_old + 1.0

    factor = tl.full((), 1.0, tl.float32)
    if HAS_FACTOR:
        factor = tl.load(factor_ptr).to(tl.float32)
    go = (factor - factor) == 0.0  # a non-finite factor skips the whole step
    if MAXIMIZE:
        factor = -factor

    if go:
        # The step's scalars, in float64 and rounded once (as adan.kernels.compact does).
        k64 = k.to(tl.float64)
        ibc1 = (1.0 / -_expm1(k64 * tl.load(hyper))).to(tl.float32)
        b2bc2 = (tl.load(hyper + 3) / -_expm1(k64 * tl.load(hyper + 1))).to(tl.float32)
        ibc3 = (1.0 / tl.sqrt(-_expm1(k64 * tl.load(hyper + 2)))).to(tl.float32)
        if LR_ON_DEVICE:
            lr = tl.load(lr_ptr).to(tl.float64)
            if NO_PROX:
                keep = (1.0 - lr * tl.load(hyper + 4)).to(tl.float32)
                scale = lr.to(tl.float32)
            else:
                keep64 = 1.0 / (1.0 + lr * tl.load(hyper + 4))
                keep = keep64.to(tl.float32)
                scale = (lr * keep64).to(tl.float32)
        else:
            keep = keep_value
            scale = scale_value

        SUBTILES: tl.constexpr = BLOCK // TILE
        EXTRA_ROW: tl.constexpr = 1 if FMT == 2 else 0
        ROWS: tl.constexpr = TILE // QBLOCK
        # A tile is (2, ROWS, QBLOCK // 2), block r's two halves at [0, r] and [1, r] (or, see
        # HALVES, (ROWS, 2, QBLOCK // 2)). Triton lays the last axis (16-byte vectors) across
        # a warp's threads and the rows across warps, so each block lies in one warp and its
        # reductions stay within it.
        HALF: tl.constexpr = QBLOCK // 2
        halves = tl.expand_dims(tl.expand_dims(tl.arange(0, 2), 1), 1 - HALVES)
        cols = halves * HALF + tl.arange(0, HALF)[None, None, :]
        if FMT != 0 or SR_PARAM:  # the noise of adan.kernels.compact.noise_word
            seed = tl.load(tl.load(row + 11).to(tl.pointer_type(tl.int64)))
            key = seed.to(tl.uint32) ^ _mix32(k.to(tl.uint32))
        for sub in tl.static_range(SUBTILES):
            first = (tile * SUBTILES + sub) * TILE
            # A partial tile skips its sub-tiles past the tensor's end, but for the one that
            # holds the extra meta row of 8-bit state.
            if not MASKED or first < numel + EXTRA_ROW:
                qrow = first // QBLOCK + tl.arange(0, ROWS)
                offs = _per_element(qrow) * QBLOCK + cols
                mask = offs < numel
                qmask = qrow <= numel // QBLOCK  # meta rows: one per started block, plus one
                index = offs.to(tl.uint32)
                p_ptr = _col(row, 0, P_DT, VEC) + offs
                p = _ld(p_ptr, mask, MASKED).to(tl.float32)
                g_ptr = _ptr(grads, tl.load(grads + t), G_DT, VEC) + offs
                g = _ld(g_ptr, mask, MASKED).to(tl.float32) * factor
                m = _load(row, 1, 7, offs, mask, qrow, qmask, cols, S_DT, FMT, True, VEC, MASKED)
                v = _load(row, 2, 8, offs, mask, qrow, qmask, cols, S_DT, FMT, True, VEC, MASKED)
                n = _load(row, 3, 9, offs, mask, qrow, qmask, cols, S_DT, FMT, False, VEC, MASKED)
                prev = _load(row, 4, 10, offs, mask, qrow, qmask, cols, S_DT, FMT, True, VEC,
                             MASKED)
                prev = tl.where(k == 1.0, g, prev)  # g_0 := g_1: the first difference is zero

                diff = g - prev
                m = m * beta1 + g * omb1
                v = v * beta2 + diff * omb2
                nesterov = g + diff * beta2
                n = n * beta3 + nesterov * nesterov * omb3
                denom = tl.sqrt_rn(n) * ibc3 + eps
                update = (m * ibc1 + v * b2bc2) / denom
                new = p * keep - update * scale

                # 16 random bits per buffer (two words' halves), for the compact formats
                noise = (0, 0, 0, 0)
                if FMT != 0:
                    w0 = _noise_word(index, key, 0)
                    w1 = _noise_word(index, key, 1)
                    noise = ((w0 & 65535).to(tl.int32), (w0 >> 16).to(tl.int32),
                             (w1 & 65535).to(tl.int32), (w1 >> 16).to(tl.int32))
                _store(row, 1, 7, m, offs, mask, qrow, qmask, cols, noise[0], S_DT, FMT, True,
                       VEC, MASKED, QBLOCK)
                _store(row, 2, 8, v, offs, mask, qrow, qmask, cols, noise[1], S_DT, FMT, True,
                       VEC, MASKED, QBLOCK)
                _store(row, 3, 9, n, offs, mask, qrow, qmask, cols, noise[2], S_DT, FMT, False,
                       VEC, MASKED, QBLOCK)
                _store(row, 4, 10, g, offs, mask, qrow, qmask, cols, noise[3], S_DT, FMT, True,
                       VEC, MASKED, QBLOCK)
                if SR_PARAM:
                    word = _noise_word(index, key, 2)
                    _st(p_ptr, _round_bf16(new, (word & 65535).to(tl.int32)), mask, MASKED)
                else:
                    _st(p_ptr, _cast(new, P_DT), mask, MASKED)

        # The last program of this tensor to finish (in either launch) advances its step.
        tiles_of_tensor = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
        done = tl.atomic_add(counters + t, 1)
        last = done == tiles_of_tensor - 1
        tl.store(step_ptr, k.to(STEP_DT), mask=last)
        tl.store(counters + t, 0, mask=last)


def triton_unsupported(param: Tensor, grad: Tensor, state: dict[str, Any] | None
                       ) -> str | None:
    """Why this tensor cannot take the Triton kernel (it then takes another path), or None.
    ``state`` None: not created yet (new state is contiguous)."""
    if real_view(param).dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"parameter dtype {param.dtype} (the kernel computes in float32)"
    if real_view(grad).dtype not in _TL_DTYPES:
        return f"gradient dtype {grad.dtype}"
    buffers = [state[k] for k in BUFFER_KEYS if k in state] if state else []
    if not all(t.is_contiguous() for t in (param, grad, *buffers)):
        return "a non-contiguous tensor"
    return None


class _Staging:
    """A device array refreshed from host values without blocking the host.

    Outside CUDA graph capture each refresh copies from a new pinned tensor (torch's pinned
    allocator reuses it once that copy has finished). During capture nothing is allocated on
    the host: the copy reads a pinned buffer reserved at an earlier refresh, which is then
    kept for good, since the graph copies from it again at every replay (only a second
    capture with no eager step since the first allocates one there).
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device,
                 keepalive: list[Tensor]) -> None:
        self.device = torch.empty(size, dtype=dtype, device=device)
        self.cuda = device.type == "cuda"
        self.spare = torch.empty(size, dtype=dtype, pin_memory=True) if self.cuda else None
        self.keepalive = keepalive
        self.last: list[Any] | None = None

    def put(self, values: list[Any]) -> Tensor:
        """The device array holding ``values`` (copied only if they changed, and always
        during capture, so that every replay uses the addresses it was captured with)."""
        capturing = self.cuda and torch.cuda.is_current_stream_capturing()
        if values == self.last and not capturing:
            return self.device
        if capturing:
            if self.spare is None:  # a second capture with no eager step between: torch's
                # pinned allocator takes allocations during capture (older torch may refuse)
                self.spare = self._host()
            host, self.spare = self.spare, None
            self.keepalive.append(host)
        else:
            host = self._host()
            if self.cuda and self.spare is None:
                self.spare = self._host()
        host.numpy()[:] = values  # through NumPy: a third of torch.tensor(values)'s time
        self.device.copy_(host, non_blocking=self.cuda)
        self.last = values
        return self.device

    def _host(self) -> Tensor:
        """A host array to copy from: pinned on CUDA, so that the copy does not block."""
        return torch.empty(self.device.shape, dtype=self.device.dtype, pin_memory=self.cuda)


@dataclass
class _Part:
    """The tensors of one launch signature (dtypes, alignment): positions among the call's
    tensors, the address table, the tiles of each kind, the completion counters and the
    gradients' addresses."""

    signature: tuple[Any, ...]
    members: list[int]
    table: Tensor
    tiles: list[tuple[bool, Tensor]]
    counters: Tensor
    grads: _Staging


@dataclass
class _Plan:
    """A call's parts, valid while the parameters' addresses and the gradients' alignment stay
    as they were built from (the owner renews the cache when tensors or state change)."""

    params: list[int]
    aligned_grads: list[bool]
    parts: list[_Part]
    hyper: _Staging
    keepalive: list[Tensor] = field(default_factory=list)


def _aligned(address: int) -> bool:
    return address % _ALIGN == 0


def _alignment(addresses: list[int], like: list[bool]) -> list[bool]:
    """Which addresses are 16-byte aligned; ``like`` itself when it says all are and they
    are (the common case: one C call, their greatest common divisor)."""
    if all(like) and not math.gcd(*addresses) % _ALIGN:
        return like
    return [_aligned(a) for a in addresses]


def _tiles(numels: list[int], device: torch.device, keepalive: list[Tensor]
           ) -> list[tuple[bool, Tensor]]:
    """(tensor, tile) pairs of every program, int32, for full tiles and for partial ones (an
    empty tensor gets one partial tile, so that its step is counted), as (masked, pairs)."""
    counts = torch.tensor(numels, dtype=torch.int64)
    full = counts // BLOCK
    partial = ((counts % BLOCK) > 0) | (counts == 0)
    out = []
    for masked, per_tensor in ((False, full), (True, partial.long())):
        if int(per_tensor.sum()) == 0:
            continue
        tensor = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
        first = torch.repeat_interleave(torch.cumsum(per_tensor, 0) - per_tensor, per_tensor)
        index = torch.arange(tensor.numel()) - first + (full[tensor] if masked else 0)
        pairs = torch.stack([tensor, index], dim=1).to(torch.int32).reshape(-1)
        stage = _Staging(pairs.numel(), torch.int32, device, keepalive)
        out.append((masked, stage.put(pairs.tolist())))
    return out


def _check_sizes(param: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
    """The kernel's bound is the parameter's size: refuse a gradient or buffer of another
    (a parameter whose ``.data`` was replaced by a tensor of another shape keeps its old
    gradient and state, and the owner's plan key, which reads gradients, does not see it)."""
    numel = real_view(param).numel()
    sizes = [real_view(t).numel() for t in (grad, *(state[k] for k in BUFFER_KEYS))]
    if any(size != numel for size in sizes):
        raise RuntimeError(f"Cannot step a parameter of shape {tuple(param.shape)}: its "
                           f"gradient and state buffers hold {sizes} elements (was its .data "
                           "replaced by a tensor of another shape?)")


def _build(params: list[Tensor], grads: list[Tensor], grad_ptrs: list[int],
           states: list[dict[str, Any]]) -> _Plan:
    """The parts of a call: its tensors grouped by launch signature, with their tables."""
    device = params[0].device
    no_seed = torch.zeros((), dtype=torch.int64, device=device)  # as compact.seed_of's
    keepalive: list[Tensor] = [no_seed]
    rows: list[list[int]] = []
    by_signature: dict[tuple[Any, ...], list[int]] = {}
    for i, (param, state) in enumerate(zip(params, states, strict=True)):
        _check_sizes(param, grads[i], state)
        metas = [state[k + "_meta"].data_ptr() if k + "_meta" in state else 0
                 for k in BUFFER_KEYS]
        row = [param.data_ptr(), *(state[k].data_ptr() for k in BUFFER_KEYS),
               state["step"].data_ptr(), real_view(param).numel(), *metas,
               state.get("seed", no_seed).data_ptr()]
        rows.append(row)
        aligned = all(_aligned(a) for a in row[:5]) and _aligned(grad_ptrs[i])
        signature = (real_view(param).dtype, real_view(grads[i]).dtype,
                     real_view(state["exp_avg"]).dtype, state["step"].dtype, aligned)
        by_signature.setdefault(signature, []).append(i)
    parts = []
    for signature, members in by_signature.items():
        table = _Staging(len(members) * NCOL, torch.int64, device, keepalive)
        parts.append(_Part(signature, members,
                           table.put([a for i in members for a in rows[i]]),
                           _tiles([rows[i][6] for i in members], device, keepalive),
                           torch.zeros(len(members), dtype=torch.int32, device=device),
                           _Staging(len(members), torch.int64, device, keepalive)))
    return _Plan(params=[p.data_ptr() for p in params],
                 aligned_grads=[_aligned(a) for a in grad_ptrs], parts=parts,
                 hyper=_Staging(5, torch.float64, device, keepalive), keepalive=keepalive)


def triton_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one step to every tensor in place: one launch per part (dtypes, alignment and
    tile kind).

    Every tensor must pass :func:`triton_unsupported`; the selector routes others elsewhere.
    ``cache`` keeps the plan: its owner empties it when the tensors' dtypes, shapes or
    state change; the parameters' addresses and the gradients' alignment are checked here,
    and the gradients' addresses are sent at every step.
    """
    cache = {} if cache is None else cache
    grad_ptrs = list(map(Tensor.data_ptr, grads))
    plan: _Plan | None = cache.get("plan")
    if (plan is None or plan.params != list(map(Tensor.data_ptr, params))
            or plan.aligned_grads != _alignment(grad_ptrs, plan.aligned_grads)):
        plan = cache["plan"] = _build(params, grads, grad_ptrs, states)
    device = params[0].device
    b1, b2, b3 = args.betas
    hyper = plan.hyper.put([log_beta(b1), log_beta(b2), log_beta(b3), b2, args.weight_decay])
    lr_on_device = isinstance(args.lr, Tensor) and args.lr.device == device
    if lr_on_device:
        keep = scale = 0.0
    else:
        keep, scale = map(float, decay_factors(float(args.lr), args.weight_decay, args.no_prox))
    factor = None if args.grad_factor is None else args.grad_factor.to(device, non_blocking=True)
    fmt = args.fmt.triton_code
    for part in plan.parts:
        p_dtype, g_dtype, s_dtype, step_dtype, aligned = part.signature
        addresses = part.grads.put(grad_ptrs if len(part.members) == len(params)
                                   else [grad_ptrs[i] for i in part.members])
        state_dtype = s_dtype if not args.fmt.quantized else torch.float32
        lr_tensor = args.lr if lr_on_device else part.counters
        for masked, tiles in part.tiles:
            _adan_kernel[(tiles.shape[0] // 2,)](
                part.table, tiles, addresses, part.counters,
                part.counters if factor is None else factor, lr_tensor, hyper,
                keep, scale, b1, 1 - b1, b2, 1 - b2, b3, 1 - b3, args.eps,
                P_DT=_TL_DTYPES[p_dtype], G_DT=_TL_DTYPES[g_dtype],
                S_DT=_TL_DTYPES[state_dtype], STEP_DT=_TL_DTYPES[step_dtype],
                FMT=fmt, NO_PROX=args.no_prox, MAXIMIZE=args.maximize,
                HAS_FACTOR=factor is not None, LR_ON_DEVICE=lr_on_device,
                SR_PARAM=args.rounds_param(p_dtype), ALIGNED=aligned, MASKED=masked,
                BLOCK=BLOCK, TILE=TILE, QBLOCK=QBLOCK, NCOL=NCOL, num_warps=NUM_WARPS,
                maxnreg=register_cap(fmt, masked),
            )
