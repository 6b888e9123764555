"""Which kernel runs a set of tensors: the user's choice, or the fastest for the device.

Every kernel has the signature ``kernel(params, grads, states, args)`` (:mod:`.common`). When
the optimizer plans a param group's step it calls :func:`route` once per storage format and
device:

* CUDA: the Triton kernel (:mod:`.cuda_triton`), one launch per group and dtype signature,
  for every group and format; tensors it does not take (float64, non-contiguous) go to the
  eager paths. No ``torch.compile`` and no warm-up beyond Triton's own build (cached on disk).
* CPU: the compiled C++ kernel (:mod:`.cpu_compiled`) for groups whose tensors average at
  least :data:`FUSED_MIN_MEAN_NUMEL` elements and for compact state, else foreach.
* ``foreach=False`` picks the single-tensor eager path (:mod:`.single`, or :mod:`.compact` for
  compact state), ``foreach=True`` the multi-tensor one (compact state has none and takes the
  default), ``fused=True`` demands the device's fused kernel.
* ``differentiable=True`` and tensor subclasses take the single-tensor path, and a step traced
  by ``torch.compile`` the eager paths, which Dynamo traces.

Before its first use for a device, format and dtypes, a fused kernel is built and run on
scratch tensors. If that fails (no C++ compiler, no Triton, a compiler error), the default
falls back to the eager path with one warning and ``fused=True`` raises
``RuntimeError("fused=True cannot run here: ...")``, in both cases before anything is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import StepArgs, real_view
from adan.kernels.compact import compact_adan
from adan.kernels.cpu_compiled import cpu_compiled_adan, cpu_compiler_missing
from adan.kernels.foreach import multi_tensor_adan
from adan.kernels.single import single_tensor_adan
from adan.state import init_state

Kernel = Callable[[list[Tensor], list[Tensor], list[dict[str, Any]], StepArgs], None]

# The CPU default compiles its kernel for a plain-state group whose tensors average at least
# this many elements. Measured on both sides (benchmarks/fused_cutoff.py, 1 thread, 2^16-2^22
# elements in 1, 4, 16 and 64 tensors, docs/benchmarks.md): the compiled kernel wins in every
# case where the tensors reach 2^16 elements each (one tensor from 2^16, 1.5-3.8x; 4 from
# 2^18, 16 from 2^20, 64 from 2^22) and loses below that, where foreach's per-tensor cost is
# the smaller (64 tensors of 2^15: 2.4x slower). A group total cannot tell those apart.
FUSED_MIN_MEAN_NUMEL = 1 << 16

# Outcome of building a fused kernel per (kind, device type, format, param dtype, grad dtype):
# None once it ran, else the exception that stopped it.
_built: dict[tuple[Any, ...], BaseException | None] = {}


def _triton_module() -> Any:
    """:mod:`adan.kernels.cuda_triton`, imported on first use (it needs Triton)."""
    from adan.kernels import cuda_triton

    return cuda_triton


def _probe(kind: str, device: torch.device, fmt: str, dtype: torch.dtype,
           grad_dtype: torch.dtype, options: dict[str, Any]) -> None:
    """Build and run a fused kernel on scratch tensors (no user tensor is touched): on CUDA
    the variants a group with these options steps with (full and partial tiles), so that
    its first step compiles nothing more (Triton's disk cache serves later processes)."""
    if kind == "cpu":
        sizes = [300, 2]  # one compiled (single-threaded) call, and an eager one
        kernel: Kernel = cpu_compiled_adan
    else:
        sizes = [_triton_module().BLOCK + 5]
        kernel = _triton_module().triton_adan
    params = [torch.zeros(k, device=device, dtype=dtype) for k in sizes]
    grads = [torch.ones(k, device=device, dtype=grad_dtype) for k in sizes]
    states = [{**init_state(p, fmt), "seed": torch.zeros((), dtype=torch.int64, device=device)}
              for p in params]
    settings: dict[str, Any] = dict(lr=0.0, beta1=0.9, beta2=0.9, beta3=0.9, eps=1e-8,
                                    weight_decay=0.0, fmt=fmt)
    if options.get("tensor_lr"):
        settings["lr"] = torch.zeros((), device=device)
    if options.get("factor"):
        settings["grad_factor"] = torch.ones((), device=device)
    settings.update({k: v for k, v in options.items() if k in ("no_prox", "maximize",
                                                               "stochastic_param")})
    kernel(params, grads, states, StepArgs(**settings))


def _unavailable(kind: str, device: torch.device) -> str | None:
    if kind == "cpu":
        return cpu_compiler_missing()
    try:
        _triton_module()
    except ImportError as exc:
        return f"Triton is not installed ({exc})"
    return None


def _options(kind: str, group: dict[str, Any]) -> dict[str, Any]:
    """What selects a Triton variant besides dtypes and format (the CPU kernel has one)."""
    if kind == "cpu":
        return {}
    return dict(no_prox=group["no_prox"], maximize=group["maximize"],
                factor=group["max_grad_norm"] > 0, tensor_lr=isinstance(group["lr"], Tensor),
                stochastic_param=group["stochastic_param_rounding"])


def build_error(kind: str, device: torch.device, fmt: str, params: list[Tensor],
                grads: list[Tensor], options: dict[str, Any] | None = None
                ) -> BaseException | None:
    """Build fused kernel ``kind`` ("cpu" or "triton") for these tensors and a group's
    ``options`` (:func:`_options`); the error, if any."""
    options = options or {}
    for p, g in zip(params, grads, strict=True):
        p_dtype, g_dtype = real_view(p).dtype, real_view(g).dtype
        key = (kind, device.type, fmt, p_dtype, g_dtype, *sorted(options.items()))
        if key not in _built:
            try:
                reason = _unavailable(kind, device)
                if reason is not None:
                    raise RuntimeError(reason)
                _probe(kind, device, fmt, p_dtype, g_dtype, options)
                _built[key] = None
            except Exception as exc:  # noqa: BLE001 - any build failure means "cannot fuse"
                _built[key] = exc
        if _built[key] is not None:
            return _built[key]
    return None


Route = list[tuple[Kernel, list[int]]]


def _fused(kind: str, fallback: Kernel, must: bool, params: list[Tensor], grads: list[Tensor],
           states: list[dict[str, Any] | None], fmt: str, group: dict[str, Any]) -> Route:
    """Fused kernel ``kind`` for the tensors it takes (after its build check), ``fallback``
    for the others (Triton's: float64, non-contiguous) or for all where it cannot be built."""
    everything = list(range(len(params)))
    taken = everything
    if kind == "triton":
        unsupported = _triton_module().triton_unsupported
        taken = [i for i in everything if unsupported(params[i], grads[i], states[i]) is None]
    error = build_error(kind, params[0].device, fmt, [params[i] for i in taken],
                        [grads[i] for i in taken], _options(kind, group))
    if error is not None:
        if must:
            raise RuntimeError(f"fused=True cannot run here: {error}") from error
        if not getattr(error, "_adan_warned", False):
            error._adan_warned = True  # type: ignore[attr-defined]
            warnings.warn(f"adan: the fused kernel is unavailable ({error}); using the "
                          "eager implementation instead", RuntimeWarning, stacklevel=5)
        return [(fallback, everything)]
    kernel = cpu_compiled_adan if kind == "cpu" else _triton_module().triton_adan
    rest = sorted(set(everything) - set(taken))
    return [(kernel, taken)] + ([(fallback, rest)] if rest else [])


def route(group: dict[str, Any], fmt: str, params: list[Tensor], grads: list[Tensor],
          states: list[dict[str, Any] | None]) -> Route:
    """The kernels for one device's parameters of one storage format in one param group, each
    with the positions of the parameters it updates (``states``: None where none exists yet).

    Fused kernels are built (and probed) here, so that a failure raises or falls back before
    anything is written.
    """
    everything = list(range(len(params)))
    plain = fmt == "plain" and not group["stochastic_param_rounding"]
    eager = single_tensor_adan if plain else compact_adan
    multi = multi_tensor_adan if plain else compact_adan
    if group["differentiable"] or torch.jit.is_scripting():
        return [(single_tensor_adan, everything)]
    if torch.compiler.is_compiling():
        return [(eager if group["foreach"] is False else multi, everything)]
    device = params[0].device
    kind = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
    if group["fused"]:
        if kind is None:
            raise RuntimeError(f"fused=True cannot run here: there is a fused kernel for CPU "
                               f"and CUDA parameters, not for {device.type}")
        return _fused(kind, multi, True, params, grads, states, fmt, group)
    if group["foreach"] is False:
        return [(eager, everything)]
    if group["foreach"] and plain:
        return [(multi_tensor_adan, everything)]
    if not all(type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params):
        return [(eager, everything)]
    if kind == "triton" or (kind == "cpu" and (
            fmt != "plain"
            or sum(p.numel() for p in params) >= FUSED_MIN_MEAN_NUMEL * len(params))):
        return _fused(kind, multi, False, params, grads, states, fmt, group)
    return [(multi, everything)]
