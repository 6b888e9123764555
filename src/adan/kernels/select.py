"""Which kernel runs a param group: the user's choice, or the fastest measured for the device.

Default (``foreach=None, fused=None``), from ``python -m adan.bench.speed``
(see docs/benchmarks.md): groups of at least :data:`FUSED_MIN_NUMEL` elements on CPU or CUDA
use the fused kernel, whose compilation (seconds, once, cached on disk) then pays for itself;
smaller groups, tensor subclasses and ``differentiable=True`` use the eager paths. If the fused
kernel cannot be built, the default falls back to foreach with one warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adan.kernels.foreach import multi_tensor_adan
from adan.kernels.fused import PACK_MAX, SERIAL_MAX, fused_adan, fused_unavailable_reason
from adan.kernels.single import single_tensor_adan

Kernel = Callable[..., None]

# Smallest group (in elements) for which the default compiles the fused kernel.
FUSED_MIN_NUMEL = 1 << 20

# Outcome of building the fused kernel per (device type, param dtype, grad dtype):
# None once it ran, else the exception that stopped it.
_built: dict[tuple[str, torch.dtype, torch.dtype], BaseException | None] = {}


def _probe(device: torch.device, dtype: torch.dtype, grad_dtype: torch.dtype) -> None:
    """Build and run every fused variant on scratch tensors, so a failure touches no state."""
    sizes = (SERIAL_MAX, PACK_MAX, 2)
    params = [torch.zeros(k, device=device, dtype=dtype) for k in sizes]
    m, v, n, prev = ([torch.zeros_like(p) for p in params] for _ in range(4))
    grads = [torch.ones(k, device=device, dtype=grad_dtype) for k in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    fused_adan(params, grads, m, v, n, prev, steps, grad_factor=None, lr=0.0, beta1=0.9, beta2=0.9,
               beta3=0.9, eps=1e-8, weight_decay=0.0, no_prox=False, maximize=False,
               capturable=False)


def fused_build_error(params: list[Tensor], grads: list[Tensor]) -> BaseException | None:
    """Build the fused kernel for these tensors' devices and dtypes; the error, if it failed."""
    if torch.compiler.is_compiling():
        return None
    for p, g in zip(params, grads, strict=True):
        key = (p.device.type, p.dtype, g.dtype)
        if key not in _built:
            reason = fused_unavailable_reason(p.device)
            try:
                if reason is not None:
                    raise RuntimeError(reason)
                _probe(p.device, p.dtype, g.dtype)
                _built[key] = None
            except Exception as exc:  # noqa: BLE001 - any build failure means "cannot fuse"
                _built[key] = exc
        if _built[key] is not None:
            return _built[key]
    return None


def _fused_or_foreach(*args: Any, **kwargs: Any) -> None:
    """The default's fused kernel, falling back to foreach (one warning) where it cannot build."""
    error = fused_build_error(args[0], args[1])
    if error is None:
        fused_adan(*args, **kwargs)
        return
    if not getattr(error, "_adan_warned", False):
        error._adan_warned = True  # type: ignore[attr-defined]
        warnings.warn(f"adan: the fused kernel is unavailable ({error}); using foreach instead",
                      RuntimeWarning, stacklevel=4)
    multi_tensor_adan(*args, **kwargs)


def _fused_or_raise(*args: Any, **kwargs: Any) -> None:
    """``fused=True``: the fused kernel, or a clear error saying why it cannot run."""
    error = fused_build_error(args[0], args[1])
    if error is not None:
        raise RuntimeError(f"fused=True cannot run here: {error}") from error
    fused_adan(*args, **kwargs)


def select_kernel(group: dict[str, Any], params: list[Tensor]) -> Kernel:
    """The kernel for one param group's step, honouring ``foreach``/``fused`` when set."""
    if group["fused"]:
        return _fused_or_raise
    if group["differentiable"] or torch.jit.is_scripting():
        return single_tensor_adan
    if group["foreach"] is not None:
        return multi_tensor_adan if group["foreach"] else single_tensor_adan
    if not all(type(p) is Tensor or isinstance(p, torch.nn.Parameter) for p in params):
        return single_tensor_adan
    if (group["fused"] is None and not group["capturable"]
            and sum(p.numel() for p in params) >= FUSED_MIN_NUMEL
            and all(p.device.type in ("cpu", "cuda") for p in params)):
        return _fused_or_foreach
    return multi_tensor_adan
