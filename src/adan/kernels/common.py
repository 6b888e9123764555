"""What every update kernel shares: its signature, the step's settings, skipping a step.

Every kernel is ``kernel(params, grads, states, args, cache=None)``: the parameters of one
param group that have gradients, their gradients, their state dicts (``step``, the four
buffers and, for 8-bit state, ``<buffer>_exp``), a :class:`StepArgs` and a dict the kernel
may keep data in between steps of the same plan (the Triton kernel's address tables). It
applies one step in place and counts it in ``state["step"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from adan.numeric.scalars import Scalar
from adan.state.formats import PLAIN, StateFormat

CAPTURED = "captured"
"""The key of a kernel cache's list, owned by the optimizer and kept for its lifetime, where a
kernel keeps what a CUDA graph captured (address tables, pinned buffers, counters): a graph
may replay them after the plan that made them is dropped."""

BUILDING: set[int] = set()
"""Threads building a fused kernel in the background (:mod:`.routing`)."""


def traced() -> bool:
    """Whether Dynamo is tracing this call. ``torch.compiler.is_compiling()`` is folded to True
    in traced code, but in code that runs it reads a process-wide flag, which a background
    build sets while it compiles (Dynamo compiles one thing at a time, so a build running
    means this thread's code is running, not traced)."""
    return torch.compiler.is_compiling() and not BUILDING


class Kernel(Protocol):
    """The one signature of every update kernel."""

    def __call__(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                 args: StepArgs, cache: dict[Any, Any] | None = None) -> None: ...


@dataclass(frozen=True)
class StepArgs:
    """One param group's settings for one step.

    ``grad_factor`` (a 0-d tensor or None for 1) multiplies every gradient: AMP's unscale times
    the clipping factor. ``fmt`` is the states' storage format; ``stochastic_param`` writes
    bfloat16 parameters with stochastic rounding.
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
    fmt: StateFormat = PLAIN
    stochastic_param: bool = False

    @classmethod
    def of_group(cls, group: dict[str, Any], fmt: StateFormat,
                 grad_factor: Tensor | None) -> StepArgs:
        """The settings of param group ``group`` (an optimizer's dict) for a call in ``fmt``."""
        beta1, beta2, beta3 = group["betas"]
        return cls(lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=group["eps"],
                   weight_decay=group["weight_decay"], no_prox=group["no_prox"],
                   maximize=group["maximize"], capturable=group["capturable"],
                   grad_factor=grad_factor, fmt=fmt,
                   stochastic_param=group["stochastic_param_rounding"])

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
    if factor.is_cpu and not traced():
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


def count_steps(states: list[dict[str, Any]], go: Literal[True] | Tensor) -> None:
    """:func:`count_step` for every state: one ``_foreach_add_`` where the step was taken (a
    loop of in-place adds costs microseconds per tensor on the host)."""
    if go is True and states:
        torch._foreach_add_([state["step"] for state in states], 1)
    else:
        for state in states:
            count_step(state, go)


def use_tensor_scalars(capturable: bool, steps: list[Tensor]) -> bool:
    """Whether step-dependent scalars must stay tensors: CUDA graphs, ``torch.compile``, or
    step counts kept on an accelerator (reading them would synchronise with it)."""
    return (capturable or traced()
            or any(not s.is_cpu for s in steps[:1]))


def scalars_and_lr(lr: Scalar, tensor_scalars: bool) -> Scalar:
    """``lr`` read to a Python float where tensors are not needed (a CPU read, no sync); kept a
    tensor where autograd flows into it (a hypergradient under ``differentiable=True``)."""
    if isinstance(lr, Tensor) and not tensor_scalars and not lr.requires_grad:
        return lr.item()
    return lr
