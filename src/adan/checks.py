"""Validation of Adan's settings: one place for the constructor, param groups and loading.

Every check raises naming the argument (and the param group), the value and the allowed
range, before anything is changed. Value errors are ``ValueError``; contradictory
implementation flags are ``RuntimeError``, as in torch's own optimizers.
"""

from __future__ import annotations

import math
import numbers
from operator import is_not
from typing import Any

from torch import Tensor

from adan.state.dtensor import is_dtensor
from adan.state.formats import normalize_state_dtype

__all__ = ["check_group", "check_params", "check_release", "check_same_max_grad_norm",
           "where"]


def where(index: int | None) -> str:
    """`` in param group N`` for messages about group ``index`` (nothing for the defaults)."""
    return "" if index is None else f" in param group {index}"


def _check_number(name: str, value: Any, index: int | None, allowed: str,
                  ok: Any = lambda x: x >= 0) -> float:
    """``value`` must be a finite real number satisfying ``ok``; returned as a Python float,
    so that a NumPy scalar or an integer reaches every kernel as the same type (Triton
    refuses NumPy scalars and would compile another variant for an integer 0 or 1)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or not ok(value)):
        raise ValueError(f"Invalid {name}{where(index)}: {value!r} (allowed: {allowed})")
    return float(value)


def _check_lr(group: dict[str, Any], index: int | None, read_tensor: bool) -> None:
    """A finite number >= 0 or a 1-element tensor (kept as a 0-d view of it)."""
    lr = group["lr"]
    if not isinstance(lr, Tensor):
        group["lr"] = _check_number("lr", lr, index, "a finite number >= 0, or a 1-element "
                                    "tensor")
        return
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element; lr{where(index)} is a {lr.dtype} "
                         f"tensor of shape {tuple(lr.shape)} (allowed: a 1-element "
                         "floating-point tensor)")
    if lr.is_complex() or not lr.is_floating_point():
        raise ValueError(f"Invalid lr{where(index)}: a {lr.dtype} tensor of shape "
                         f"{tuple(lr.shape)} (allowed: a 1-element floating-point tensor)")
    if lr.dim() != 0:
        group["lr"] = lr = lr.view(())  # torch treats a 1-element tensor as the scalar
    if read_tensor:
        _check_number("lr", lr.item(), index, "a finite value >= 0")


def check_group(group: dict[str, Any], index: int | None = None, *,
                read_tensors: bool = True) -> None:
    """Validate one param group's settings (or the defaults) and normalise them in place.

    ``read_tensors=False`` skips reading a tensor lr's value (a device read) for checks
    made at every step.
    """
    _check_lr(group, index, read_tensors)
    betas = group["betas"]
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 3:
        raise ValueError(f"Invalid betas{where(index)}: {betas!r} (allowed: 3 decay rates "
                         "(b1, b2, b3), each in [0, 1); Adan has three, AdamW two)")
    checked = tuple(_check_number(f"betas[{i}]", beta, index, "a decay rate in [0, 1)",
                                  lambda b: 0 <= b < 1) for i, beta in enumerate(betas))
    if type(betas) is not tuple or any(map(is_not, checked, betas)):
        group["betas"] = checked  # else kept: gradient release's cached steps compare identity
    group["eps"] = _check_number("eps", group["eps"], index, "a finite number >= 0")
    group["weight_decay"] = _check_number("weight_decay", group["weight_decay"], index,
                                          "a finite number >= 0")
    group["max_grad_norm"] = _check_number("max_grad_norm", group["max_grad_norm"], index,
                                           "a finite number >= 0; 0 disables clipping")
    group["state_dtype"] = normalize_state_dtype(group["state_dtype"], where(index))
    if group["foreach"] and group["fused"]:
        raise RuntimeError("foreach=True and fused=True cannot both be set; choose one "
                           "implementation")
    if group["differentiable"] and (group["foreach"] or group["fused"]):
        raise RuntimeError("differentiable=True is supported only by the single-tensor path "
                           "(foreach=False, fused=False)")
    if group["differentiable"] and (group["state_dtype"] not in (None, "param", "fp32")
                                    or group["stochastic_param_rounding"]):
        raise ValueError("differentiable=True is supported only with state in the "
                         "parameter's dtype (state_dtype=None) and "
                         "stochastic_param_rounding=False")


def check_params(params: list[Any], index: int | None = None) -> None:
    """Parameters must be floating-point or complex tensors (an integer one cannot step)."""
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"Adan can only optimize tensors, but parameter {i}"
                            f"{where(index)} is a {type(p).__name__}")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"Invalid parameter {i}{where(index)}: dtype {p.dtype} (allowed: "
                             "floating-point or complex tensors; an integer parameter cannot "
                             "take a fractional update)")


def check_same_max_grad_norm(value: float, first: float, index: int) -> None:
    """Every group must clip with the first group's ``max_grad_norm``: clipping scales all
    gradients by one global norm."""
    if value != first:
        raise ValueError(f"Invalid max_grad_norm in param group {index}: {value!r} (allowed: "
                         f"{first!r}, as in every other group: clipping scales all gradients "
                         "by one global norm)")


def check_release(group: dict[str, Any], params: list[Any], index: int | None = None) -> None:
    """Raise if ``group`` (with ``params``) asks for gradient release that cannot work."""
    release = group.get("gradient_release", False)
    if not isinstance(release, bool):
        raise ValueError(f"Invalid gradient_release{where(index)}: {release!r} (allowed: True "
                         "or False)")
    if not release:
        return
    if group["max_grad_norm"] > 0:
        raise ValueError(
            f"Invalid max_grad_norm{where(index)}: {group['max_grad_norm']!r} with "
            "gradient_release=True (allowed: 0; clipping scales every gradient by the global "
            "norm, which needs all gradients before the first update, while gradient release "
            "steps each parameter as soon as its own gradient is ready)")
    if group["differentiable"]:
        raise ValueError(f"Invalid differentiable{where(index)}: True with "
                         "gradient_release=True (the step would run inside backward)")
    for i, p in enumerate(params):
        if isinstance(p, Tensor) and is_dtensor(p):
            raise ValueError(
                f"Invalid gradient_release{where(index)}: parameter {i} is a DTensor (FSDP2). "
                "FSDP2 writes the reduce-scattered gradient to the sharded parameter in its "
                "post-backward without firing post-accumulate-grad hooks, and torch has no "
                "public hook after that write; step normally (FSDP2 already frees each "
                "unsharded gradient after its reduce-scatter)")
