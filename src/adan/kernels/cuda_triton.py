"""CUDA Adan in Triton: one launch per step for all tensors of a group that share dtypes.

The kernel walks a table of the tensors' addresses and sizes. Each program updates one tile
of ``BLOCK`` elements of one tensor, with the math in float32 registers, reading and writing
every element once: param, gradient and the four state buffers, in any storage format (the
parameter's dtype, float32, bfloat16 with stochastic rounding, or 8-bit blockwise codes whose
blocks are tiles' rows, so each program owns its blocks and their meta rows).

Nothing reads device memory on the host. Python-float hyperparameters are kernel arguments;
a tensor lr, the step counts, and the gradient factor (AMP unscale times clipping) are read
by the kernel from device memory. A non-finite factor means "skip this step": no program
writes anything, so a GradScaler overflow or a NaN clipping norm leaves params, state and
step counts as they were without a host synchronisation. Each tensor's step count is
advanced by the last of its programs to finish (a per-tensor completion counter), so that
no program reads a count another has already advanced; the whole step is therefore one launch
and can be captured in a CUDA graph.

The address table is cached between steps (``StepArgs.cache``) and rebuilt only when a
parameter's or gradient's address or shape changes; the upload is one non-blocking copy from
pinned memory. Under Triton's interpreter (``TRITON_INTERPRET=1``) the same kernel runs on
CPU tensors, which is how CI tests it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from adan.kernels.common import BUFFER_KEYS, StepArgs, log_beta, real_view

__all__ = ["BLOCK", "triton_adan", "triton_unsupported"]

BLOCK = 2048
"""Elements per program: a multiple of the 8-bit code's block (256)."""
QBLOCK = 256
NUM_WARPS = 8

# Columns of the address table, one row per tensor: param, grad, m, v, n, prev_grad, step,
# number of (real) elements, and the 8-bit block data of m, v, n, prev_grad (0 if none).
NCOL = 12

_FORMATS = {"plain": 0, "fp32": 0, "bf16": 1, "int8": 2}
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}
_ALIGN = 16


@triton.jit
def _ptr(row, col: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in column ``col`` of a table row, as a pointer to ``DT``.

    Formed as the row's own pointer plus an element offset rather than cast from the integer:
    the compiler knows the row is 16-byte aligned (the table is, and a row is 96 bytes) and,
    with ``ALIGNED``, that so is the offset, so it can use 16-byte loads; a pointer cast from
    an integer would lose that and load one element at a time.
    """
    SIZE: tl.constexpr = DT.primitive_bitwidth // 8
    offset = (tl.load(row + col) - row.to(tl.int64, bitcast=True)) // SIZE
    if ALIGNED:
        offset = tl.multiple_of(offset, 16 // SIZE)
    return row.to(tl.pointer_type(DT), bitcast=True) + offset


@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without cancellation for small ``|x|`` (float32)."""
    series = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (
        1.0 / 120 + x * (1.0 / 720 + x * (1.0 / 5040 + x * (1.0 / 40320))))))))
    return tl.where(tl.abs(x) < 0.25, series, tl.exp(x) - 1.0)


@triton.jit
def _power(u, SIGNED: tl.constexpr):
    """The code's value for ``u = k / levels``: ``u**3`` (signed) or ``u**4``."""
    if SIGNED:
        return u * u * u
    else:
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
          S_DT: tl.constexpr, FMT: tl.constexpr, SIGNED: tl.constexpr, ALIGNED: tl.constexpr,
          MASKED: tl.constexpr):
    """Decode one state buffer's tile to float32 (masked elements read as 0)."""
    if FMT == 2:
        if SIGNED:
            codes = _ld(_ptr(row, col, tl.int8, ALIGNED) + offs, mask, MASKED)
            levels = 127.0
        else:
            codes = _ld(_ptr(row, col, tl.uint8, ALIGNED) + offs, mask, MASKED)
            levels = 255.0
        value = _power(codes.to(tl.float32) / levels, SIGNED)
        meta = _ptr(row, meta_col, tl.float32, False) + qrow * 3
        scale = tl.load(meta, mask=qmask, other=0.0)
        top = tl.load(meta + 1, mask=qmask, other=0.0)
        pos = tl.load(meta + 2, mask=qmask, other=-1.0).to(tl.int32)
        return tl.where(cols[None, :] == pos[:, None], top[:, None], value * scale[:, None])
    else:
        return _ld(_ptr(row, col, S_DT, ALIGNED) + offs, mask, MASKED).to(tl.float32)


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
def _store(row, col: tl.constexpr, meta_col: tl.constexpr, x, offs, mask, qrow, qmask, cols,
           noise16, S_DT: tl.constexpr, FMT: tl.constexpr, SIGNED: tl.constexpr,
           ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Encode a float32 tile into one state buffer (see :mod:`adan.quant` for the codes)."""
    if FMT == 2:
        inf = float("inf")
        mag = tl.where(x != x, inf, tl.abs(x))
        if MASKED:
            mag = tl.where(mask, mag, -1.0)
        pos = tl.argmax(mag, axis=1)
        is_top = cols[None, :] == pos[:, None]
        top = tl.sum(tl.where(is_top, x, 0.0), axis=1)
        rest = tl.where(is_top | (mag == inf) | (mag < 0), 0.0, mag)
        scale = tl.max(rest, axis=1)
        t = tl.minimum(rest / tl.where(scale > 0, scale, 1.0)[:, None], 1.0)
        if SIGNED:
            levels = 127.0
            root = tl.exp(tl.log(tl.maximum(t, 1e-30)) / 3.0)  # 0 for t = 0, without log(0)
        else:
            levels = 255.0
            root = tl.sqrt(tl.sqrt(t))
        lower = tl.minimum(tl.maximum(tl.floor(root * levels), 0.0), levels - 1.0)
        lo = _power(lower / levels, SIGNED)
        hi = _power((lower + 1.0) / levels, SIGNED)
        frac = tl.minimum(tl.maximum((t - lo) / (hi - lo), 0.0), 1.0)
        uniform = (noise16.to(tl.float32) + 0.5) / 65536.0
        k = lower + tl.where(frac > uniform, 1.0, 0.0)
        if SIGNED:
            _st(_ptr(row, col, tl.int8, ALIGNED) + offs, tl.where(x < 0, -k, k).to(tl.int8),
                mask, MASKED)
        else:
            _st(_ptr(row, col, tl.uint8, ALIGNED) + offs, k.to(tl.uint8), mask, MASKED)
        meta = _ptr(row, meta_col, tl.float32, False) + qrow * 3
        tl.store(meta, scale, mask=qmask)
        tl.store(meta + 1, top, mask=qmask)
        tl.store(meta + 2, pos.to(tl.float32), mask=qmask)
    elif FMT == 1:
        _st(_ptr(row, col, tl.bfloat16, ALIGNED) + offs, _round_bf16(x, noise16), mask, MASKED)
    else:
        _st(_ptr(row, col, S_DT, ALIGNED) + offs, _cast(x, S_DT), mask, MASKED)


@triton.jit
def _tile(row, t, tile, numel, k_old, k, factor, lr, seed,
          beta1, omb1, beta2, omb2, beta3, omb3, log_b1, log_b2, log_b3, eps, weight_decay,
          P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, FMT: tl.constexpr,
          NO_PROX: tl.constexpr, SR_PARAM: tl.constexpr, RANDOM: tl.constexpr,
          ALIGNED: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr,
          MASKED: tl.constexpr):
    """Update one tile of one tensor: load, Adan's step in float32, store."""
    ROWS: tl.constexpr = BLOCK // QBLOCK
    cols = tl.arange(0, QBLOCK)
    qrow = tile * ROWS + tl.arange(0, ROWS)
    offs = qrow[:, None] * QBLOCK + cols[None, :]
    mask = offs < numel
    qmask = qrow <= numel // QBLOCK  # meta rows: one per started block, plus one
    if RANDOM:  # 16 random bits per element for each buffer and the parameter
        r0, r1, r2, r3 = tl.randint4x(seed + t, offs + (k.to(tl.int64) << 40))
    else:
        r0 = tl.zeros(offs.shape, tl.uint32)
        r1 = r0
        r2 = r0
    p_ptr = _ptr(row, 0, P_DT, ALIGNED) + offs
    p = _ld(p_ptr, mask, MASKED).to(tl.float32)
    g = _ld(_ptr(row, 1, G_DT, ALIGNED) + offs, mask, MASKED).to(tl.float32) * factor
    m = _load(row, 2, 8, offs, mask, qrow, qmask, cols, S_DT, FMT, True, ALIGNED, MASKED)
    v = _load(row, 3, 9, offs, mask, qrow, qmask, cols, S_DT, FMT, True, ALIGNED, MASKED)
    n = _load(row, 4, 10, offs, mask, qrow, qmask, cols, S_DT, FMT, False, ALIGNED, MASKED)
    prev = _load(row, 5, 11, offs, mask, qrow, qmask, cols, S_DT, FMT, True, ALIGNED, MASKED)
    prev = tl.where(k_old > 0, prev, g)  # g_0 := g_1: the first difference is zero

    bc1 = -_expm1(k * log_b1)
    bc2 = -_expm1(k * log_b2)
    bc3 = -_expm1(k * log_b3)
    diff = g - prev
    m = m * beta1 + g * omb1
    v = v * beta2 + diff * omb2
    nesterov = g + diff * beta2
    n = n * beta3 + nesterov * nesterov * omb3
    denom = tl.sqrt(n) / tl.sqrt(bc3) + eps
    update = (m / bc1 + v * (beta2 / bc2)) / denom
    if NO_PROX:
        new = p * (1.0 - lr * weight_decay) - lr * update
    else:
        new = (p - lr * update) / (1.0 + lr * weight_decay)

    _store(row, 2, 8, m, offs, mask, qrow, qmask, cols, (r0 & 65535).to(tl.int32),
           S_DT, FMT, True, ALIGNED, MASKED)
    _store(row, 3, 9, v, offs, mask, qrow, qmask, cols, (r0 >> 16).to(tl.int32),
           S_DT, FMT, True, ALIGNED, MASKED)
    _store(row, 4, 10, n, offs, mask, qrow, qmask, cols, (r1 & 65535).to(tl.int32),
           S_DT, FMT, False, ALIGNED, MASKED)
    _store(row, 5, 11, g, offs, mask, qrow, qmask, cols, (r1 >> 16).to(tl.int32),
           S_DT, FMT, True, ALIGNED, MASKED)
    if SR_PARAM:
        _st(p_ptr, _round_bf16(new, (r2 & 65535).to(tl.int32)), mask, MASKED)
    else:
        _st(p_ptr, _cast(new, P_DT), mask, MASKED)


@triton.jit(do_not_specialize=["seed"])
def _adan_kernel(
    table, tiles, counters, factor_ptr, lr_ptr, seed,
    lr_value, beta1, omb1, beta2, omb2, beta3, omb3, log_b1, log_b2, log_b3, eps, weight_decay,
    P_DT: tl.constexpr, G_DT: tl.constexpr, S_DT: tl.constexpr, STEP_DT: tl.constexpr,
    FMT: tl.constexpr, NO_PROX: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_FACTOR: tl.constexpr, LR_ON_DEVICE: tl.constexpr, SR_PARAM: tl.constexpr,
    RANDOM: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, QBLOCK: tl.constexpr, NCOL: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tiles + 2 * pid).to(tl.int64)
    tile = tl.load(tiles + 2 * pid + 1).to(tl.int64)
    row = table + t * NCOL
    numel = tl.load(row + 7)
    step_ptr = tl.load(row + 6).to(tl.pointer_type(STEP_DT))
    k_old = tl.load(step_ptr).to(tl.float32)
    k = k_old + 1.0

    factor = tl.full((), 1.0, tl.float32)
    if HAS_FACTOR:
        factor = tl.load(factor_ptr).to(tl.float32)
    go = (factor - factor) == 0.0  # a non-finite factor skips the whole step
    if MAXIMIZE:
        factor = -factor
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = lr_value

    if go:
        if (tile + 1) * BLOCK <= numel:
            _tile(row, t, tile, numel, k_old, k, factor, lr, seed, beta1, omb1, beta2, omb2,
                  beta3, omb3, log_b1, log_b2, log_b3, eps, weight_decay, P_DT, G_DT, S_DT, FMT,
                  NO_PROX, SR_PARAM, RANDOM, ALIGNED, BLOCK, QBLOCK, False)
        else:
            _tile(row, t, tile, numel, k_old, k, factor, lr, seed, beta1, omb1, beta2, omb2,
                  beta3, omb3, log_b1, log_b2, log_b3, eps, weight_decay, P_DT, G_DT, S_DT, FMT,
                  NO_PROX, SR_PARAM, RANDOM, ALIGNED, BLOCK, QBLOCK, True)

        # The last program of this tensor to finish advances its step count.
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


@dataclass
class _Table:
    """One launch's address table on the device, and what it was built from."""

    key: list[int]
    table: Tensor
    tiles: Tensor
    counters: Tensor
    aligned: bool
    keepalive: list[Tensor] = field(default_factory=list)


def _upload(host: Tensor, device: torch.device, keepalive: list[Tensor]) -> Tensor:
    """A host tensor on ``device``, copied without blocking the host.

    During CUDA graph capture the pinned source is kept alive with the table: the captured
    copy reads it again at every replay.
    """
    if device.type != "cuda":
        return host.to(device)
    host = host.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        keepalive.append(host)
    return host.to(device, non_blocking=True)


def _tiles(numels: list[int], device: torch.device, keepalive: list[Tensor]) -> Tensor:
    """(tensor, tile) pairs of every program, int32 (an empty tensor gets one tile, so that
    its step is counted)."""
    counts = torch.tensor([max(1, -(-n // BLOCK)) for n in numels])
    tensor = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    pairs = torch.stack([tensor, torch.arange(tensor.numel()) - first], dim=1)
    return _upload(pairs.to(torch.int32), device, keepalive)


def _build(key: list[int], params: list[Tensor], grads: list[Tensor],
           states: list[dict[str, Any]], previous: _Table | None) -> _Table:
    """The address table of these tensors; the tiles of ``previous`` are reused (sizes do not
    change while the owner's cache lives), and so is what it keeps alive."""
    rows = []
    for param, grad, state in zip(params, grads, states, strict=True):
        metas = [state[k + "_meta"].data_ptr() if k + "_meta" in state else 0
                 for k in BUFFER_KEYS]
        rows.append([param.data_ptr(), grad.data_ptr(),
                     *(state[k].data_ptr() for k in BUFFER_KEYS), state["step"].data_ptr(),
                     real_view(param).numel(), *metas])
    device = params[0].device
    keepalive: list[Tensor] = [] if previous is None else previous.keepalive
    tiles = (_tiles([row[7] for row in rows], device, keepalive) if previous is None
             else previous.tiles)
    return _Table(key=key, table=_upload(torch.tensor(rows, dtype=torch.int64), device, keepalive),
                  tiles=tiles, counters=torch.zeros(len(params), dtype=torch.int32, device=device),
                  aligned=all(a % _ALIGN == 0 for row in rows for a in row[:6]),
                  keepalive=keepalive)


def _launch(params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
            signature: tuple[Any, ...], args: StepArgs, cache: dict[Any, Any]) -> None:
    """One launch over tensors that share their dtypes and device (``signature``)."""
    p_dtype, g_dtype, s_dtype, step_dtype, device = signature
    key = [t.data_ptr() for t in params]
    key += [t.data_ptr() for t in grads]
    table = cache.get(signature)
    if table is None or table.key != key:
        table = cache[signature] = _build(key, params, grads, states, table)
    state_dtype = s_dtype if args.fmt != "int8" else torch.float32
    lr_on_device = isinstance(args.lr, Tensor) and args.lr.device == device
    lr_tensor = args.lr if lr_on_device else table.counters
    factor = (table.counters if args.grad_factor is None
              else args.grad_factor.to(device, non_blocking=True))
    b1, b2, b3 = args.betas
    sr_param = args.rounds_param(p_dtype)
    random = args.rounds_stochastically(p_dtype)
    # At least 2**31, so that Triton always passes it as a 64-bit integer (one compiled kernel).
    seed = 2**31 + (int(torch.randint(0, 2**62, ())) if random else 0)
    grid = (table.tiles.shape[0],)
    _adan_kernel[grid](
        table.table, table.tiles, table.counters, factor, lr_tensor, seed,
        0.0 if lr_on_device else float(args.lr), b1, 1 - b1, b2, 1 - b2, b3, 1 - b3,
        log_beta(b1), log_beta(b2), log_beta(b3), args.eps, args.weight_decay,
        P_DT=_TL_DTYPES[p_dtype], G_DT=_TL_DTYPES[g_dtype], S_DT=_TL_DTYPES[state_dtype],
        STEP_DT=_TL_DTYPES[step_dtype],
        FMT=_FORMATS[args.fmt], NO_PROX=args.no_prox, MAXIMIZE=args.maximize,
        HAS_FACTOR=args.grad_factor is not None, LR_ON_DEVICE=lr_on_device,
        SR_PARAM=sr_param, RANDOM=random,
        ALIGNED=table.aligned, BLOCK=BLOCK, QBLOCK=QBLOCK, NCOL=NCOL, num_warps=NUM_WARPS,
    )


def triton_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs
) -> None:
    """Apply one step to every tensor in place: one launch per (dtypes, device) signature.

    Every tensor must pass :func:`triton_unsupported`; the selector routes others elsewhere.
    ``args.cache`` keeps the address tables: its owner empties it when the tensors' dtypes,
    shapes or state buffers change (addresses alone are checked here, at every step).
    """
    cache = args.cache if args.cache is not None else {}
    groups = cache.get("groups")
    if groups is None or sum(len(index) for _, index in groups) != len(params):
        by_signature: dict[tuple[Any, ...], list[int]] = {}
        for i, (p, g, s) in enumerate(zip(params, grads, states, strict=True)):
            signature = (real_view(p).dtype, real_view(g).dtype, real_view(s["exp_avg"]).dtype,
                         s["step"].dtype, p.device)
            by_signature.setdefault(signature, []).append(i)
        groups = cache["groups"] = list(by_signature.items())
    for signature, index in groups:
        if len(index) == len(params):
            _launch(params, grads, states, signature, args, cache)
        else:
            _launch([params[i] for i in index], [grads[i] for i in index],
                    [states[i] for i in index], signature, args, cache)
