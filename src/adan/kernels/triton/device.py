"""The Triton kernel: Adan's step over one tile of one tensor per program, the tensor found in
a table of addresses. The table's columns and the state format codes are named here, for the
kernel and the host alike (how the kernel works: docs/triton.md)."""

from __future__ import annotations

import triton
import triton.language as tl

from adan.kernels.triton.codes import (
    cast,
    expm1,
    mix32,
    mx_decode,
    mx_encode,
    mx_noise,
    noise_word,
    round_bf16,
)

__all__ = ["COL_M", "COL_META_M", "COL_META_N", "COL_META_PREV", "COL_META_V", "COL_N",
           "COL_NUMEL", "COL_PARAM", "COL_PREV", "COL_SEED", "COL_STEP", "COL_V", "FMT_BF16",
           "FMT_FLOAT", "FMT_INT8", "NCOL", "NSCALAR"]

# The state format (the kernel's FMT): :attr:`adan.state.formats.StateFormat.triton_code`.
FMT_FLOAT: tl.constexpr = tl.constexpr(0)  # buffers in a float dtype (S_DT)
FMT_BF16: tl.constexpr = tl.constexpr(1)  # bfloat16, rounded stochastically
FMT_INT8: tl.constexpr = tl.constexpr(2)  # 8-bit codes with a scale byte per block

# The address table: one row of NCOL int64 per tensor. The addresses of the parameter and
# the four state buffers, of the step count, the number of (real) elements, the addresses of
# the buffers' 8-bit block scales (0 if none) and of the seed. (The gradients' addresses live in
# an array of their own.) 12 columns keep rows 16-byte aligned.
COL_PARAM: tl.constexpr = tl.constexpr(0)
COL_M: tl.constexpr = tl.constexpr(1)
COL_V: tl.constexpr = tl.constexpr(2)
COL_N: tl.constexpr = tl.constexpr(3)
COL_PREV: tl.constexpr = tl.constexpr(4)
COL_STEP: tl.constexpr = tl.constexpr(5)
COL_NUMEL: tl.constexpr = tl.constexpr(6)
COL_META_M: tl.constexpr = tl.constexpr(7)
COL_META_V: tl.constexpr = tl.constexpr(8)
COL_META_N: tl.constexpr = tl.constexpr(9)
COL_META_PREV: tl.constexpr = tl.constexpr(10)
COL_SEED: tl.constexpr = tl.constexpr(11)
NCOL: tl.constexpr = tl.constexpr(12)

# The step's scalars of each tensor, NSCALAR float32 per tensor (8: 32-byte rows): the bias
# corrections 1 / (1 - b1**k), b2 / (1 - b2**k), 1 / sqrt(1 - b3**k), then the factors of the
# parameter and of the update (adan.numeric.scalars.decay_factors).
_SC_IBC1: tl.constexpr = tl.constexpr(0)
_SC_B2BC2: tl.constexpr = tl.constexpr(1)
_SC_IBC3: tl.constexpr = tl.constexpr(2)
_SC_KEEP: tl.constexpr = tl.constexpr(3)
_SC_SCALE: tl.constexpr = tl.constexpr(4)
NSCALAR: tl.constexpr = tl.constexpr(8)


@triton.jit
def _ptr(base, addr, DT: tl.constexpr, VEC: tl.constexpr):
    """The address ``addr`` as a pointer to ``DT``, formed as ``base`` (16-byte aligned) plus an
    element offset promised to be a multiple of ``VEC`` (0: no promise), so that the compiler
    can use vector accesses, which a pointer cast from the integer would not allow."""
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
def _load_scales(row, meta_col: tl.constexpr, qrow, qmask, MASKED: tl.constexpr,
                 COMPILED: tl.constexpr):
    """A tile's scale bytes (int32; past a tensor's blocks, where ``qmask`` is off and codes
    load as 0, 16: a scale either code can have). Compiled, every thread reads
    its rows' bytes by inline PTX, in the rows' own layout, where ``tl.load`` would take a
    layout of the compiler's choosing and move the bytes into the rows' through shared memory
    (two barriers per buffer and tile); the interpreter cannot run PTX."""
    if COMPILED:
        addr = tl.load(row + meta_col) + qrow
        if MASKED:
            return tl.inline_asm_elementwise(
                "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\tmov.u32 $0, 16;\n\t"
                "@p ld.global.u8 $0, [$1];\n\t}", "=r,l,r", [addr, qmask.to(tl.int32)],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("ld.global.u8 $0, [$1];", "=r,l", [addr],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.load(_col(row, meta_col, tl.uint8, 0) + qrow, mask=qmask,
                       other=16).to(tl.int32)


@triton.jit
def _store_scales(row, meta_col: tl.constexpr, qrow, qmask, scales, MASKED: tl.constexpr,
                  COMPILED: tl.constexpr):
    """Store a tile's scale bytes (as :func:`_load_scales` reads them; every thread that holds
    a row writes the same byte)."""
    if COMPILED:
        addr = tl.load(row + meta_col) + qrow
        if MASKED:
            tl.inline_asm_elementwise(
                "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $3, 0;\n\t"
                "@p st.global.u8 [$1], $2;\n\tmov.u32 $0, 0;\n\t}", "=r,l,r,r",
                [addr, scales, qmask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("st.global.u8 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                                      [addr, scales], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(_col(row, meta_col, tl.uint8, 0) + qrow, scales.to(tl.uint8), mask=qmask)


@triton.jit
def _load(row, col: tl.constexpr, meta_col: tl.constexpr, offs, mask, qrow, qmask,
          S_DT: tl.constexpr, FMT: tl.constexpr, SIGNED: tl.constexpr, VEC: tl.constexpr,
          MASKED: tl.constexpr, COMPILED: tl.constexpr):
    """Decode one state buffer's tile to float32 (masked elements read as 0)."""
    if FMT == FMT_INT8:
        if SIGNED:
            codes = _ld(_col(row, col, tl.int8, VEC) + offs, mask, MASKED)
        else:
            codes = _ld(_col(row, col, tl.uint8, VEC) + offs, mask, MASKED)
        scales = _load_scales(row, meta_col, qrow, qmask, MASKED, COMPILED)
        return mx_decode(codes, scales, SIGNED, COMPILED)
    else:
        return _ld(_col(row, col, S_DT, VEC) + offs, mask, MASKED).to(tl.float32)


@triton.jit
def _store(row, col: tl.constexpr, meta_col: tl.constexpr, x, offs, mask, qrow, qmask, noise,
           S_DT: tl.constexpr, FMT: tl.constexpr, SIGNED: tl.constexpr, VEC: tl.constexpr,
           MASKED: tl.constexpr, COMPILED: tl.constexpr, NOISE: tl.constexpr):
    """Encode a float32 tile into one state buffer (see :mod:`adan.numeric.codes` for the
    codes), rounded with ``noise`` if ``NOISE`` (8-bit codes; bfloat16 always), else to
    nearest."""
    if FMT == FMT_INT8:
        k, scales = mx_encode(x, noise, SIGNED, NOISE, COMPILED)
        if SIGNED:
            _st(_col(row, col, tl.int8, VEC) + offs, k.to(tl.int8), mask, MASKED)
        else:
            _st(_col(row, col, tl.uint8, VEC) + offs, k.to(tl.uint8), mask, MASKED)
        _store_scales(row, meta_col, qrow, qmask, scales, MASKED, COMPILED)
    elif FMT == FMT_BF16:
        _st(_col(row, col, tl.bfloat16, VEC) + offs, round_bf16(x, noise), mask, MASKED)
    else:
        _st(_col(row, col, S_DT, VEC) + offs, cast(x, S_DT), mask, MASKED)


@triton.jit
def _scalars_kernel(
    table, count, scalars, lr_ptr, hyper, keep_value, scale_value,
    STEP_DT: tl.constexpr, NO_PROX: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
    ROWS: tl.constexpr,
):
    """The step's scalars of ``count`` tensors (a row of ``scalars`` each, from their step
    counts before this step), in float64 and rounded once, as adan.kernels.compact does: once
    per step, where every program of the step would compute them in float64. ``hyper`` holds
    float64 ``log(b1), log(b2), log(b3), b2, weight_decay``."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = t < count
    step_ptr = tl.load(table + t * NCOL + COL_STEP, mask=mask, other=0)
    k = tl.load(step_ptr.to(tl.pointer_type(STEP_DT)), mask=mask, other=0).to(tl.float32) + 1.0
    k64 = k.to(tl.float64)
    out = scalars + t * NSCALAR
    tl.store(out + _SC_IBC1, (1.0 / -expm1(k64 * tl.load(hyper))).to(tl.float32), mask=mask)
    tl.store(out + _SC_B2BC2,
             (tl.load(hyper + 3) / -expm1(k64 * tl.load(hyper + 1))).to(tl.float32), mask=mask)
    tl.store(out + _SC_IBC3, (1.0 / tl.sqrt(-expm1(k64 * tl.load(hyper + 2)))).to(tl.float32),
             mask=mask)
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
    tl.store(out + _SC_KEEP, tl.full((ROWS,), 0.0, tl.float32) + keep, mask=mask)
    tl.store(out + _SC_SCALE, tl.full((ROWS,), 0.0, tl.float32) + scale, mask=mask)


@triton.jit
def _adan_kernel(
    table, tiles, grads, counters, factor_ptr, scalars,
    beta1, omb1, beta2, omb2, beta3, omb3, eps,
    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, STEP_DT: tl.constexpr,
    FMT: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_FACTOR: tl.constexpr,
    SR_PARAM: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr,
    TILE: tl.constexpr, QBLOCK: tl.constexpr, COMPILED: tl.constexpr,
):
    """One tile of one tensor per program: load, Adan's step in float32, store; the step's
    scalars from ``scalars``, which :func:`_scalars_kernel` wrote before this launch.
    ``COMPILED``: not run by Triton's interpreter, which cannot run inline PTX."""
    # Vector accesses promised to the compiler, in elements: 16 bytes of the widest dtype,
    # so that every tensor of a tile takes one layout (a thread's elements in 16-byte
    # accesses of the widest, narrower ones in narrower accesses) rather than the compiler
    # converting between layouts through shared memory; with 8-bit codes 4 elements, so that
    # code tiles take the float32 tiles' layout and a block stays in one warp.
    WIDEST: tl.constexpr = max(P_DT.primitive_bitwidth, G_DT.primitive_bitwidth,
                               S_DT.primitive_bitwidth) // 8
    VEC: tl.constexpr = (4 if FMT == FMT_INT8 else 16 // WIDEST) if ALIGNED else 0
    pid = tl.program_id(0)
    t = tl.load(tiles + 2 * pid).to(tl.int64)
    tile = tl.load(tiles + 2 * pid + 1).to(tl.int64)
    row = table + t * NCOL
    numel = tl.load(row + COL_NUMEL)
    step_ptr = tl.load(row + COL_STEP).to(tl.pointer_type(STEP_DT))
    k_old = tl.load(step_ptr).to(tl.float32)
    k = k_old + 1.0

    factor = tl.full((), 1.0, tl.float32)
    if HAS_FACTOR:
        factor = tl.load(factor_ptr).to(tl.float32)
    go = (factor - factor) == 0.0  # a non-finite factor skips the whole step
    if MAXIMIZE:
        factor = -factor

    if go:
        sc = scalars + t * NSCALAR
        ibc1 = tl.load(sc + _SC_IBC1)
        b2bc2 = tl.load(sc + _SC_B2BC2)
        ibc3 = tl.load(sc + _SC_IBC3)
        keep = tl.load(sc + _SC_KEEP)
        scale = tl.load(sc + _SC_SCALE)

        SUBTILES: tl.constexpr = BLOCK // TILE
        EXTRA_ROW: tl.constexpr = 1 if FMT == FMT_INT8 else 0
        # 8-bit state: a tile is ROWS blocks of QBLOCK, each in 8 threads of one warp (4
        # elements per thread), so that a block's max takes shuffles; else one row.
        QB: tl.constexpr = QBLOCK if FMT == FMT_INT8 else TILE
        ROWS: tl.constexpr = TILE // QB
        if FMT != FMT_FLOAT or SR_PARAM:  # the noise of adan.kernels.compact.noise_word
            seed = tl.load(tl.load(row + COL_SEED).to(tl.pointer_type(tl.int64)))
            key = seed.to(tl.uint32) ^ mix32(k.to(tl.uint32))
        for sub in tl.static_range(SUBTILES):
            first = (tile * SUBTILES + sub) * TILE
            # A partial tile skips its sub-tiles past the tensor's end, but for the one that
            # holds the extra scale byte of 8-bit state.
            if not MASKED or first < numel + EXTRA_ROW:
                qrow = first // QB + tl.arange(0, ROWS)
                offs = qrow[:, None] * QB + tl.arange(0, QB)[None, :]
                mask = offs < numel
                qmask = qrow <= numel // QB  # scale bytes: one per started block, plus one
                index = offs.to(tl.uint32)
                p_ptr = _col(row, COL_PARAM, P_DT, VEC) + offs
                p = _ld(p_ptr, mask, MASKED).to(tl.float32)
                g_ptr = _ptr(grads, tl.load(grads + t), G_DT, VEC) + offs
                g = _ld(g_ptr, mask, MASKED).to(tl.float32) * factor
                m = _load(row, COL_M, COL_META_M, offs, mask, qrow, qmask, S_DT, FMT,
                          True, VEC, MASKED, COMPILED)
                v = _load(row, COL_V, COL_META_V, offs, mask, qrow, qmask, S_DT, FMT,
                          True, VEC, MASKED, COMPILED)
                n = _load(row, COL_N, COL_META_N, offs, mask, qrow, qmask, S_DT, FMT,
                          False, VEC, MASKED, COMPILED)
                prev = _load(row, COL_PREV, COL_META_PREV, offs, mask, qrow, qmask, S_DT, FMT,
                             True, VEC, MASKED, COMPILED)
                prev = tl.where(k == 1.0, g, prev)  # g_0 := g_1: the first difference is zero

                diff = g - prev
                m = m * beta1 + g * omb1
                v = v * beta2 + diff * omb2
                nesterov = g + diff * beta2
                n = n * beta3 + nesterov * nesterov * omb3
                denom = tl.sqrt_rn(n) * ibc3 + eps
                # (`/` is an approximate division on a GPU: IEEE's, as the CPU paths divide)
                update = tl.math.div_rn(m * ibc1 + v * b2bc2, denom)
                new = p * keep - update * scale

                # Rounding noise (StateFormat.noise): bfloat16 16 bits per buffer (two words'
                # halves); 8-bit codes 10 bits of one word each for m, v, n; prev to nearest.
                noise = (0, 0, 0, 0)
                if FMT == FMT_BF16:
                    w0 = noise_word(index, key, 0)
                    w1 = noise_word(index, key, 1)
                    noise = ((w0 & 65535).to(tl.int32), (w0 >> 16).to(tl.int32),
                             (w1 & 65535).to(tl.int32), (w1 >> 16).to(tl.int32))
                elif FMT == FMT_INT8:
                    w0 = noise_word(index, key, 0).to(tl.int32, bitcast=True)
                    noise = (mx_noise(w0, True), mx_noise(w0 >> 10, True),
                             mx_noise(w0 >> 20, False), 0)
                _store(row, COL_M, COL_META_M, m, offs, mask, qrow, qmask, noise[0], S_DT, FMT,
                       True, VEC, MASKED, COMPILED, True)
                _store(row, COL_V, COL_META_V, v, offs, mask, qrow, qmask, noise[1], S_DT, FMT,
                       True, VEC, MASKED, COMPILED, True)
                _store(row, COL_N, COL_META_N, n, offs, mask, qrow, qmask, noise[2], S_DT, FMT,
                       False, VEC, MASKED, COMPILED, True)
                _store(row, COL_PREV, COL_META_PREV, g, offs, mask, qrow, qmask, noise[3], S_DT,
                       FMT, True, VEC, MASKED, COMPILED, False)
                if SR_PARAM:
                    word = noise_word(index, key, 2)
                    _st(p_ptr, round_bf16(new, (word & 65535).to(tl.int32)), mask, MASKED)
                else:
                    _st(p_ptr, cast(new, P_DT), mask, MASKED)

        # The last program of this tensor to finish (in either launch) advances its step,
        # once every warp of this one has read it (warps run apart; the barrier is the CTA's).
        tiles_of_tensor = tl.maximum((numel + BLOCK - 1) // BLOCK, 1)
        tl.debug_barrier()
        done = tl.atomic_add(counters + t, 1)
        last = done == tiles_of_tensor - 1
        tl.store(step_ptr, k.to(STEP_DT), mask=last)
        tl.store(counters + t, 0, mask=last)
