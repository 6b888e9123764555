"""Single-tensor Adan: the readable statement of the algorithm, one parameter at a time.

The reference path for plain state (buffers in the parameter's dtype). It favours clarity over
speed (a few temporaries per tensor) and is the one path that supports ``differentiable=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import (
    StepArgs,
    keep_if_skipped,
    scalars_and_lr,
    step_decision,
    use_tensor_scalars,
)
from adan.numeric.scalars import bias_corrections, real_view, step_as
from adan.state.formats import BUFFER_KEYS


def single_tensor_adan(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], args: StepArgs,
    cache: dict[Any, Any] | None = None,
) -> None:
    """Apply one Adan step to each tensor in place.

    The gradients are cast to the parameter's dtype and scaled by ``args.grad_factor``; the
    user's gradient tensors themselves are never written.
    """
    go = step_decision(args)
    if go is False:
        return
    beta1, beta2, beta3 = args.betas
    tensor_scalars = use_tensor_scalars(args.capturable, [s["step"] for s in states])
    lr = scalars_and_lr(args.lr, tensor_scalars)
    for param, grad, state in zip(params, grads, states, strict=True):
        grad = grad.to(param.dtype)
        if args.grad_factor is not None:
            grad = grad * args.grad_factor.to(grad.device)
        if args.maximize:
            grad = -grad
        param, grad, m, v, n, prev = (
            real_view(t) for t in (param, grad, *(state[k] for k in BUFFER_KEYS))
        )

        step_t = state["step"]
        restore = keep_if_skipped([param, m, v, n, prev, step_t], go)
        if tensor_scalars:
            prev.copy_(torch.where(step_t == 0, grad, prev))
            step_t += 1
            step: Any = step_as(step_t, param)
        else:
            step_t += 1
            step = step_t.item()
            if step == 1:  # g_0 := g_1, so the first difference is zero
                prev.copy_(grad)

        diff = grad - prev
        m.lerp_(grad, 1 - beta1)
        v.lerp_(diff, 1 - beta2)
        nesterov = grad.add(diff, alpha=beta2)
        n.mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)
        prev.copy_(grad)

        bc1, bc2, bc3_sqrt = bias_corrections(step, beta1, beta2, beta3)
        denom = (n.sqrt() / bc3_sqrt).add_(args.eps)
        update = (m / bc1).add_(v * (beta2 / bc2)).div_(denom)
        if args.no_prox:
            param.mul_(1 - lr * args.weight_decay).sub_(update.mul_(lr))
        else:
            param.sub_(update.mul_(lr)).div_(1 + lr * args.weight_decay)
        restore()
