"""Multi-tensor Adan built from ``torch._foreach_*`` ops, grouped by device and dtype.

Plain state only (buffers in the parameter's dtype). Each foreach op is one pass over its
tensors; the sequence below is ordered so that the previous-gradient buffer is reused for the
Nesterov term and at most one parameter-sized temporary is alive at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from adan.kernels.common import (
    StepArgs,
    keep_if_skipped,
    scalars_and_lr,
    step_decision,
    use_tensor_scalars,
)
from adan.numeric.scalars import Scalar, bias_corrections, real_view, step_as
from adan.state.formats import BUFFER_KEYS


def _uniform(values: Sequence[float]) -> float | list[float]:
    """Collapse a list of equal scalars to one (the scalar overloads are the cheaper ones)."""
    return values[0] if all(x == values[0] for x in values) else list(values)


def multi_tensor_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one Adan step to every tensor in place, one foreach op per pass."""
    go = step_decision(args) if params else False
    if go is False:
        return
    beta1, beta2, beta3 = args.betas
    steps = [s["step"] for s in states]
    tensor_scalars = use_tensor_scalars(args.capturable, steps)
    lr = scalars_and_lr(args.lr, tensor_scalars)
    grads = [g.to(p.dtype) for p, g in zip(params, grads, strict=True)]
    buffers = [[s[k] for s in states] for k in BUFFER_KEYS]
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, *buffers, steps]  # type: ignore[list-item]
    )
    for (device, _), (lists, _) in grouped.items():
        p, g, m, v, n, prev = ([real_view(t) for t in ts] for ts in lists[:6])  # type: ignore[union-attr]
        group_steps: list[Tensor] = list(lists[6])  # type: ignore[arg-type]
        restore = keep_if_skipped([*p, *m, *v, *n, *prev, *group_steps], go)

        if args.grad_factor is not None:
            factor = args.grad_factor.to(device, non_blocking=True)
            g = list(torch._foreach_mul(g, -factor if args.maximize else factor))
        elif args.maximize:
            g = list(torch._foreach_neg(g))

        # g_0 := g_1: where a step count is still 0, the previous gradient is this one.
        if tensor_scalars:
            torch._foreach_lerp_(prev, g, [(s == 0).to(t.dtype) for s, t in zip(
                group_steps, prev, strict=True)])
        else:
            first = [i for i, s in enumerate(group_steps) if s.item() == 0]
            if first:
                torch._foreach_copy_([prev[i] for i in first], [g[i] for i in first])
        if group_steps[0].is_cpu:
            torch._foreach_add_(group_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(group_steps, 1.0)

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
            _apply_tensor_scalars(p, m, v, denom, group_steps, lr, args)
            restore()
            continue

        corrections = [bias_corrections(s.item(), beta1, beta2, beta3) for s in group_steps]
        torch._foreach_div_(denom, _uniform([c[2] for c in corrections]))
        torch._foreach_add_(denom, args.eps)
        assert isinstance(lr, float | int)
        if args.no_prox:
            torch._foreach_mul_(p, 1 - lr * args.weight_decay)
        torch._foreach_addcdiv_(p, m, denom, _uniform([-lr / c[0] for c in corrections]))
        torch._foreach_addcdiv_(
            p, v, denom, _uniform([-lr * beta2 / c[1] for c in corrections])
        )
        if not args.no_prox:
            torch._foreach_div_(p, 1 + lr * args.weight_decay)
        restore()


def _apply_tensor_scalars(
    p: list[Tensor],
    m: list[Tensor],
    v: list[Tensor],
    denom: list[Tensor],
    steps: list[Tensor],
    lr: Scalar,
    args: StepArgs,
) -> None:
    """Finish the step with bias corrections kept as tensors (no host synchronisation)."""
    beta1, beta2, beta3 = args.betas
    corrections = [bias_corrections(step_as(s, p[0]), beta1, beta2, beta3) for s in steps]
    torch._foreach_div_(denom, [c[2] for c in corrections])
    torch._foreach_add_(denom, args.eps)
    update = torch._foreach_div(m, [c[0] for c in corrections])
    torch._foreach_add_(update, torch._foreach_mul(v, [beta2 / c[1] for c in corrections]))
    torch._foreach_div_(update, denom)
    torch._foreach_mul_(update, lr)
    if args.no_prox:
        torch._foreach_mul_(p, 1 - lr * args.weight_decay)
        torch._foreach_sub_(p, update)
    else:
        torch._foreach_sub_(p, update)
        torch._foreach_div_(p, 1 + lr * args.weight_decay)
