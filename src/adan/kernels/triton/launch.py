"""The host side of the Triton kernel: which tensors it takes, the per-call plan (address
tables and tiles grouped by launch signature, kept in the caller's cache between steps) and
the launches, without reading device memory on the host."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import triton.language as tl
from torch import Tensor

from adan.kernels.common import StepArgs
from adan.kernels.triton.codes import TRITON_BEFORE_3_8
from adan.kernels.triton.device import (
    COL_M,
    COL_META_M,
    COL_META_N,
    COL_META_PREV,
    COL_META_V,
    COL_N,
    COL_NUMEL,
    COL_PARAM,
    COL_PREV,
    COL_SEED,
    COL_STEP,
    COL_V,
    FMT_INT8,
    NCOL,
    _adan_kernel,
)
from adan.numeric.scalars import decay_factors, log_beta, real_view
from adan.state.formats import BUFFER_KEYS

__all__ = ["BLOCK", "NUM_WARPS", "QBLOCK", "TILE", "register_cap", "triton_adan",
           "triton_unsupported"]

BLOCK = 4096
"""Elements per program."""
TILE = 2048
"""Elements a program updates at a time (BLOCK is a multiple): a multiple of QBLOCK."""
QBLOCK = 32
"""Elements per block of 8-bit state (:data:`adan.numeric.codes.MX_BLOCK`)."""
NUM_WARPS = 8

REGISTER_CAP = 128
"""The registers of 2 CTAs of NUM_WARPS warps per SM: ``maxnreg`` of the variants that would
take more (figures: docs/benchmarks.md, "What the compiled kernel predicts")."""


def register_cap(fmt: int, masked: bool) -> int | None:
    """The ``maxnreg`` launch option of a kernel variant: :data:`REGISTER_CAP` for the 8-bit
    kernel and, with Triton before 3.8, for partial tiles; else None (the compiler's choice)."""
    return REGISTER_CAP if fmt == FMT_INT8 or (masked and TRITON_BEFORE_3_8) else None


# (state key, its column, its 8-bit block data's column) of the four buffers, in table order
_BUFFER_COLUMNS = tuple(zip(BUFFER_KEYS, (COL_M, COL_V, COL_N, COL_PREV),
                            (COL_META_M, COL_META_V, COL_META_N, COL_META_PREV), strict=True))
_ALIGNED_COLUMNS = (COL_PARAM, COL_M, COL_V, COL_N, COL_PREV)
"""The columns whose addresses decide a tensor's alignment (with its gradient's)."""

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}
_ALIGN = 16


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
    """A device array refreshed from host values without blocking the host: copied from a new
    pinned tensor, or during CUDA graph capture from a pinned buffer reserved before and then
    kept for good (the graph copies from it again at every replay)."""

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


def _row(param: Tensor, state: dict[str, Any], no_seed: Tensor) -> list[int]:
    """A tensor's row of the address table (columns: :mod:`adan.kernels.triton.device`)."""
    row = [0] * NCOL.value
    row[COL_PARAM] = param.data_ptr()
    for key, col, meta_col in _BUFFER_COLUMNS:
        row[col] = state[key].data_ptr()
        if key + "_exp" in state:
            row[meta_col] = state[key + "_exp"].data_ptr()
    row[COL_STEP] = state["step"].data_ptr()
    row[COL_NUMEL] = real_view(param).numel()
    row[COL_SEED] = state.get("seed", no_seed).data_ptr()
    return row


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
        row = _row(param, state, no_seed)
        rows.append(row)
        aligned = all(_aligned(row[c]) for c in _ALIGNED_COLUMNS) and _aligned(grad_ptrs[i])
        signature = (real_view(param).dtype, real_view(grads[i]).dtype,
                     real_view(state["exp_avg"]).dtype, state["step"].dtype, aligned)
        by_signature.setdefault(signature, []).append(i)
    parts = []
    for signature, members in by_signature.items():
        table = _Staging(len(members) * NCOL.value, torch.int64, device, keepalive)
        parts.append(_Part(signature, members,
                           table.put([a for i in members for a in rows[i]]),
                           _tiles([rows[i][COL_NUMEL] for i in members], device, keepalive),
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
                BLOCK=BLOCK, TILE=TILE, QBLOCK=QBLOCK, num_warps=NUM_WARPS,
                maxnreg=register_cap(fmt, masked),
            )
