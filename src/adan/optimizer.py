"""The :class:`Adan` optimizer: validates arguments, owns state, dispatches to a kernel."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from adan.compat import convert_foreign_state_dict
from adan.distributed import (
    check_grad_norm_group,
    global_grad_norm,
    reject_dtensors,
    scrub_grad_norm_group,
    to_local_shards,
)
from adan.kernels.common import Scalar, real_view
from adan.kernels.lowmem import convert_state, lowmem_adan, normalize_state_dtype
from adan.kernels.select import select_kernel

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Adan"]

_STATE_KEYS = ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad")


def _check_range(name: str, value: float, allowed: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


class Adan(Optimizer):
    r"""Adan: Adaptive Nesterov Momentum (Xie et al., 2022), a drop-in for ``torch.optim.AdamW``.

    For each step :math:`k` with gradient :math:`g_k` (and :math:`g_0 = g_1`)::

        d = g_k - g_{k-1}
        m = b1*m + (1-b1)*g_k
        v = b2*v + (1-b2)*d
        n = b3*n + (1-b3)*(g_k + b2*d)**2
        u = (m/(1-b1**k) + b2*v/(1-b2**k)) / (sqrt(n)/sqrt(1-b3**k) + eps)
        p = (p - lr*u) / (1 + lr*wd)          # no_prox=False (default)
        p = p*(1 - lr*wd) - lr*u              # no_prox=True

    The betas are decay rates (code convention); the paper writes them as ``1 - beta``.

    Args:
        params: tensors, ``(name, tensor)`` pairs, or dicts defining parameter groups.
        lr: learning rate, a float or a 0-d tensor. Adan usually takes a peak lr several
            times AdamW's.
        betas: decay rates ``(b1, b2, b3)`` of the gradient, gradient-difference and
            second-moment averages, each in ``[0, 1)``.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay (about 0.02 is a good start).
        no_prox: apply weight decay as AdamW does (``p*(1-lr*wd)``) instead of the proximal
            form ``p/(1+lr*wd)``.
        max_grad_norm: if positive, gradients of all parameters are scaled together by
            ``min(1, max_grad_norm / (global_norm + eps))`` before the update, with ``eps``
            the first group's. The factor stays on the device (no host synchronisation) and
            the ``.grad`` tensors are not modified. It is one value for the whole optimizer.
        grad_norm_group: the process group over which the parameters are partitioned
            disjointly, as ``ZeroRedundancyOptimizer`` does (pass it through ZeRO's keywords):
            the clipping norm then sums the local squared norm over this group (one all-reduce
            per step, on the device; every rank must step). DTensor gradients (FSDP2) are
            already reduced over their mesh and are not summed again. Requires an initialised
            torch.distributed; kept on the optimizer, not in ``param_groups`` or state dicts.
        maximize: ascend the objective instead of descending.
        foreach: use the multi-tensor implementation (``False``: one tensor at a time).
        fused: use the single-pass kernel compiled by ``torch.compile`` (CPU, CUDA). With both
            ``None``, large groups on CPU/CUDA use it and fall back to foreach (one warning)
            if it cannot be built; see ``adan.kernels.select``.
        differentiable: let autograd flow through the step (single-tensor path only).
        capturable: keep every step-dependent scalar on the device, for CUDA graphs.
        state_dtype: storage of the four state buffers: ``"fp32"`` (the parameter's dtype,
            16 B per fp32 parameter), ``"bf16"`` (8 B) or ``"int8"`` (blockwise 8-bit codes,
            4.06 B). Compact state is re-encoded with stochastic rounding after each step and
            converted on ``load_state_dict`` when the saved setting differs. See docs/lowmem.md.
        stochastic_param_rounding: write bfloat16 parameters with stochastic rounding so that
            updates smaller than their precision are not lost (no extra memory).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        no_prox: bool = False,
        max_grad_norm: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
        capturable: bool = False,
        grad_norm_group: ProcessGroup | None = None,
        state_dtype: str | torch.dtype = "fp32",
        stochastic_param_rounding: bool = False,
    ) -> None:
        check_grad_norm_group(grad_norm_group)
        self._grad_norm_group = grad_norm_group
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
            _check_range("lr", lr.item(), ">= 0", lr.item() >= 0)
        else:
            _check_range("lr", lr, ">= 0", lr >= 0)
        _check_range("eps", eps, ">= 0", eps >= 0)
        _check_range("weight_decay", weight_decay, ">= 0", weight_decay >= 0)
        _check_range("max_grad_norm", max_grad_norm, ">= 0 (0 disables clipping)",
                     max_grad_norm >= 0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(
                f"Invalid betas: {betas!r} (allowed: a tuple of 3 decay rates, each in [0, 1))"
            )
        for i, beta in enumerate(betas):
            _check_range(f"betas[{i}]", beta, "[0, 1)", 0.0 <= beta < 1.0)
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True; choose one implementation")
        if differentiable and (foreach or fused):
            raise ValueError(
                "differentiable=True is supported only with foreach=False and fused=False"
            )
        state_dtype = normalize_state_dtype(state_dtype)
        if differentiable and (state_dtype != "fp32" or stochastic_param_rounding):
            raise ValueError(
                "differentiable=True is supported only with state_dtype='fp32' and "
                "stochastic_param_rounding=False"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            no_prox=no_prox,
            max_grad_norm=max_grad_norm,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
            capturable=capturable,
            state_dtype=state_dtype,
            stochastic_param_rounding=stochastic_param_rounding,
        )
        super().__init__(params, defaults)

    # GradScaler hands over ``grad_scale`` and ``found_inf``; every kernel unscales through
    # ``grad_factor``, and a step with non-finite gradients changes nothing.
    _step_supports_amp_scaling = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_grad_norm_group", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a ``grad_norm_group`` a wrapper copied into it is kept off the group."""
        scrub_grad_norm_group(param_group, self._grad_norm_group)
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class, by sail-sg/Adan or by timm's Adan.

        Each group keeps its current ``state_dtype``; saved state in another format is converted.
        """
        state_dict = convert_foreign_state_dict(state_dict)
        formats = [normalize_state_dtype(g["state_dtype"]) for g in self.param_groups]
        # The base class would cast every buffer to the parameter's dtype (int8 codes and bf16
        # state included), so buffers bypass it and are only moved to the parameter's device.
        buffers = {pid: {k: v for k, v in s.items() if k != "step"}
                   for pid, s in state_dict["state"].items()}
        super().load_state_dict({
            "state": {pid: {k: v for k, v in s.items() if k == "step"}
                      for pid, s in state_dict["state"].items()},
            "param_groups": state_dict["param_groups"],
        })
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for group, fmt in zip(self.param_groups, formats, strict=True):
            group["state_dtype"] = fmt
        owned = ((p, g) for g in self.param_groups for p in g["params"])
        for pid, (param, group) in zip(saved_ids, owned, strict=True):
            if pid not in buffers:
                continue
            state = self.state[param]
            state.update({k: v.to(param.device) if isinstance(v, Tensor) else v
                          for k, v in buffers[pid].items()})
            convert_state(state, param, self._state_format(group))

    @torch.no_grad()
    def restart(self) -> None:
        """Reset every moment and step count, as Algorithm 1 of the paper does on restart.

        The next step starts afresh (bias correction from step 1, a zero first difference),
        keeping the parameters. Useful after a sudden change of the loss landscape, e.g. a new
        training phase or data distribution, where stale moments would mislead the update.
        Buffers are zeroed in place, so their memory (and any CUDA graph capturing them) stays.
        """
        for state in self.state.values():
            for key in ("step", "exp_avg", "exp_avg_diff", "exp_avg_sq"):
                if key in state:
                    state[key].zero_()
            state.pop("prev_grad", None)

    @staticmethod
    def _state_format(group: dict[str, Any]) -> str | None:
        """The low-memory format of a group's state, or None for the ordinary kernels."""
        if group["state_dtype"] == "fp32" and not group["stochastic_param_rounding"]:
            return None
        return str(group["state_dtype"])

    def _global_grad_factor(self, grad_scale: Tensor | None = None) -> Tensor | None:
        """The factor every gradient is multiplied by, as a device tensor, or None for 1.

        It is ``1 / grad_scale`` (AMP) times the clipping factor ``min(1, max_norm / (norm +
        eps))``, the norm being that of the unscaled gradients.
        """
        unscale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        max_norms = {group["max_grad_norm"] for group in self.param_groups}
        if len(max_norms) > 1:
            raise ValueError(
                f"max_grad_norm must be the same for every param group (got {sorted(max_norms)}):"
                " clipping uses the global norm over all parameters"
            )
        max_norm = max_norms.pop()
        if max_norm <= 0:
            return unscale
        grads = [
            real_view(p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        norm_group = self._grad_norm_group
        if not grads and norm_group is None:
            return unscale
        acc = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        params = (p for group in self.param_groups for p in group["params"])
        device = grads[0].device if grads else next(params, torch.empty(0)).device
        total = global_grad_norm(grads, acc, device, norm_group)
        if unscale is not None:
            total = total * unscale.to(total.device)
        eps = self.param_groups[0]["eps"]
        clip = torch.clamp(max_norm / (total + eps), max=1.0)
        return clip if unscale is None else clip * unscale.to(clip.device)

    def _init_group(
        self,
        group: dict[str, Any],
        grad_factor: Tensor | None,
        tensors: dict[str, list[Tensor]],
    ) -> None:
        """Collect the parameters with gradients, creating their state on first use."""
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adan does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                on_device = group["capturable"]
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if on_device else "cpu"
                )
                for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq"):
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if "prev_grad" not in state:
                # g_0 := g_1: the previous gradient starts as this step's (processed) gradient.
                prev = p.grad.clone(memory_format=torch.preserve_format)
                if grad_factor is not None:
                    prev.mul_(grad_factor.to(prev.device))
                if group["maximize"]:
                    prev.neg_()
                state["prev_grad"] = prev
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            tensors["params"].append(p)
            tensors["grads"].append(p.grad)
            for key in _STATE_KEYS:
                tensors[key].append(state[key])
            tensors["steps"].append(state["step"])

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one step; ``closure``, if given, re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0:
            return loss
        grad_factor = self._global_grad_factor(grad_scale)
        for group in self.param_groups:
            fmt = self._state_format(group)
            if fmt is not None:
                params = [p for p in group["params"] if p.grad is not None]
                if any(p.grad.is_sparse for p in params):
                    raise RuntimeError("Adan does not support sparse gradients")
                reject_dtensors(params, f"state_dtype={fmt!r}")
                beta1, beta2, beta3 = group["betas"]
                lowmem_adan(
                    params, [p.grad for p in params], [self.state[p] for p in params],
                    fmt=fmt, compiled=group["foreach"] is not False, grad_factor=grad_factor,
                    lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, eps=group["eps"],
                    weight_decay=group["weight_decay"], no_prox=group["no_prox"],
                    maximize=group["maximize"],
                    stochastic_param=group["stochastic_param_rounding"],
                    capturable=group["capturable"],
                )
                continue
            tensors: dict[str, list[Tensor]] = {
                k: [] for k in ("params", "grads", *_STATE_KEYS, "steps")
            }
            self._init_group(group, grad_factor, tensors)
            to_local_shards(tensors)
            if not tensors["params"]:
                continue
            beta1, beta2, beta3 = group["betas"]
            select_kernel(group, tensors["params"])(
                tensors["params"],
                tensors["grads"],
                tensors["exp_avg"],
                tensors["exp_avg_diff"],
                tensors["exp_avg_sq"],
                tensors["prev_grad"],
                tensors["steps"],
                grad_factor=grad_factor,
                lr=cast(Scalar, group["lr"]),
                beta1=beta1,
                beta2=beta2,
                beta3=beta3,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                no_prox=group["no_prox"],
                maximize=group["maximize"],
                capturable=group["capturable"],
            )
        return loss
