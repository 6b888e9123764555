"""Adan for JAX as optax transformations whose updates are exactly those of :class:`adan.Adan`.

``optax.adan`` computes another update (docs/jax.md). ``adan(...)`` is ``scale_by_adan``, then
``add_weight_decay`` and ``optax.scale_by_learning_rate``, wrapped in ``clipped`` when
``max_grad_norm`` is set. Needs ``pip install 'adan[jax]'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["ScaleByAdanState", "adan", "add_weight_decay", "clipped", "scale_by_adan"]

STATE_DTYPES: dict[str | None, Any] = {None: None, "fp32": jnp.float32, "bf16": jnp.bfloat16}


class ScaleByAdanState(NamedTuple):
    """The step count ``step`` (0 before the first step) and Adan's four buffers, named as in
    :class:`adan.Adan`'s state: the averages m, v, n and the previous gradient."""

    step: jax.Array
    exp_avg: optax.Updates
    exp_avg_diff: optax.Updates
    exp_avg_sq: optax.Updates
    prev_grad: optax.Updates


def _check(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    """Raise naming ``name`` unless ``value`` is a finite real number satisfying ``ok`` (traced
    values, which ``optax.inject_hyperparams`` passes under ``jit``, are checked at init)."""
    if isinstance(value, jax.core.Tracer):
        return
    try:
        number = math.nan if isinstance(value, bool) else float(np.asarray(value))
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and ok(number)):
        raise ValueError(f"Invalid {name}: {value!r} (allowed: {allowed})")


def _nonnegative(name: str, value: Any) -> None:
    """Raise naming ``name`` unless ``value`` is a finite number >= 0."""
    _check(name, value, "a finite number >= 0", lambda x: x >= 0)


def _compute_dtype(dtype: Any) -> Any:
    """The arithmetic dtype for inputs of ``dtype``: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _log(beta: Any) -> Any:
    """``log(beta)``, in float64 for a Python number (-inf for 0): rounding a beta near 1 to
    float32 first would cost about 1e-6 of ``1 - beta**k``."""
    if isinstance(beta, (int, float)):
        return math.log(beta) if beta > 0 else -math.inf
    return jnp.log(beta)


def scale_by_adan(
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    state_dtype: str | None = None,
) -> optax.GradientTransformation:
    """Turn gradients into Adan's direction ``u`` (before learning rate and weight decay).

    Per step ``k`` (counted from 1) and leaf, with ``g_0 = g_1`` and the betas decay rates::

        d = g - g_prev;  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*d
        n = b3*n + (1-b3)*(g + b2*d)**2
        u = (m/(1-b1**k) + b2*v/(1-b2**k)) / (sqrt(n)/sqrt(1-b3**k) + eps)

    with bias corrections ``1 - b**k`` computed as ``-expm1(k*log(b))``, accurate near 1.
    ``state_dtype``: ``None`` keeps the four buffers in the arithmetic dtype (float32, or
    float64 for float64 leaves), ``"fp32"`` in float32, ``"bf16"`` in bfloat16 (rounded to
    nearest; :class:`adan.Adan` rounds its bf16 state stochastically).
    """
    for name, beta in (("b1", b1), ("b2", b2), ("b3", b3)):
        _check(name, beta, "a decay rate in [0, 1)", lambda b: 0 <= b < 1)
    _nonnegative("eps", eps)
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (allowed: None, 'fp32', 'bf16')")
    storage = STATE_DTYPES[state_dtype]

    def init_fn(params: optax.Params) -> ScaleByAdanState:
        def zeros() -> optax.Updates:
            return jax.tree.map(
                lambda p: jnp.zeros_like(p, dtype=storage or _compute_dtype(p.dtype)), params)
        return ScaleByAdanState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros(), zeros())

    def update_fn(updates: optax.Updates, state: ScaleByAdanState,
                  params: optax.Params | None = None) -> tuple[optax.Updates, ScaleByAdanState]:
        del params
        first = state.step == 0
        count = optax.safe_increment(state.step)

        def leaf(g: jax.Array, m: jax.Array, v: jax.Array, n: jax.Array, prev: jax.Array
                 ) -> tuple[jax.Array, ...]:
            dtype = _compute_dtype(g.dtype)
            k = count.astype(dtype)
            grad = g.astype(dtype)
            diff = grad - jnp.where(first, grad, prev.astype(dtype))
            m = b1 * m.astype(dtype) + (1 - b1) * grad
            v = b2 * v.astype(dtype) + (1 - b2) * diff
            n = b3 * n.astype(dtype) + (1 - b3) * jnp.square(grad + b2 * diff)

            def correction(beta: float) -> jax.Array:
                return -jnp.expm1(k * _log(beta))  # log(0) = -inf: a correction of 1

            u = ((m / correction(b1) + b2 * v / correction(b2))
                 / (jnp.sqrt(n) / jnp.sqrt(correction(b3)) + eps))
            keep = storage or dtype
            return (u.astype(g.dtype), m.astype(keep), v.astype(keep), n.astype(keep),
                    grad.astype(keep))

        grads, treedef = jax.tree.flatten(updates)
        buffers = (state.exp_avg, state.exp_avg_diff, state.exp_avg_sq, state.prev_grad)
        rows = [leaf(*xs) for xs in zip(grads, *map(jax.tree.leaves, buffers), strict=True)]
        u, m, v, n, prev = (jax.tree.unflatten(treedef, [row[i] for row in rows])
                            for i in range(5))
        return u, ScaleByAdanState(count, m, v, n, prev)

    return optax.GradientTransformation(init_fn, update_fn)


def add_weight_decay(
    weight_decay: float,
    learning_rate: optax.ScalarOrSchedule,
    *,
    no_prox: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Add Adan's decoupled weight decay to a direction ``u``, for
    ``optax.scale_by_learning_rate(learning_rate)`` to follow.

    ``no_prox=True`` gives ``u + wd*p`` (the step ``p*(1 - lr*wd) - lr*u``, AdamW's form); the
    default gives ``(u + wd*p) / (1 + lr*wd)``, which makes the step the proximal
    ``(p - lr*u) / (1 + lr*wd)``: that is why this needs the learning rate (a schedule is read
    at this transformation's own step count, as ``scale_by_learning_rate`` reads it). ``mask``
    (a pytree of bools or a function of the params, as ``optax.add_decayed_weights`` takes)
    selects the leaves that decay.
    """
    _nonnegative("weight_decay", weight_decay)

    def init_fn(params: optax.Params) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates: optax.Updates, state: optax.ScaleByScheduleState,
                  params: optax.Params | None = None
                  ) -> tuple[optax.Updates, optax.ScaleByScheduleState]:
        new_state = optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
        if isinstance(weight_decay, (int, float)) and weight_decay == 0:
            return updates, new_state
        if params is None:
            raise ValueError("Adan's weight_decay needs the parameters: call "
                             "update(grads, state, params), or set weight_decay=0")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate

        def leaf(u: jax.Array, p: jax.Array) -> jax.Array:
            dtype = _compute_dtype(u.dtype)
            decayed = u.astype(dtype) + weight_decay * p.astype(dtype)
            return (decayed if no_prox else decayed / (1 + lr * weight_decay)).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), new_state

    inner = optax.GradientTransformation(init_fn, update_fn)
    return inner if mask is None else optax.masked(inner, mask)


def clipped(inner: optax.GradientTransformation, max_norm: float, eps: float = 1e-8
            ) -> optax.GradientTransformationExtraArgs:
    """``inner`` on gradients scaled by ``min(1, max_norm / (norm + eps))``, ``norm`` the
    2-norm of all of them together, as :class:`adan.Adan` clips with ``max_grad_norm``.

    A step whose norm is not finite (an inf or NaN gradient) is skipped: the updates are zero
    and ``inner``'s state stays as it was, as ``adan.Adan`` leaves params and state unchanged.
    """
    _check("max_grad_norm", max_norm, "a finite number > 0; None disables clipping",
           lambda x: x > 0)
    _nonnegative("eps", eps)
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates: optax.Updates, state: optax.OptState,
                  params: optax.Params | None = None, **extra_args: Any
                  ) -> tuple[optax.Updates, optax.OptState]:
        leaves = jax.tree.leaves(updates)
        acc = jnp.float64 if any(g.dtype == jnp.float64 for g in leaves) else jnp.float32
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(acc))) for g in leaves))
        finite = jnp.isfinite(norm)
        factor = jnp.minimum(1, max_norm / (norm + eps))
        scaled = jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates)
        new_updates, new_state = inner.update(scaled, state, params, **extra_args)
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                                   new_updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def adan(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    no_prox: bool = False,
    mask: Any = None,
    max_grad_norm: float | None = None,
    state_dtype: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Adan with exactly :class:`adan.Adan`'s update; pass the params to ``update`` when
    ``weight_decay > 0``.

    ``learning_rate``: a number >= 0 or an optax schedule. ``weight_decay``, ``no_prox`` and
    ``mask``: see :func:`add_weight_decay` (the default is the proximal form).
    ``max_grad_norm``: None, or clip by the global norm and skip non-finite steps, see
    :func:`clipped` (with ``eps`` as the clipping epsilon, as ``adan.Adan`` takes it).
    ``state_dtype``: see :func:`scale_by_adan`.
    """
    if not callable(learning_rate):
        _nonnegative("learning_rate", learning_rate)
    tx = optax.chain(
        scale_by_adan(b1, b2, b3, eps, state_dtype),
        add_weight_decay(weight_decay, learning_rate, no_prox=no_prox, mask=mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return tx if max_grad_norm is None else clipped(tx, max_grad_norm, eps)
