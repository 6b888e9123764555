"""The first use of a fused kernel variant proves itself on the user's device: steps on scratch
tensors, synchronised, against the same steps computed on the host in float64 within a stated
bound. A fault or a mismatch raises :class:`SelfCheckError`, which :mod:`.routing` turns into
the eager fallback with one warning, or an error under ``fused=True`` (docs/triton.md, "First
use: the self-check")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adan.kernels.common import Kernel, StepArgs
from adan.state.formats import BUFFERS, StateFormat, decode
from adan.state.lifecycle import init_state

__all__ = ["ARITHMETIC", "SelfCheckError", "Variant", "capture_error", "capturing",
           "self_check"]

ARITHMETIC = 1e-5
"""The error allowed for the kernel's float32 arithmetic, relative to the magnitudes each value
sums (about 170 units in float32's last place; storage rounding is allowed on top)."""

BETAS = (0.9, 0.92, 0.99)
LR = 0.05
WEIGHT_DECAY = 0.1
EPS = 1e-8
FACTOR = 0.5
OUTLIER = 1e3
"""One gradient element per tensor this large: an 8-bit block with an outlier."""
GUARD = 7.0
"""The value around a misaligned scratch parameter, which no step may change."""
SEED = 12345


class SelfCheckError(RuntimeError):
    """A fused kernel variant faulted or disagreed with the host's float64 step."""


@dataclass(frozen=True)
class Variant:
    """A fused kernel variant as routing keys it: kind, device, format, dtypes, options."""

    kind: str
    device: torch.device
    fmt: StateFormat
    dtype: torch.dtype
    grad_dtype: torch.dtype
    options: dict[str, Any]

    def __str__(self) -> str:
        options = "".join(f", {k}={v}" for k, v in sorted(self.options.items()))
        return (f"{self.kind} kernel (state {self.fmt}, parameters {_short(self.dtype)}, "
                f"gradients {_short(self.grad_dtype)}{options})")

    def where(self) -> str:
        """The device in words: the GPU's name, or the CPU (for Triton, its interpreter)."""
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)} ({self.device})"
        return "the CPU" + (" (Triton's interpreter)" if self.kind == "triton" else "")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def capturing(device: torch.device | None = None) -> bool:
    """Whether this thread's current CUDA stream is capturing a graph (False without CUDA);
    with ``device``, whether work on it is being captured (False for a device not CUDA's)."""
    if device is not None and device.type != "cuda":
        return False
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def capture_error(kind: str) -> SelfCheckError | None:
    """Why a variant first reached during CUDA graph capture cannot be checked now (the check
    synchronises with the device), or None when no capture is under way."""
    if kind != "triton" or not capturing():
        return None
    return SelfCheckError(
        "the fused kernel's first-use self-check cannot run during CUDA graph capture (it "
        "synchronises with the device): take a few eager steps before capturing, as torch "
        "requires warm-up steps before a capture anyway")


def self_check(kernel: Kernel, variant: Variant, sizes: list[int],
               misaligned: list[int] | None = None) -> None:
    """Run ``kernel`` on scratch tensors of ``sizes`` elements and ``misaligned`` ones (views
    one element into a larger buffer) for two steps and a skipped one, synchronise, and
    compare with float64 on the host; raise :class:`SelfCheckError` naming the variant, the
    device and the fault or the largest distance."""
    try:
        mismatch = _run(kernel, variant, sizes, misaligned or [])
    except Exception as exc:  # noqa: BLE001 - any fault (a CUDA one included) fails the check
        raise SelfCheckError(f"the self-check of the {variant} on {variant.where()} raised "
                             f"{type(exc).__name__}: {exc}") from exc
    if mismatch is not None:
        raise SelfCheckError(f"the self-check of the {variant} on {variant.where()} found "
                             f"{mismatch}")


@dataclass
class _Scratch:
    """The scratch tensors of a check, and by name the buffers the misaligned parameters and
    gradients are views into (their first and last elements are guards)."""

    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict[str, Tensor]]
    bases: list[tuple[str, Tensor]]


def _scratch(v: Variant, sizes: list[int], misaligned: list[int], gen: torch.Generator
             ) -> _Scratch:
    """Random parameters, zeroed state with a seed, gradients to fill; the misaligned ones
    one element into a buffer of guards, so that their addresses are not 16-byte aligned."""
    params, grads, bases = [], [], []
    for i, k in enumerate([*sizes, *misaligned]):
        shift = int(i >= len(sizes))
        base = torch.full((k + 2 * shift,), GUARD, dtype=torch.float64)
        base[shift:shift + k] = torch.randn(k, generator=gen, dtype=torch.float64)
        base = base.to(device=v.device, dtype=v.dtype)
        grad_base = torch.full_like(base, GUARD, dtype=v.grad_dtype)
        params.append(base[shift:shift + k])
        grads.append(grad_base[shift:shift + k])
        if shift:
            bases += [(f"parameter {i}", base), (f"gradient {i}", grad_base)]
    states = [{**init_state(p, v.fmt),
               "seed": torch.full((), SEED, dtype=torch.int64, device=v.device)}
              for p in params]
    return _Scratch(params, grads, states, bases)


def _new_gradients(s: _Scratch, gen: torch.Generator) -> list[Tensor]:
    """Fill the scratch gradients: magnitudes from 1e-4 to 1e2 and one outlier each (the
    second moment spans 12 orders); their values as float64 on the host."""
    out = []
    for grad in s.grads:
        k = grad.numel()
        g = torch.randn(k, generator=gen, dtype=torch.float64)
        g *= 10.0 ** (torch.rand(k, generator=gen, dtype=torch.float64) * 6 - 4)
        g[k // 2] = OUTLIER
        grad.copy_(g)
        out.append(grad.to(device="cpu", dtype=torch.float64, copy=True))
    return out


def _decoded(s: _Scratch, v: Variant) -> list[dict[str, Tensor]]:
    """Each scratch tensor's parameter, buffers (decoded by the format) and step count, as
    float64 on the host (copies: a float64 CPU tensor would be returned as itself)."""
    out = []
    for p, state in zip(s.params, s.states, strict=True):
        values = {"param": p.to(device="cpu", dtype=torch.float64, copy=True),
                  "step": state["step"].to(device="cpu", dtype=torch.float64, copy=True)}
        for key, signed in BUFFERS:
            values[key] = decode(state, key, signed, p, torch.float64).to(
                "cpu", copy=True).reshape(-1)
        out.append(values)
    return out


def _reference(x: dict[str, Tensor], g: Tensor, options: dict[str, Any]
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Adan's step in float64 from decoded values ``x`` and the scaled gradient ``g``, and per
    element how far float32 arithmetic may land from it (before storage rounding): each
    value's error is at most :data:`ARITHMETIC` times the sum of the magnitudes it adds."""
    b1, b2, b3 = BETAS
    k = float(x["step"]) + 1
    prev = g if k == 1 else x["prev_grad"]  # g_0 := g_1
    diff, diff_mag = g - prev, g.abs() + prev.abs()
    m = b1 * x["exp_avg"] + (1 - b1) * g
    m_mag = b1 * x["exp_avg"].abs() + (1 - b1) * g.abs()
    v = b2 * x["exp_avg_diff"] + (1 - b2) * diff
    v_mag = b2 * x["exp_avg_diff"].abs() + (1 - b2) * diff_mag
    nesterov, nesterov_mag = g + b2 * diff, g.abs() + b2 * diff_mag
    n = b3 * x["exp_avg_sq"] + (1 - b3) * nesterov ** 2
    n_err = ARITHMETIC * (b3 * x["exp_avg_sq"].abs() + 3 * (1 - b3) * nesterov_mag ** 2)
    bc1, bc2, bc3 = (1 - b ** k for b in BETAS)

    def denom(nn: Tensor) -> Tensor:
        return nn.clamp(min=0).sqrt() / math.sqrt(bc3) + EPS

    num = m / bc1 + v * (b2 / bc2)
    num_err = ARITHMETIC * (m_mag / bc1 + v_mag * (b2 / bc2))
    update = num / denom(n)
    # the update's interval from its numerator's and denominator's, and its own rounding
    high = (num.abs() + num_err) / denom(n - n_err)
    update_err = high * (1 + ARITHMETIC) - (num.abs() - num_err).clamp(min=0) / denom(n + n_err)
    if options.get("no_prox"):
        keep, scale = 1 - LR * WEIGHT_DECAY, LR
    else:
        keep = 1 / (1 + LR * WEIGHT_DECAY)
        scale = LR * keep
    param = x["param"] * keep - update * scale
    param_err = ARITHMETIC * (x["param"].abs() * keep + update.abs() * scale) + update_err * scale
    values = {"param": param, "exp_avg": m, "exp_avg_diff": v, "exp_avg_sq": n, "prev_grad": g}
    errors = {"param": param_err, "exp_avg": ARITHMETIC * m_mag, "exp_avg_diff": ARITHMETIC * v_mag,
              "exp_avg_sq": n_err, "prev_grad": ARITHMETIC * g.abs()}
    return values, errors


def _compare(s: _Scratch, v: Variant, before: list[dict[str, Tensor]],
             after: list[dict[str, Tensor]], grads: list[Tensor], factor: float
             ) -> str | None:
    """The worst disagreement of one step with the host's, beyond the bound, or None."""
    worst: tuple[float, str] | None = None
    for i, (old, new, g) in enumerate(zip(before, after, grads, strict=True)):
        if float(new["step"]) != float(old["step"]) + 1:
            return (f"tensor {i}'s step count {float(new['step']):g} after step "
                    f"{float(old['step']):g} (it must advance once per step)")
        ref, err = _reference(old, g * factor, v.options)
        param = s.params[i]
        info = torch.finfo(param.dtype)
        # storage rounding of what the kernel computed: as far as err from the reference
        reach = {key: ref[key].abs() + err[key] for key in ref}
        bounds = {"param": err["param"] + reach["param"] * info.eps + info.tiny}
        for key, signed in BUFFERS:
            bounds[key] = err[key] + v.fmt.store_error(reach[key], param, signed)
        for key, bound in bounds.items():
            distance = (new[key] - ref[key]).abs()
            ratio = torch.where(distance <= bound, 0.0, (distance / bound).nan_to_num(math.inf))
            j = int(ratio.argmax())
            if ratio[j] > 0 and (worst is None or float(ratio[j]) > worst[0]):
                worst = (float(ratio[j]), f"{key} of tensor {i} ({param.numel()} elements) at "
                         f"[{j}]: {float(new[key][j])!r}, the float64 reference "
                         f"{float(ref[key][j])!r} (bound {float(bound[j]):.3g})")
    return None if worst is None else worst[1]


def _everything(s: _Scratch) -> list[tuple[str, Tensor]]:
    """Every scratch tensor a step may or may not write, by name."""
    named = [(f"parameter {i}", p) for i, p in enumerate(s.params)]
    named += [(f"gradient {i}", g) for i, g in enumerate(s.grads)]
    named += [(f"{key} of tensor {i}", t) for i, state in enumerate(s.states)
              for key, t in state.items() if isinstance(t, Tensor)]
    named += [(f"the buffer around {name}", base) for name, base in s.bases]
    return named


def _synchronize(device: torch.device) -> None:
    """Wait for the device, so that a fault surfaces here, not at the user's next call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(kernel: Kernel, v: Variant, sizes: list[int], misaligned: list[int]) -> str | None:
    """Two steps (the first sets ``prev_grad := g``) and a step skipped by an infinite gradient
    factor; the first disagreement found, or None."""
    gen = torch.Generator().manual_seed(0)
    s = _scratch(v, sizes, misaligned, gen)
    lr: float | Tensor = torch.tensor(LR, device=v.device) if v.options.get("tensor_lr") else LR
    settings: dict[str, Any] = dict(
        lr=lr, beta1=BETAS[0], beta2=BETAS[1], beta3=BETAS[2], eps=EPS,
        weight_decay=WEIGHT_DECAY, fmt=v.fmt, no_prox=bool(v.options.get("no_prox")),
        maximize=bool(v.options.get("maximize")),
        stochastic_param=bool(v.options.get("stochastic_param")))
    factor = torch.tensor(FACTOR, device=v.device) if v.options.get("factor") else None
    sign = -1.0 if settings["maximize"] else 1.0
    cache: dict[Any, Any] = {}
    for _ in range(2):
        grads = _new_gradients(s, gen)
        before = _decoded(s, v)
        kept = [g.clone() for g in s.grads]
        kernel(s.params, s.grads, s.states, StepArgs(**settings, grad_factor=factor), cache)
        _synchronize(v.device)
        found = _compare(s, v, before, _decoded(s, v), grads,
                         sign * (FACTOR if factor is not None else 1.0))
        found = found or next((f"gradient {i} written" for i, (old, grad) in
                               enumerate(zip(kept, s.grads, strict=True))
                               if not torch.equal(old, grad)), None)
        found = found or _guards_written(s)
        if found is not None:
            return found
    _new_gradients(s, gen)
    named = [(name, t.clone()) for name, t in _everything(s)]
    skip = torch.tensor(math.inf, device=v.device)
    kernel(s.params, s.grads, s.states, StepArgs(**settings, grad_factor=skip), cache)
    _synchronize(v.device)
    return next((f"{name} written by a step skipped for an infinite gradient factor"
                 for (name, old), (_, new) in zip(named, _everything(s), strict=True)
                 if not torch.equal(old, new)), None)


def _guards_written(s: _Scratch) -> str | None:
    """Whether a step wrote outside a misaligned parameter or gradient."""
    for name, base in s.bases:
        ends = base[[0, -1]].to(device="cpu", dtype=torch.float64)
        if not torch.equal(ends, torch.full((2,), GUARD, dtype=torch.float64)):
            return f"an element next to misaligned {name} written ({ends.tolist()})"
    return None
