"""CPU Adan compiled by ``torch.compile`` (Inductor's C++/OpenMP backend): one pass per element.

:func:`adan.kernels.compact.tensor_step` compiled with dynamic sizes and the hyperparameters in
a tensor (nothing recompiles for a new lr, step or size), one code object per signature (each
has its own Dynamo cache and graph limit); small plain-state tensors are packed into one call.
Routing gives it plain state; compact state takes the hand-written :mod:`.cpu_native`, though
this kernel steps every format.
"""

from __future__ import annotations

import functools
import os
import shutil
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import StepArgs, count_steps, traced
from adan.kernels.compact import (
    seed_of,
    step_start,
    step_vector,
    tensor_step,
    tensor_views,
)
from adan.numeric.scalars import Scalar
from adan.state.formats import PLAIN, work_dtype

__all__ = ["cpu_compiled_adan", "cpu_compiler_missing"]

# Plain-state tensors below this many elements are packed together into one call.
PACK_MAX = 1 << 16
# Calls below this many elements run single-threaded: forking OpenMP threads costs more than
# the work (milliseconds when the machine is busy).
SERIAL_MAX = 1 << 18


@functools.cache
def _compiled(signature: tuple[Any, ...], serial: bool) -> Callable[..., None]:
    """``tensor_step`` compiled for one signature, on a fresh code object (its own cache)."""
    name = "adan_cpu_" + "_".join(str(x).replace("torch.", "") for x in signature)
    code = tensor_step.__code__.replace(co_name=name)
    fn = types.FunctionType(code, tensor_step.__globals__, name)
    options: dict[str, Any] = {"cpp.threads": 1} if serial else {}
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


def _run(p: Tensor, g: Tensor, buffers: list[Tensor], metas: list[Tensor | None], s: Tensor,
         seed: Tensor, args: StepArgs, may_skip: bool) -> None:
    """One :func:`tensor_step` call, compiled unless compiling already or too small."""
    options = (args.fmt, args.stochastic_param, may_skip)
    if traced() or p.numel() <= 1:
        # Sizes 0 and 1 would specialise the compiled kernel; eager is as fast for them.
        tensor_step(p, g, buffers, metas, s, seed, *options)
        return
    # Flat views of the data only: a parameter's own gradient (which may be of another
    # dtype, torch's ``grad_dtype``) must not reach Dynamo.
    flat = [t.detach().view(-1) for t in (p, g, *buffers)]
    signature = (*options, *(t.dtype for t in flat), s.dtype)
    fn = _compiled(signature, p.numel() < SERIAL_MAX)
    call = (flat[0], flat[1], flat[2:], metas, s, seed, *options)
    try:
        fn(*call)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        # Raised before the compiled code runs (nothing written): a signature's graphs
        # differ only by guards on torch's global state (e.g. the default dtype) and size
        # classes, so a process that changes them often can exhaust Dynamo's limit.
        _warn_once(f"adan: Dynamo's recompile limit was reached for the CPU kernel "
                   f"{signature}; that signature runs eagerly (correct, slower) from now on")
        tensor_step(*call)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def cpu_compiled_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one Adan step to every tensor in place, reading and writing each element once."""
    start = step_start(states, args)
    if start is None:
        return
    go, tensor_scalars, lr = start
    may_skip = go is not True
    packs: dict[tuple[Any, ...], list[int]] = {}
    vectors: dict[tuple[Any, ...], Tensor] = {}

    def scalars(step: Scalar, dtype: torch.dtype, device: torch.device) -> Tensor:
        return step_vector(step, lr, args, dtype, device, tensor_scalars, vectors)

    for i, (param, grad, state) in enumerate(zip(params, grads, states, strict=True)):
        p, g, buffers, metas = tensor_views(param, grad, state)
        dense = all(t.is_contiguous() for t in (p, g, *buffers))
        # Packed tensors share one call: not for parameters rounded stochastically, whose
        # noise follows their own seed and element indices.
        if (args.fmt is PLAIN and not tensor_scalars and not args.rounds_param(param.dtype)
                and (p.numel() < PACK_MAX or not dense)):
            key = (p.dtype, g.dtype, state["step"].item())
            packs.setdefault(key, []).append(i)
            continue
        step: Scalar = state["step"] + 1 if tensor_scalars else state["step"].item() + 1
        s = scalars(step, work_dtype(param), param.device)
        if dense:
            _run(p, g, buffers, metas, s, seed_of(state), args, may_skip)
        else:
            tensor_step(p, g, buffers, metas, s, seed_of(state), args.fmt,
                        args.stochastic_param, may_skip)
    for (_, _, step_value), index in packs.items():
        views = [tensor_views(params[i], grads[i], states[i]) for i in index]
        lists = [[v[0] for v in views], [v[1] for v in views],
                 *([v[2][k] for v in views] for k in range(4))]
        packed = [torch.cat([x.reshape(-1) for x in ts]) for ts in lists]
        s = scalars(step_value + 1, work_dtype(params[index[0]]), packed[0].device)
        _run(packed[0], packed[1], packed[2:], [None] * 4, s, seed_of({}), args, may_skip)
        sizes = [t.numel() for t in lists[0]]
        for k in (0, 2, 3, 4, 5):
            torch._foreach_copy_(lists[k], [chunk.view(x.shape) for chunk, x
                                            in zip(packed[k].split(sizes), lists[k], strict=True)])
    # Counted last, so a kernel that fails to build leaves the step counts as they were.
    count_steps(states, go)


def cpu_compiler_missing() -> str | None:
    """Why the C++ kernel cannot be built here, or None if it can."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None and shutil.which("clang++") is None:
        return f"no C++ compiler found ({compiler!r}); torch.compile needs one on CPU"
    return None
