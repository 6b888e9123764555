"""What every update kernel shares: the step's settings, real views, accurate bias corrections.

Every kernel has one signature, ``kernel(params, grads, states, args)``: the parameters of one
param group that have gradients, their gradients, their state dicts (``step``, ``exp_avg``,
``exp_avg_diff``, ``exp_avg_sq``, ``prev_grad`` and, for 8-bit state, ``<buffer>_meta``) and a
:class:`StepArgs`. It applies one step in place and counts it in ``state["step"]``.
``prev_grad`` is read only when the step count is at least 1: the first difference is zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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

    @property
    def betas(self) -> tuple[float, float, float]:
        return self.beta1, self.beta2, self.beta3

    def rounds_param(self, dtype: torch.dtype) -> bool:
        """Whether parameters of ``dtype`` are written with stochastic rounding."""
        return self.stochastic_param and dtype == torch.bfloat16

    def rounds_stochastically(self, dtype: torch.dtype) -> bool:
        """Whether a step of parameters of ``dtype`` rounds anything stochastically (compact
        state, or such parameters): only such a step draws from torch's generator."""
        return self.fmt in ("bf16", "int8") or self.rounds_param(dtype)


def skip_step(args: StepArgs) -> bool:
    """Whether the step must be skipped: a non-finite gradient factor (GradScaler found an
    overflow, or the clipping norm is inf/NaN). Eager kernels read it on the host."""
    return args.grad_factor is not None and not bool(torch.isfinite(args.grad_factor))


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


def bias_correction(beta: float, step: Scalar) -> Scalar:
    """``1 - beta**step``, accurate for betas near 1: ``-expm1(step * log(beta))`` in float64.

    (``1 - beta**k`` in float32 is 0.7 % off at ``beta = 1 - 1e-6`` and 0 at ``1 - 1e-8``.)
    A tensor step gives a tensor in the step's floating dtype (at least float32).
    """
    if isinstance(step, Tensor):
        wide = torch.float32 if step.device.type == "mps" else torch.float64  # MPS has no fp64
        out = -torch.expm1(step.to(wide) * log_beta(beta))
        return out.to(torch.promote_types(step.dtype, torch.float32))
    return -math.expm1(step * log_beta(beta))


def bias_corrections(step: Scalar, beta1: float, beta2: float, beta3: float
                     ) -> tuple[Scalar, Scalar, Scalar]:
    """Return ``(1 - b1**k, 1 - b2**k, sqrt(1 - b3**k))`` for a step count ``k``."""
    bc3 = bias_correction(beta3, step)
    return (bias_correction(beta1, step), bias_correction(beta2, step),
            bc3.sqrt() if isinstance(bc3, Tensor) else math.sqrt(bc3))
