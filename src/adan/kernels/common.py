"""What every update kernel shares: the step's settings, real views, accurate bias corrections.

Every kernel has one signature, ``kernel(params, grads, states, args)``: the parameters of one
param group that have gradients, their gradients, their state dicts (``step``, ``exp_avg``,
``exp_avg_diff``, ``exp_avg_sq``, ``prev_grad`` and, for 8-bit state, ``<buffer>_meta``) and a
:class:`StepArgs`. It applies one step in place and counts it in ``state["step"]``.
``prev_grad`` is read only when the step count is at least 1: the first difference is zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

Scalar = float | Tensor

# (state key, signed code?) of the four buffers, in the order every kernel uses them.
BUFFERS = (("exp_avg", True), ("exp_avg_diff", True), ("exp_avg_sq", False), ("prev_grad", True))
BUFFER_KEYS = tuple(key for key, _ in BUFFERS)


@dataclass(frozen=True)
class StepArgs:
    """One param group's settings for one step.

    ``grad_factor`` (a 0-d tensor or None for 1) multiplies every gradient: AMP's unscale times
    the clipping factor. ``fmt`` is the storage format of the states: ``"plain"`` (buffers in
    the parameter's dtype), ``"fp32"`` (float32 buffers for a parameter of another dtype),
    ``"bf16"`` (bfloat16, stochastic rounding) or ``"int8"`` (blockwise codes).
    ``stochastic_param`` writes bfloat16 parameters with stochastic rounding. ``cache`` is a
    dict a kernel may keep data in from one step of the group to the next (the Triton kernel
    keeps its address tables there); the optimizer gives a new one whenever it re-plans the
    group (other parameters, formats, dtypes or state).
    """

    lr: Scalar
    beta1: float
    beta2: float
    beta3: float
    eps: float
    weight_decay: float
    no_prox: bool = False
    maximize: bool = False
    capturable: bool = False
    grad_factor: Tensor | None = None
    fmt: str = "plain"
    stochastic_param: bool = False
    cache: dict[Any, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of_group(cls, group: dict[str, Any], fmt: str, grad_factor: Tensor | None,
                 cache: dict[Any, Any]) -> StepArgs:
        """The settings of param group ``group`` (an optimizer's dict) for a call in ``fmt``."""
        beta1, beta2, beta3 = group["betas"]
        return cls(lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=group["eps"],
                   weight_decay=group["weight_decay"], no_prox=group["no_prox"],
                   maximize=group["maximize"], capturable=group["capturable"],
                   grad_factor=grad_factor, fmt=fmt,
                   stochastic_param=group["stochastic_param_rounding"], cache=cache)

    @property
    def betas(self) -> tuple[float, float, float]:
        return self.beta1, self.beta2, self.beta3

    def rounds_param(self, dtype: torch.dtype) -> bool:
        """Whether parameters of ``dtype`` are written with stochastic rounding."""
        return self.stochastic_param and dtype == torch.bfloat16


def step_decision(args: StepArgs) -> bool | Tensor:
    """Whether the step runs: a non-finite gradient factor (GradScaler found an overflow, or
    the clipping norm is inf/NaN) skips it. ``True`` without a factor; a factor on the CPU
    is read (no synchronisation) outside ``torch.compile``; otherwise a 0-d bool tensor that
    the kernel applies on the device (no host synchronisation, and it steps on ``meta``)."""
    factor = args.grad_factor
    if factor is None:
        return True
    finite = torch.isfinite(factor)
    if factor.is_cpu and not torch.compiler.is_compiling():
        return bool(finite)
    return finite


def keep_if_skipped(tensors: list[Tensor], go: bool | Tensor) -> Callable[[], None]:
    """For an in-place step whose skip is decided on the device: copies of ``tensors`` now,
    and a function that, called after the step, puts them back where ``go`` is false (a
    temporary copy of what the step writes; eager paths only, the fused kernels select as
    they store)."""
    if not isinstance(go, Tensor):
        return lambda: None
    before = [t.clone() for t in tensors]

    def restore() -> None:
        for t, old in zip(tensors, before, strict=True):
            t.copy_(torch.where(go.to(t.device), t, old))

    return restore


def count_step(state: dict[str, Any], go: Literal[True] | Tensor) -> None:
    """Advance a state's step count, unless ``go`` (from :func:`step_decision`) says the step
    was skipped on the device."""
    step = state["step"]
    step += 1 if go is True else go.to(device=step.device, dtype=step.dtype)


def use_tensor_scalars(capturable: bool, steps: list[Tensor]) -> bool:
    """Whether step-dependent scalars must stay tensors: CUDA graphs, ``torch.compile``, or
    step counts kept on an accelerator (reading them would synchronise with it)."""
    return (capturable or torch.compiler.is_compiling()
            or any(not s.is_cpu for s in steps[:1]))


def scalars_and_lr(lr: Scalar, tensor_scalars: bool) -> Scalar:
    """``lr`` read to a Python float where tensors are not needed (a CPU read, no sync)."""
    if isinstance(lr, Tensor) and not tensor_scalars:
        return lr.item()
    return lr


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (``(..., 2)``); any other tensor unchanged."""
    return torch.view_as_real(t) if torch.is_complex(t) else t


def step_as(step: Tensor, like: Tensor) -> Tensor:
    """The step count on ``like``'s device, in at least float32 and as precise as ``like``."""
    return step.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def log_beta(beta: float) -> float:
    """``log(beta)``, with ``-inf`` for 0 (so that ``beta ** k = exp(k * log(beta)) = 0``)."""
    return math.log(beta) if beta > 0 else -math.inf


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype step-dependent scalars are computed in: float64 (float32 on MPS, which has
    no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def bias_correction(beta: float, step: Scalar) -> Scalar:
    """``1 - beta**step``, accurate for betas near 1: ``-expm1(step * log(beta))`` in float64.

    (``1 - beta**k`` in float32 is 0.7 % off at ``beta = 1 - 1e-6`` and 0 at ``1 - 1e-8``.)
    A tensor step gives a float64 tensor (:func:`wide_dtype`), to be rounded once by the
    caller after the rest of its scalar arithmetic.
    """
    if isinstance(step, Tensor):
        return -torch.expm1(step.to(wide_dtype(step.device)) * log_beta(beta))
    return -math.expm1(step * log_beta(beta))


def bias_corrections(step: Scalar, beta1: float, beta2: float, beta3: float
                     ) -> tuple[Scalar, Scalar, Scalar]:
    """Return ``(1 - b1**k, 1 - b2**k, sqrt(1 - b3**k))`` for a step count ``k``."""
    bc3 = bias_correction(beta3, step)
    return (bias_correction(beta1, step), bias_correction(beta2, step),
            bc3.sqrt() if isinstance(bc3, Tensor) else math.sqrt(bc3))
