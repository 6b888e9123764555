"""Which kernel steps which tensors: one table from (device, format, the user's choice).

The choice reads the group's flags as torch's optimizers do: ``fused=True`` the device's fused
kernel or an error, ``fused=False`` never a fused kernel, ``foreach=True`` the multi-tensor
eager path (compact state, which has none, takes its own eager path), ``foreach=False`` the
single-tensor path, neither set the fastest. A fused kernel is built and probed on scratch
tensors before its first use; where that fails the default falls back to the eager path with
one warning and ``fused=True`` raises, before anything is written (docs/architecture.md).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import Kernel, StepArgs
from adan.kernels.compact import compact_adan
from adan.kernels.cpu_compiled import cpu_compiled_adan, cpu_compiler_missing
from adan.kernels.foreach import multi_tensor_adan
from adan.kernels.single import single_tensor_adan
from adan.numeric.scalars import real_view
from adan.state.formats import PLAIN, StateFormat
from adan.state.lifecycle import init_state

__all__ = ["FUSED_MIN_NUMEL", "TABLE", "Route", "choice", "kernel_name", "route"]

FUSED_MIN_NUMEL = 1 << 16
"""By default a CPU tensor of plain state takes the compiled kernel from this many elements
and the multi-tensor path below (docs/benchmarks.md, benchmarks/fused_cutoff.py)."""

Route = list[tuple[Kernel, list[int]]]

# (device type, compact state?, choice) -> kernel name; "*" matches any device. "cpu-default"
# sends each tensor by its size; the fused names fall back to their eager twin.
TABLE: dict[tuple[str, bool, str], str] = {
    ("cuda", False, "default"): "triton",
    ("cuda", True, "default"): "triton",
    ("cpu", False, "default"): "cpu-default",
    ("cpu", True, "default"): "cpu-compiled",
    ("*", False, "default"): "foreach",
    ("*", True, "default"): "compact",
    ("cuda", False, "fused"): "triton",
    ("cuda", True, "fused"): "triton",
    ("cpu", False, "fused"): "cpu-compiled",
    ("cpu", True, "fused"): "cpu-compiled",
    ("*", False, "eager"): "foreach",
    ("*", True, "eager"): "compact",
    ("*", False, "foreach"): "foreach",
    ("*", True, "foreach"): "compact",
    ("*", False, "single"): "single",
    ("*", True, "single"): "compact",
}

_EAGER: dict[str, Kernel] = {"foreach": multi_tensor_adan, "compact": compact_adan,
                             "single": single_tensor_adan}
_FUSED_KIND = {"triton": "triton", "cpu-compiled": "cpu", "cpu-default": "cpu"}

# Outcome of building a fused kernel per (kind, device type, format, dtypes, options): None
# once it ran, else the exception that stopped it.
_built: dict[tuple[Any, ...], BaseException | None] = {}


def choice(group: dict[str, Any]) -> str:
    """The user's choice of implementation, as the table names it."""
    if group["fused"]:
        return "fused"
    if group["foreach"]:
        return "foreach"
    if group["foreach"] is False:
        return "single"
    return "eager" if group["fused"] is False else "default"


def kernel_name(device: str, compact: bool, how: str) -> str | None:
    """The table's entry for a device type, compact state or not, and a :func:`choice`
    (None: no such kernel, e.g. ``fused=True`` for another device)."""
    return TABLE.get((device, compact, how)) or TABLE.get(("*", compact, how))


def _triton_module() -> Any:
    """:mod:`adan.kernels.triton`, imported on first use (it needs Triton)."""
    from adan.kernels import triton as cuda_triton

    return cuda_triton


def _fused_kernel(kind: str) -> Kernel:
    return cpu_compiled_adan if kind == "cpu" else _triton_module().triton_adan


def _probe(kind: str, device: torch.device, fmt: StateFormat, dtype: torch.dtype,
           grad_dtype: torch.dtype, options: dict[str, Any]) -> None:
    """Build and run a fused kernel on scratch tensors (no user tensor is touched): on CUDA
    the variants a group with these options steps with (full and partial tiles)."""
    sizes = [300, 2] if kind == "cpu" else [_triton_module().BLOCK + 5]
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
    _fused_kernel(kind)(params, grads, states, StepArgs(**settings))


def _unavailable(kind: str) -> str | None:
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


def build_error(kind: str, device: torch.device, fmt: StateFormat, params: list[Tensor],
                grads: list[Tensor], options: dict[str, Any] | None = None
                ) -> BaseException | None:
    """Build fused kernel ``kind`` ("cpu" or "triton") for these tensors and a group's
    options; the error, if any (kept: a kernel is built once per process)."""
    options = options or {}
    for p, g in zip(params, grads, strict=True):
        p_dtype, g_dtype = real_view(p).dtype, real_view(g).dtype
        key = (kind, device.type, fmt, p_dtype, g_dtype, *sorted(options.items()))
        if key not in _built:
            try:
                reason = _unavailable(kind)
                if reason is not None:
                    raise RuntimeError(reason)
                _probe(kind, device, fmt, p_dtype, g_dtype, options)
                _built[key] = None
            except Exception as exc:  # noqa: BLE001 - any build failure means "cannot fuse"
                _built[key] = exc
        if _built[key] is not None:
            return _built[key]
    return None


def _fused(kind: str, fallback: Kernel, must: bool, taken: list[int], everything: list[int],
           params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any] | None],
           fmt: StateFormat, group: dict[str, Any]) -> Route:
    """Fused kernel ``kind`` for the positions ``taken`` (after its build check), ``fallback``
    for the others, or for all where it cannot be built."""
    if kind == "triton":
        unsupported = _triton_module().triton_unsupported
        taken = [i for i in taken if unsupported(params[i], grads[i], states[i]) is None]
    error = build_error(kind, params[0].device, fmt, [params[i] for i in taken],
                        [grads[i] for i in taken], _options(kind, group)) if taken else None
    if error is not None:
        if must:
            raise RuntimeError(f"fused=True cannot run here: {error}") from error
        if not getattr(error, "_adan_warned", False):
            error._adan_warned = True  # type: ignore[attr-defined]
            warnings.warn(f"adan: the fused kernel is unavailable ({error}); using the "
                          "eager implementation instead", RuntimeWarning, stacklevel=6)
        return [(fallback, everything)]
    rest = [i for i in everything if i not in set(taken)]
    return ([(_fused_kernel(kind), taken)] if taken else []) + (
        [(fallback, rest)] if rest else [])


def route(group: dict[str, Any], fmt: StateFormat, params: list[Tensor], grads: list[Tensor],
          states: list[dict[str, Any] | None]) -> Route:
    """The kernels for one device's parameters of one storage format in one param group, each
    with the positions of the parameters it updates. Each tensor's route depends on it alone,
    so a part of a group (gradient release) is routed as the whole group would route it."""
    everything = list(range(len(params)))
    compact = fmt is not PLAIN or bool(group["stochastic_param_rounding"])
    if group["differentiable"] or torch.jit.is_scripting():
        return [(single_tensor_adan, everything)]
    how = choice(group)
    if torch.compiler.is_compiling():  # Dynamo traces the eager paths
        how = "single" if how == "single" else "foreach"
    elif how in ("default", "eager") and not all(
            type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params):
        how = "single"  # tensor subclasses
    device = params[0].device.type
    name = kernel_name(device, compact, how)
    if name is None:
        raise RuntimeError(f"fused=True cannot run here: there is a fused kernel for CPU and "
                           f"CUDA parameters, not for {device}")
    if name in _EAGER:
        return [(_EAGER[name], everything)]
    fallback = _EAGER["compact" if compact else "foreach"]
    taken = everything
    if name == "cpu-default":
        taken = [i for i in everything
                 if real_view(params[i]).numel() >= FUSED_MIN_NUMEL]
        if not taken:
            return [(fallback, everything)]
    return _fused(_FUSED_KIND[name], fallback, how == "fused", taken, everything, params,
                  grads, states, fmt, group)
