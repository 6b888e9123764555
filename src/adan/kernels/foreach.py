"""Multi-tensor Adan built from ``torch._foreach_*`` ops, grouped by device and dtype.

Each foreach op is one pass over its tensors; the sequence below is ordered so that the
previous-gradient buffer is reused for the Nesterov term and at most one parameter-sized
temporary is alive at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from adan.kernels.common import Scalar, bias_corrections, scalars_and_lr, step_as


def _uniform(values: Sequence[float]) -> float | list[float]:
    """Collapse a list of equal scalars to one (the scalar overloads are the cheaper ones)."""
    return values[0] if all(x == values[0] for x in values) else list(values)


def multi_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    prev_grads: list[Tensor],
    state_steps: list[Tensor],
    *,
    grad_factor: Tensor | None,
    lr: Scalar,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
    capturable: bool,
) -> None:
    """Apply one Adan step to every tensor in place, one foreach op per pass."""
    if not params:
        return
    tensor_scalars, lr = scalars_and_lr(lr, capturable)
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_diffs, exp_avg_sqs, prev_grads, state_steps]  # type: ignore[list-item]
    )
    for (device, _), (lists, _) in grouped.items():
        p, g, m, v, n, prev, steps = (list(t) for t in lists)  # type: ignore[arg-type]
        for i in range(len(p)):
            if torch.is_complex(p[i]):
                p[i], g[i], m[i], v[i], n[i], prev[i] = (
                    torch.view_as_real(t) for t in (p[i], g[i], m[i], v[i], n[i], prev[i])
                )

        if grad_factor is not None:
            factor = grad_factor.to(device, non_blocking=True)
            g = list(torch._foreach_mul(g, -factor if maximize else factor))
        elif maximize:
            g = list(torch._foreach_neg(g))

        if steps[0].is_cpu:
            torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(steps, 1.0)

        torch._foreach_lerp_(m, g, 1 - beta1)
        diff = torch._foreach_sub(g, prev)
        torch._foreach_lerp_(v, diff, 1 - beta2)
        del diff
        # prev <- g + b2 * (g - prev), i.e. lerp(prev, g, 1 + b2): the Nesterov-corrected gradient.
        torch._foreach_lerp_(prev, g, 1 + beta2)
        torch._foreach_mul_(n, beta3)
        torch._foreach_addcmul_(n, prev, prev, value=1 - beta3)
        torch._foreach_copy_(prev, g)

        denom = torch._foreach_sqrt(n)
        if tensor_scalars:
            _apply_tensor_scalars(p, m, v, denom, steps, lr, beta1, beta2, beta3, eps,
                                  weight_decay, no_prox)
            continue

        corrections = [bias_corrections(s.item(), beta1, beta2, beta3) for s in steps]
        torch._foreach_div_(denom, _uniform([c[2] for c in corrections]))
        torch._foreach_add_(denom, eps)
        assert isinstance(lr, float | int)
        if no_prox:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(p, m, denom, _uniform([-lr / c[0] for c in corrections]))
        torch._foreach_addcdiv_(
            p, v, denom, _uniform([-lr * beta2 / c[1] for c in corrections])
        )
        if not no_prox:
            torch._foreach_div_(p, 1 + lr * weight_decay)


def _apply_tensor_scalars(
    p: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    denom: list[Tensor],
    steps: list[Tensor],
    lr: Scalar,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
) -> None:
    """Finish the step with bias corrections kept as tensors (no host synchronisation)."""
    corrections = [bias_corrections(step_as(s, p[0]), beta1, beta2, beta3) for s in steps]
    torch._foreach_div_(denom, [c[2] for c in corrections])
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m, [c[0] for c in corrections])
    torch._foreach_add_(update, torch._foreach_mul(v, [beta2 / c[1] for c in corrections]))
    torch._foreach_div_(update, denom)
    torch._foreach_mul_(update, lr)
    if no_prox:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_sub_(p, update)
    else:
        torch._foreach_sub_(p, update)
        torch._foreach_div_(p, 1 + lr * weight_decay)
