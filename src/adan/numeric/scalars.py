"""The step's scalar arithmetic, shared by every kernel: bias corrections, decay factors."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Scalar = float | Tensor


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
    """``1 - beta**step`` as ``-expm1(step * log(beta))`` in float64, accurate for betas near 1
    (a tensor step gives a tensor of :func:`wide_dtype`, rounded once by the caller)."""
    if isinstance(step, Tensor):
        return -torch.expm1(step.to(wide_dtype(step.device)) * log_beta(beta))
    return -math.expm1(step * log_beta(beta))


def bias_corrections(step: Scalar, beta1: float, beta2: float, beta3: float
                     ) -> tuple[Scalar, Scalar, Scalar]:
    """Return ``(1 - b1**k, 1 - b2**k, sqrt(1 - b3**k))`` for a step count ``k``."""
    bc3 = bias_correction(beta3, step)
    return (bias_correction(beta1, step), bias_correction(beta2, step),
            bc3.sqrt() if isinstance(bc3, Tensor) else math.sqrt(bc3))


def decay_factors(lr: Scalar, weight_decay: float, no_prox: bool) -> tuple[Scalar, Scalar]:
    """``(keep, scale)`` with ``p_new = p * keep - u * scale``: ``(1 - lr*wd, lr)`` for
    decoupled decay, ``(1 / (1 + lr*wd), lr * keep)`` for the proximal form."""
    if no_prox:
        return 1 - lr * weight_decay, lr
    keep = 1 / (1 + lr * weight_decay)
    return keep, lr * keep
