"""Small helpers shared by the update kernels: scalar types, real views, bias corrections."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Scalar = float | Tensor


def use_tensor_scalars(capturable: bool) -> bool:
    """Whether step-dependent scalars must stay tensors (CUDA graphs, ``torch.compile``).

    Outside those, reading a CPU step count with ``.item()`` is faster than tensor arithmetic.
    """
    return capturable or torch.compiler.is_compiling()


def scalars_and_lr(lr: Scalar, capturable: bool) -> tuple[bool, Scalar]:
    """:func:`use_tensor_scalars`, and ``lr`` read to a Python float where tensors are not
    needed."""
    tensor_scalars = use_tensor_scalars(capturable)
    if isinstance(lr, Tensor) and not tensor_scalars:
        return tensor_scalars, lr.item()
    return tensor_scalars, lr


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as its real view (``(..., 2)``); any other tensor unchanged."""
    return torch.view_as_real(t) if torch.is_complex(t) else t


def step_as(step: Tensor, like: Tensor) -> Tensor:
    """The step count on ``like``'s device, in at least float32 and as precise as ``like``."""
    return step.to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def bias_corrections(
    step: Scalar, beta1: float, beta2: float, beta3: float
) -> tuple[Scalar, Scalar, Scalar]:
    """Return ``(1 - b1**k, 1 - b2**k, sqrt(1 - b3**k))`` for a step count ``k``."""
    if isinstance(step, Tensor):
        return 1 - beta1**step, 1 - beta2**step, (1 - beta3**step).sqrt()
    return 1 - beta1**step, 1 - beta2**step, math.sqrt(1 - beta3**step)
