"""The :class:`Adan` optimizer: the torch.optim facade that validates settings and delegates
stepping to :mod:`adan.stepping`, checkpoints to :mod:`adan.checkpoint`, clipping to
:mod:`adan.distributed` and gradient release to :mod:`adan.release`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, _use_grad_for_differentiable

from adan.checkpoint import convert_foreign_state_dict, prepare_load, saved_state
from adan.checks import check_group, check_params, check_release, check_same_max_grad_norm
from adan.distributed import check_grad_norm_group, grad_factor, scrub_grad_norm_group
from adan.release import GradientRelease
from adan.state.store import StateMap
from adan.stepping import Stepper

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Adan"]


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
        lr: learning rate, a finite number >= 0 or a 1-element tensor. Adan usually takes a
            peak lr several times AdamW's.
        betas: decay rates ``(b1, b2, b3)`` of the gradient, gradient-difference and
            second-moment averages, each in ``[0, 1)``.
        eps: added to the denominator for numerical stability.
        weight_decay: decoupled weight decay (about 0.02 is a good start).
        no_prox: apply weight decay as AdamW does (``p*(1-lr*wd)``) instead of the proximal
            form ``p/(1+lr*wd)``.
        max_grad_norm: if positive, gradients of all parameters are scaled together by
            ``min(1, max_grad_norm / (global_norm + eps))`` before the update, with ``eps``
            the first group's. The factor stays on the device (no host synchronisation) and
            the ``.grad`` tensors are not modified. A step whose norm is not finite (an inf or
            NaN gradient) is skipped, leaving params and state as they were, and counted in
            :attr:`skipped_steps`. It is one value for the whole optimizer: every param group
            must have the same.
        grad_norm_group: the process group over which the parameters are partitioned
            disjointly, as ``ZeroRedundancyOptimizer`` does (pass it through ZeRO's keywords):
            the clipping norm then sums the local squared norm over this group (one all-reduce
            per step, on the device; every rank must step). DTensor gradients (FSDP2) are
            already reduced over their mesh and are not summed again. Requires an initialised
            torch.distributed; kept on the optimizer, not in ``param_groups`` or state dicts.
        maximize: ascend the objective instead of descending.
        foreach: ``True`` for the multi-tensor eager implementation (compact state, which has
            none, takes its own eager one), ``False`` for the single-tensor one.
        fused: ``True`` demands the device's fused kernel (Triton on CUDA, compiled C++ on
            CPU) and raises if it cannot run; it also tells ``GradScaler`` that the step
            unscales gradients and skips overflow steps itself, as torch's fused optimizers
            do. With both ``None`` the default is the fused kernel on CUDA, and on CPU for
            tensors of 2^16 elements or more and compact state (docs/architecture.md),
            built in the background on first use while the eager path steps (``warm_up()``
            waits for it). ``fused=False`` never runs a fused kernel.
        differentiable: let autograd flow through the step (single-tensor path only).
        capturable: keep every step-dependent scalar on the device, for CUDA graphs (the
            CUDA fused kernel always does). A float lr is fixed in a graph when it is captured
            (the capture warns): pass lr as a CUDA tensor for a scheduler to reach the
            replays. Step once eagerly before each capture (docs/triton.md, "CUDA graphs").
        state_dtype: storage of the four state buffers: ``None`` (default) keeps the
            parameter's dtype (bf16 re-encoded with stochastic rounding, float32 for float16
            parameters); ``"param"`` the parameter's dtype rounded to nearest; ``"fp32"``
            float32 (e.g. for bf16 parameters), ``"bf16"`` bfloat16 (8 B per parameter) or
            ``"int8"`` (blockwise 8-bit codes, 4.19 B). Compact state is re-encoded with
            stochastic rounding after each step; state in another format is converted on
            ``load_state_dict`` and when a group's setting changes. See docs/lowmem.md.
        stochastic_param_rounding: write bfloat16 parameters with stochastic rounding so that
            updates smaller than their precision are not lost (no extra memory).
        gradient_release: step each parameter inside backward as soon as its gradient is
            complete and free that gradient, so the model's gradients never coexist (a group
            setting; see docs/lowmem.md for what it cannot be combined with, and
            :meth:`pause_gradient_release` for gradient accumulation).
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
        state_dtype: str | torch.dtype | None = None,
        stochastic_param_rounding: bool = False,
        gradient_release: bool = False,
    ) -> None:
        check_grad_norm_group(grad_norm_group)
        self._grad_norm_group = grad_norm_group
        self._skips: Tensor | None = None
        self._stepper = Stepper()
        self._release = GradientRelease(self, self._stepper)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
            max_grad_norm=max_grad_norm, maximize=maximize, foreach=foreach, fused=fused,
            differentiable=differentiable, capturable=capturable, state_dtype=state_dtype,
            stochastic_param_rounding=stochastic_param_rounding, gradient_release=gradient_release,
        )
        check_group(defaults)
        check_release(defaults, [])
        super().__init__(params, defaults)
        self.state = StateMap(self.state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__["state"] = StateMap(self.state)
        self.__dict__.setdefault("_grad_norm_group", None)
        self.__dict__.setdefault("_skips", None)
        self.__dict__.setdefault("_stepper", Stepper())
        self._stepper.forget()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # a copy registers its own hooks
        self.__dict__.setdefault("_release", GradientRelease(self, self._stepper))
        self._release.sync()

    @property
    def _step_supports_amp_scaling(self) -> bool:  # read by GradScaler
        """Only ``fused=True`` claims to unscale inside the step, as in torch (else GradScaler
        unscales ``.grad`` itself, which keeps clipping after ``scaler.unscale_`` working);
        releasing optimizers claim it too, so that ``step()`` can refuse the scaler."""
        return bool(self.defaults["fused"]) or self._release.active

    def pause_gradient_release(self, discard: bool = False
                               ) -> contextlib.AbstractContextManager[None]:
        """A context in which backward passes do not step released parameters: they leave
        the gradients to accumulate in ``.grad`` (gradient accumulation: run every backward but
        the last inside it), or with ``discard=True`` drop them, for a backward that reaches
        these parameters but is not meant to step them (a GAN's generator loss reaching the
        discriminator), as AdamW's next ``zero_grad`` would."""
        return self._release.pause(discard)

    def remove_gradient_release(self) -> None:
        """Remove the gradient-release hooks and turn the setting off in every group: from now
        on gradients stay in ``.grad`` until ``step()``."""
        self._release.remove_all()

    def register_ddp(self, model: torch.nn.Module) -> None:
        """With gradient release under ``DistributedDataParallel``: step the released
        parameters of ``model`` (the DDP module) in its communication hook, once each bucket
        is all-reduced, instead of on the local gradient (docs/lowmem.md)."""
        self._release.register_ddp(model)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; with gradient release it also ends the iteration, so that
        the next backward may release again (released parameters hold no gradient)."""
        self._release.new_iteration()
        super().zero_grad(set_to_none)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the clipping norm was not finite (reading it synchronises
        with the device once)."""
        return 0 if self._skips is None else int(self._skips.item())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated as the constructor validates its arguments."""
        scrub_grad_norm_group(param_group, self._grad_norm_group)
        merged = {**self.defaults, **param_group}
        index = len(getattr(self, "param_groups", []))
        check_group(merged, index)
        params = param_group["params"]
        if not isinstance(params, set):  # torch rejects sets (their order is not stable)
            params = param_group["params"] = [params] if isinstance(params, Tensor) else list(
                params)
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            check_params(tensors, index)
            check_release(merged, tensors, index)
        if self.__dict__.get("param_groups"):
            check_same_max_grad_norm(merged["max_grad_norm"],
                                     self.param_groups[0]["max_grad_norm"], index)
        param_group.update({k: merged[k] for k in ("lr", "betas", "eps", "weight_decay",
                                                  "max_grad_norm", "state_dtype")})
        super().add_param_group(param_group)
        self._stepper.forget()
        self._release.sync()

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict; 8-bit state of DTensor (FSDP2) parameters is saved dequantised
        as float32 DTensors, so that ``torch.distributed.checkpoint`` can reshard it."""
        return saved_state(super().state_dict(),
                           [p for g in self.param_groups for p in g["params"]])

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class, by sail-sg/Adan or by timm's Adan.

        The whole dict is checked first; anything wrong raises one ``ValueError`` naming the
        parameter and the problem, leaving the optimizer unchanged. Each group keeps its
        current ``state_dtype``; saved state in another format is converted. Pre-hooks see
        the full dict (and may replace it); post-hooks run once everything is loaded.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = prepare_load(convert_foreign_state_dict(state_dict), self.param_groups,
                                     self.defaults)
        self.__setstate__({"state": state, "param_groups": groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def warm_up(self) -> None:
        """Build the fused kernels the parameters will step with now, and wait for them.

        Without it the first step starts their build in the background and the eager path
        steps, with the same results, until they are ready; a process that needs steady
        timing from its first step (a benchmark) or a CUDA graph capture calls this first.
        """
        self._stepper.warm_up(self.param_groups, self.state)

    @torch.no_grad()
    def restart(self) -> None:
        """Reset every moment and step count, as Algorithm 1 of the paper does on restart.

        The next step starts afresh (bias correction from step 1, a zero first difference),
        keeping the parameters; buffers are zeroed in place, so their memory (and any CUDA
        graph capturing them) stays.
        """
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor) and key != "seed":
                    value.zero_()

    @_use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one step; ``closure``, if given, re-evaluates the model and returns the loss.

        Everything that can fail is checked before any parameter or state is written; a
        steady training loop pays only for reading addresses and launching kernels.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._release.before_step(getattr(self, "grad_scale", None) is not None
                                  or getattr(self, "found_inf", None) is not None)
        self._stepper.step(self.param_groups, self.state, self._grad_factor)
        self._release.free_stepped()
        return loss

    def _grad_factor(self) -> Tensor | None:
        """AMP's unscale times the clipping factor (:func:`adan.distributed.grad_factor`)."""
        factor, self._skips = grad_factor(self.param_groups, self._grad_norm_group,
                                          getattr(self, "grad_scale", None),
                                          getattr(self, "found_inf", None), self._skips)
        return factor
