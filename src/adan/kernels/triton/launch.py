"""The host side of the Triton kernel: which tensors it takes, the per-call plan (address
tables and tiles grouped by launch signature, kept in the caller's cache between steps) and
the launches, without reading device memory on the host."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from adan.kernels.common import CAPTURED, StepArgs
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
    NSCALAR,
    _adan_kernel,
    _scalars_kernel,
)
from adan.kernels.verify import capturing
from adan.numeric.scalars import decay_factors, log_beta, real_view
from adan.state.formats import BUFFER_KEYS
from adan.state.lifecycle import device_mismatch

__all__ = ["BLOCK", "NUM_WARPS", "QBLOCK", "SCALAR_OPTIONS", "SCALAR_ROWS", "TILE",
           "launch_options", "triton_adan", "triton_unsupported"]

BLOCK = 4096
"""Elements per program."""
TILE = 2048
"""Elements a program updates at a time (BLOCK is a multiple): a multiple of QBLOCK."""
QBLOCK = 32
"""Elements per block of 8-bit state (:data:`adan.numeric.codes.MX_BLOCK`)."""
NUM_WARPS = 8

REGISTER_CAP = 128
"""The registers of 2 CTAs of NUM_WARPS warps per SM: ``maxnreg`` of the 8-bit kernel's full
tiles, which would take more (figures: docs/benchmarks.md, "What the compiled kernel
predicts")."""
EDGE_TILE = TILE // 2
"""Elements a program of a partial tile or of a misaligned tensor updates at a time: half of
:data:`TILE`, so that its masks and scalar addresses fit in :data:`REGISTER_CAP` registers."""


COMPILED = not isinstance(_adan_kernel, InterpretedFunction)
"""The kernel is compiled for a GPU, not run by Triton's interpreter (``TRITON_INTERPRET=1``
when it was defined): compiled, it moves 8-bit scale bytes by inline PTX."""
SCALAR_ROWS = 128
"""Tensors per program of the step scalars' launch."""
SCALAR_OPTIONS: dict[str, Any] = {"num_warps": 4, "enable_fp_fusion": False}
"""Its compile options (no contraction, as the CPU paths compute the scalars)."""


def launch_options(fmt: int, masked: bool, aligned: bool = True) -> dict[str, Any]:
    """The tile (``TILE``), ``num_warps`` and ``maxnreg`` of a launch variant: :data:`TILE`
    for aligned full tiles, the bulk of the work (capped at :data:`REGISTER_CAP` registers
    with 8-bit state, the compiler's choice else), :data:`EDGE_TILE` capped for the others,
    so that every variant runs 2 CTAs of NUM_WARPS per SM without spilling. Every variant
    compiles without contracting a multiply and an add into one rounding (ptxas's default,
    which the CPU paths do not do), so that the GPU computes the CPU paths' bits."""
    if aligned and not masked:
        return {"TILE": TILE, "num_warps": NUM_WARPS, "enable_fp_fusion": False,
                **({"maxnreg": REGISTER_CAP} if fmt == FMT_INT8 else {})}
    return {"TILE": EDGE_TILE, "num_warps": NUM_WARPS, "maxnreg": REGISTER_CAP,
            "enable_fp_fusion": False}


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


CAPTURED_PLANS: list[Any] = []
"""Where plans a CUDA graph captured are kept when the caller's cache names no list of its
own (:data:`adan.kernels.common.CAPTURED`): for the life of the process."""

RECAPTURE = ("a second CUDA graph capture with new values for the Triton kernel's address "
             "arrays (gradients allocated at new addresses, or new hyperparameters) and no eager "
             "step since the last capture: capture reads host memory reserved at an eager step "
             "and never allocates pinned memory. Run one eager step (on a side stream, as "
             "torch's recipe does) before each capture")


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current while launching: Triton launches on the current device (and
    its current stream); a guard only where the tensors' device is not the current one."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class _Staging:
    """A device array refreshed from host values without blocking the host: copied from a new
    pinned tensor, or during CUDA graph capture from a pinned buffer reserved at an eager put
    (or kept from an earlier capture of the same values), which is then kept for good, since
    every replay copies from it again. Once a capture used the array, a replay may have
    rewritten it, so every eager put copies."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device = torch.empty(size, dtype=dtype, device=device)
        self.cuda = device.type == "cuda"
        self.spare: Tensor | None = self._host()
        self.captured: dict[tuple[Any, ...], Tensor] = {}  # values: the host array a graph reads
        self.last: list[Any] | None = None

    def put(self, values: list[Any]) -> Tensor:
        """The device array holding ``values`` (copied only if they changed since the last
        eager put and no capture used the array; always during capture)."""
        if capturing(self.device.device):
            return self._capture(values)
        if values == self.last and not self.captured:
            return self.device
        host = self._host()
        if self.spare is None:  # the next capture's
            self.spare = self._host()
        host.numpy()[:] = values  # through NumPy: a third of torch.tensor(values)'s time
        self.device.copy_(host, non_blocking=self.cuda)
        self.last = values
        return self.device

    def _capture(self, values: list[Any]) -> Tensor:
        """Capture a copy of ``values`` from host memory that is never written again."""
        host = self.captured.get(tuple(values))
        if host is None:
            if self.spare is None:
                raise RuntimeError(f"Adan: {RECAPTURE}")
            host, self.spare = self.spare, None
            host.numpy()[:] = values
            self.captured[tuple(values)] = host
        self.device.copy_(host, non_blocking=self.cuda)
        return self.device

    def _host(self) -> Tensor:
        """A host array to copy from: pinned on CUDA, so that the copy does not block."""
        return torch.empty(self.device.shape, dtype=self.device.dtype, pin_memory=self.cuda)


def _upload(values: list[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A new device array holding ``values``, copied from pinned host memory without
    blocking the host (an array that never changes: a table, tiles)."""
    host = torch.empty(len(values), dtype=dtype, pin_memory=device.type == "cuda")
    host.numpy()[:] = values
    return host.to(device, non_blocking=True)


@dataclass
class _Part:
    """The tensors of one launch signature (dtypes, alignment): positions among the call's
    tensors, the address table, the tiles of each kind, the completion counters, the
    gradients' addresses and the step's scalars of each tensor."""

    signature: tuple[Any, ...]
    members: list[int]
    table: Tensor
    tiles: list[tuple[bool, Tensor]]
    counters: Tensor
    grads: _Staging
    scalars: Tensor


@dataclass
class _Plan:
    """A call's parts, valid while the parameters' addresses and the gradients' alignment stay
    as they were built from (the owner renews the cache when tensors or state change).
    ``captured``: a CUDA graph captured its launches, so it is kept while graphs may replay
    them (:data:`adan.kernels.common.CAPTURED`)."""

    params: list[int]
    aligned_grads: list[bool]
    parts: list[_Part]
    hyper: _Staging
    keepalive: list[Tensor] = field(default_factory=list)
    captured: bool = False


def _aligned(address: int) -> bool:
    return address % _ALIGN == 0


def _alignment(addresses: list[int], like: list[bool]) -> list[bool]:
    """Which addresses are 16-byte aligned; ``like`` itself when it says all are and they
    are (the common case: one C call, their greatest common divisor)."""
    if all(like) and not math.gcd(*addresses) % _ALIGN:
        return like
    return [_aligned(a) for a in addresses]


def _tiles(numels: list[int], device: torch.device) -> list[tuple[bool, Tensor]]:
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
        out.append((masked, _upload(pairs.tolist(), torch.int32, device)))
    return out


def _check_sizes(param: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
    """The kernel's bound is the parameter's size: refuse a gradient or buffer of another
    (a parameter whose ``.data`` was replaced by a tensor of another shape keeps its old
    gradient and state, and the owner's plan key, which reads gradients, does not see it),
    and state on another device (its address would be read on the parameter's)."""
    problem = device_mismatch(state, param)
    if problem:
        raise RuntimeError(f"Cannot step a parameter of shape {tuple(param.shape)}: {problem}")
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
        parts.append(_Part(signature, members,
                           _upload([a for i in members for a in rows[i]], torch.int64, device),
                           _tiles([rows[i][COL_NUMEL] for i in members], device),
                           torch.zeros(len(members), dtype=torch.int32, device=device),
                           _Staging(len(members), torch.int64, device),
                           torch.empty(len(members) * NSCALAR.value, dtype=torch.float32,
                                       device=device)))
    return _Plan(params=[p.data_ptr() for p in params],
                 aligned_grads=[_aligned(a) for a in grad_ptrs], parts=parts,
                 hyper=_Staging(5, torch.float64, device), keepalive=[no_seed])


def triton_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one step to every tensor in place: per part (dtypes, alignment), one launch that
    computes its tensors' step scalars, then one per tile kind, on the tensors' device (all
    on one: the caller splits by device).

    Every tensor must pass :func:`triton_unsupported`; the selector routes others elsewhere.
    ``cache`` keeps the plan: its owner empties it when the tensors' dtypes, shapes or
    state change; the parameters' addresses and the gradients' alignment are checked here,
    and the gradients' addresses are sent at every step. A plan that a CUDA graph captured
    is kept in the list ``cache[CAPTURED]`` (else :data:`CAPTURED_PLANS`), so that a re-plan
    never frees what a graph replays.
    """
    cache = {} if cache is None else cache
    device = params[0].device
    capture = capturing(device)
    grad_ptrs = list(map(Tensor.data_ptr, grads))
    plan: _Plan | None = cache.get("plan")
    if (plan is None or plan.params != list(map(Tensor.data_ptr, params))
            or plan.aligned_grads != _alignment(grad_ptrs, plan.aligned_grads)):
        if capture:  # its arrays would be uploaded from pinned memory allocated in capture
            raise RuntimeError(
                "Adan: the Triton kernel's plan is made at an eager step, not during CUDA graph "
                "capture (this is the first step of these parameters, or their addresses, the "
                "gradients' alignment, which parameters have gradients or the state changed "
                "since the last eager step). Run one eager step (on a side stream, as torch's "
                "recipe does) right before capturing")
        plan = cache["plan"] = _build(params, grads, grad_ptrs, states)
    if capture and not plan.captured:
        plan.captured = True
        cache.get(CAPTURED, CAPTURED_PLANS).append(plan)
        if not isinstance(args.lr, Tensor):
            warnings.warn("adan: a float lr (like betas, eps and weight_decay) is fixed in a "
                          "CUDA graph when it is captured: replays ignore later changes, an lr "
                          "scheduler's included. Pass lr as a CUDA tensor (with capturable=True) "
                          "for a schedule to reach the replays", UserWarning, stacklevel=2)
    b1, b2, b3 = args.betas
    hyper = plan.hyper.put([log_beta(b1), log_beta(b2), log_beta(b3), b2, args.weight_decay])
    # A tensor lr is read by the kernel, copied to the parameters' device if it is on another
    # accelerator (reading it on the host would wait for that one); one in host memory is read.
    lr: Tensor | None = None
    if isinstance(args.lr, Tensor) and (args.lr.device == device or not args.lr.is_cpu):
        lr = args.lr.to(device, non_blocking=True)
        keep = scale = 0.0
    else:
        keep, scale = map(float, decay_factors(float(args.lr), args.weight_decay, args.no_prox))
    factor = None if args.grad_factor is None else args.grad_factor.to(device, non_blocking=True)
    fmt = args.fmt.triton_code
    with _device_guard(device):
        for part in plan.parts:
            p_dtype, g_dtype, s_dtype, step_dtype, aligned = part.signature
            addresses = part.grads.put(grad_ptrs if len(part.members) == len(params)
                                       else [grad_ptrs[i] for i in part.members])
            state_dtype = s_dtype if not args.fmt.quantized else torch.float32
            count = len(part.members)
            _scalars_kernel[(triton.cdiv(count, SCALAR_ROWS),)](
                part.table, count, part.scalars, part.scalars if lr is None else lr, hyper,
                keep, scale, STEP_DT=_TL_DTYPES[step_dtype], NO_PROX=args.no_prox,
                LR_ON_DEVICE=lr is not None, ROWS=SCALAR_ROWS, **SCALAR_OPTIONS)
            for masked, tiles in part.tiles:
                _adan_kernel[(tiles.shape[0] // 2,)](
                    part.table, tiles, addresses, part.counters,
                    part.counters if factor is None else factor, part.scalars,
                    b1, 1 - b1, b2, 1 - b2, b3, 1 - b3, args.eps,
                    P_DT=_TL_DTYPES[p_dtype], G_DT=_TL_DTYPES[g_dtype],
                    S_DT=_TL_DTYPES[state_dtype], STEP_DT=_TL_DTYPES[step_dtype],
                    FMT=fmt, MAXIMIZE=args.maximize, HAS_FACTOR=factor is not None,
                    SR_PARAM=args.rounds_param(p_dtype), ALIGNED=aligned, MASKED=masked,
                    BLOCK=BLOCK, QBLOCK=QBLOCK, COMPILED=COMPILED,
                    **launch_options(fmt, masked, aligned),
                )
