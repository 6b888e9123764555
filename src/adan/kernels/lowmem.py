"""Adan with compact state: bfloat16 or blockwise 8-bit buffers, optional bf16 parameter rounding.

Each step decodes a parameter's four buffers to float32 (float64 for float64 parameters),
applies the ordinary Adan update there, and encodes them again. The update itself uses the
freshly computed full-precision moments; rounding only affects what is carried to the next
step. Re-encoding uses stochastic rounding: Adan's averages move by 1-8 % of their value per
step (decays 0.98, 0.92, 0.99), less than a bf16 or 8-bit step, so round-to-nearest would
freeze them; stochastic rounding keeps every average unbiased at no memory cost.

:func:`adan_lowmem_tensor` is the readable reference of this math; :func:`lowmem_adan` runs it
for a list of parameters, through ``torch.compile`` unless asked for the eager reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import real_view
from adan.quant import dequantize_blockwise, num_blocks, quantize_blockwise, round_to_bf16

__all__ = [
    "STATE_FORMATS",
    "adan_lowmem_tensor",
    "convert_state",
    "lowmem_adan",
    "normalize_state_dtype",
    "state_bytes",
]

STATE_FORMATS = ("fp32", "bf16", "int8")
_ALIASES: dict[Any, str] = {
    "fp32": "fp32", "float32": "fp32", torch.float32: "fp32",
    "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16",
    "int8": "int8", torch.int8: "int8",
}
# (state key, signed code?) for the four buffers.
_BUFFERS = (("exp_avg", True), ("exp_avg_diff", True), ("exp_avg_sq", False), ("prev_grad", True))


def normalize_state_dtype(value: Any) -> str:
    """Map a user's ``state_dtype`` to ``"fp32"``, ``"bf16"`` or ``"int8"``, or raise."""
    try:
        return _ALIASES[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"Invalid state_dtype: {value!r} (allowed: 'fp32', 'bf16', 'int8', "
            "torch.float32, torch.bfloat16)"
        ) from None


def _work_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(real_view(param).dtype, torch.float32)


def _load(state: dict[str, Tensor], key: str, signed: bool, like: Tensor) -> Tensor:
    """Decode buffer ``key`` into a tensor shaped and typed like ``like``."""
    if key + "_scale" in state:
        return dequantize_blockwise(state[key], state[key + "_scale"], like.shape,
                                    signed=signed, dtype=like.dtype)
    return real_view(state[key]).to(like.dtype)


def _encode(
    x: Tensor, fmt: str, signed: bool, stochastic: bool
) -> tuple[Tensor, Tensor | None]:
    """Encode ``x`` in format ``fmt``: the stored tensor and, for int8, its block scales."""
    if fmt == "int8":
        noise = None
        if stochastic:
            noise = torch.rand_like(x)
        return quantize_blockwise(x, signed=signed, noise=noise)
    if fmt == "bf16":
        return (_stochastic_bf16(x) if stochastic else round_to_bf16(x)), None
    return x, None


def _stochastic_bf16(x: Tensor) -> Tensor:
    """``x`` rounded to bfloat16 stochastically (unbiased), with fresh noise."""
    return round_to_bf16(x, torch.randint_like(x, 0, 65536, dtype=torch.int32))


def _store(state: dict[str, Tensor], key: str, x: Tensor, fmt: str, signed: bool,
           stochastic: bool) -> None:
    value, scale = _encode(x, fmt, signed, stochastic)
    state[key].copy_(value)
    if scale is not None:
        state[key + "_scale"].copy_(scale)


def init_state(param: Tensor, fmt: str, step_device: torch.device) -> dict[str, Tensor]:
    """Zeroed state for ``param`` in format ``fmt`` (``prev_grad`` is set by the first step)."""
    real = real_view(param)
    state = {"step": torch.zeros((), dtype=torch.float32, device=step_device)}
    for key, signed in _BUFFERS[:3]:
        if fmt == "int8":
            state[key] = torch.zeros(real.numel(), device=param.device,
                                     dtype=torch.int8 if signed else torch.uint8)
            state[key + "_scale"] = torch.zeros(num_blocks(real.numel()), dtype=torch.float32,
                                                device=param.device)
        else:
            dtype = torch.bfloat16 if fmt == "bf16" else _work_dtype(param)
            state[key] = torch.zeros(real.shape, dtype=dtype, device=param.device)
    return state


def adan_lowmem_tensor(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    *,
    fmt: str,
    step: Tensor,
    lr: Tensor,
    grad_factor: Tensor | None,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
    stochastic: bool,
    stochastic_param: bool,
) -> None:
    """One Adan step for one parameter whose state is stored in format ``fmt``, in place.

    ``step`` is the already-incremented step count and ``lr`` the learning rate, both 0-d
    tensors. ``stochastic`` rounds the re-encoded state stochastically (else to nearest);
    ``stochastic_param`` does the same for the write of a bfloat16 parameter.
    """
    p = real_view(param)
    work = p.to(_work_dtype(param))
    g = real_view(grad).to(work.dtype)
    if grad_factor is not None:
        g = g * grad_factor.to(g.dtype)
    if maximize:
        g = -g
    m = _load(state, "exp_avg", True, work)
    v = _load(state, "exp_avg_diff", True, work)
    n = _load(state, "exp_avg_sq", False, work)
    prev = _load(state, "prev_grad", True, work) if "prev_grad" in state else g

    d = g - prev
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * d
    n = beta3 * n + (1 - beta3) * (g + beta2 * d) ** 2

    k = step.to(work.dtype)
    lr = lr.to(work.dtype)
    denom = n.sqrt() / (1 - beta3**k).sqrt() + eps
    update = (m / (1 - beta1**k) + beta2 * v / (1 - beta2**k)) / denom
    if no_prox:
        new = work * (1 - lr * weight_decay) - lr * update
    else:
        new = (work - lr * update) / (1 + lr * weight_decay)

    if "prev_grad" not in state:
        state["prev_grad"] = torch.empty_like(state["exp_avg"])
        if "exp_avg_scale" in state:
            state["prev_grad_scale"] = torch.empty_like(state["exp_avg_scale"])
    for key, value, signed in (("exp_avg", m, True), ("exp_avg_diff", v, True),
                               ("exp_avg_sq", n, False), ("prev_grad", g, True)):
        _store(state, key, value, fmt, signed, stochastic)
    if stochastic_param and p.dtype == torch.bfloat16:
        p.copy_(_stochastic_bf16(new))
    else:
        p.copy_(new)


_compiled: Callable[..., None] | None = None
_compile_failed = False


def _fast_kernel() -> Callable[..., None]:
    """``adan_lowmem_tensor`` compiled once with dynamic shapes, or the eager one if that fails."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(adan_lowmem_tensor, dynamic=True)
    return _compiled


def lowmem_adan(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Tensor]],
    *,
    fmt: str,
    compiled: bool,
    grad_factor: Tensor | None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
    maximize: bool,
    stochastic_param: bool,
    capturable: bool,
) -> None:
    """Apply one step to every parameter, creating missing state in format ``fmt``.

    ``compiled`` selects the ``torch.compile`` kernel (falling back to eager, with one
    warning, where compilation is unavailable); otherwise the eager reference runs.
    """
    global _compile_failed
    lr_tensor = torch.as_tensor(lr, dtype=torch.float32)
    for param, grad, state in zip(params, grads, states, strict=True):
        if "step" not in state:
            device = param.device if capturable else torch.device("cpu")
            state.update(init_state(param, fmt, device))
        state["step"] += 1
        kwargs: dict[str, Any] = dict(
            fmt=fmt,
            step=state["step"].to(param.device),
            lr=lr_tensor.to(param.device),
            grad_factor=grad_factor,
            beta1=beta1, beta2=beta2, beta3=beta3, eps=eps, weight_decay=weight_decay,
            no_prox=no_prox, maximize=maximize, stochastic=True,
            stochastic_param=stochastic_param,
        )
        if "prev_grad" not in state:
            # The first step of a parameter also allocates prev_grad; keep it out of the graph.
            adan_lowmem_tensor(param, grad, state, **kwargs)
        elif compiled and not _compile_failed and param.is_contiguous():
            # One graph for every shape: the kernel is elementwise, so it sees flat views.
            flat = {k: v.view(-1) for k, v in state.items() if k != "step"}
            try:
                _fast_kernel()(real_view(param).view(-1), real_view(grad).reshape(-1), flat,
                               **kwargs)
            except Exception as exc:  # any compiler or backend failure: fall back to eager
                _compile_failed = True
                warnings.warn(
                    f"adan: torch.compile of the low-memory kernel failed ({exc!r}); "
                    "using the eager implementation", RuntimeWarning, stacklevel=3)
                adan_lowmem_tensor(param, grad, state, **kwargs)
        else:
            adan_lowmem_tensor(param, grad, state, **kwargs)


def _format_of(state: dict[str, Any]) -> str | torch.dtype:
    """``"int8"`` for blockwise codes, else the dtype the buffers are stored in."""
    if "exp_avg_scale" in state:
        return "int8"
    return state["exp_avg"].dtype


def convert_state(state: dict[str, Any], param: Tensor, fmt: str | None) -> None:
    """Re-encode ``state`` in place into format ``fmt`` (None: the parameter's own dtype).

    Conversions round to nearest, so loading is deterministic; matching formats are untouched.
    """
    if "exp_avg" not in state:
        return
    if fmt is None or fmt == "fp32":
        target: str | torch.dtype = real_view(param).dtype if fmt is None else _work_dtype(param)
    else:
        target = "int8" if fmt == "int8" else torch.bfloat16
    if _format_of(state) == target:
        return
    like = torch.empty(real_view(param).shape, dtype=torch.float64, device=param.device)
    for key, signed in _BUFFERS:
        if key not in state:
            continue
        value = _load(state, key, signed, like)
        state.pop(key + "_scale", None)
        if target == "int8":
            state[key], state[key + "_scale"] = quantize_blockwise(value.float(), signed=signed)
        elif torch.is_complex(param) and fmt is None:
            state[key] = torch.view_as_complex(value.to(real_view(param).dtype).contiguous())
        else:
            assert isinstance(target, torch.dtype)
            state[key] = value.to(target)


def state_bytes(states: list[dict[str, Any]]) -> int:
    """Bytes held by the buffers of the given per-parameter states (the step count excluded)."""
    return sum(v.numel() * v.element_size() for s in states for k, v in s.items()
               if k != "step" and isinstance(v, Tensor))
