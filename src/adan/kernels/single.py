"""Single-tensor Adan: the readable statement of the algorithm, one parameter at a time.

This is the path every other implementation is checked against in spirit; it favours clarity
over speed (it allocates a few temporaries per tensor) and supports ``differentiable=True``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adan.kernels.common import Scalar, bias_corrections, scalars_and_lr, step_as


def single_tensor_adan(
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
    """Apply one Adan step to each tensor in place.

    ``grad_factor`` (a 0-d tensor, e.g. the clipping coefficient) scales every gradient
    before it is used; the user's gradients themselves are never written.
    """
    tensor_scalars, lr = scalars_and_lr(lr, capturable)
    for i, param in enumerate(params):
        grad = grads[i]
        if grad_factor is not None:
            grad = grad * grad_factor.to(grad.device)
        if maximize:
            grad = -grad
        m, v, n, prev = exp_avgs[i], exp_avg_diffs[i], exp_avg_sqs[i], prev_grads[i]
        if torch.is_complex(param):
            param, grad, m, v, n, prev = (
                torch.view_as_real(t) for t in (param, grad, m, v, n, prev)
            )

        step_t = state_steps[i]
        step_t += 1
        step = step_as(step_t, param) if tensor_scalars else step_t.item()

        diff = grad - prev
        m.lerp_(grad, 1 - beta1)
        v.lerp_(diff, 1 - beta2)
        nesterov = grad.add(diff, alpha=beta2)
        n.mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)
        prev.copy_(grad)

        bc1, bc2, bc3_sqrt = bias_corrections(step, beta1, beta2, beta3)
        denom = (n.sqrt() / bc3_sqrt).add_(eps)
        update = (m / bc1).add_(v * (beta2 / bc2)).div_(denom)
        if no_prox:
            param.mul_(1 - lr * weight_decay).sub_(update.mul_(lr))
        else:
            param.sub_(update.mul_(lr)).div_(1 + lr * weight_decay)
