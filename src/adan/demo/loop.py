"""The demo's training loop, shared by the benchmarks' tasks: warm-up plus cosine schedule,
clipping, periodic evaluation, and an early stop when the loss is no longer finite."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = ["Schedule", "available_cores", "cap_threads", "fit", "lr_factor"]


class Schedule(Protocol):
    """The fields of a task configuration that drive the loop."""

    max_iters: int
    warmup_iters: int
    lr_decay_to: float
    grad_clip: float
    eval_interval: int


def lr_factor(it: int, cfg: Schedule) -> float:
    """Linear warm-up to 1, then cosine decay to ``lr_decay_to`` at ``max_iters``."""
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (it - cfg.warmup_iters) / span)
    return cfg.lr_decay_to + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.lr_decay_to)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cap_threads() -> None:
    """Keep torch's intra-op pool no larger than the cores this process may run on."""
    cores = available_cores()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Schedule,
    train_loss: Callable[[], Tensor],
    evaluate: Callable[[], tuple[float, float]],
    progress: Callable[[int, float, float], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``cfg.max_iters`` steps of ``train_loss()`` with the scheduled learning rate.

    The peak learning rate of each group is its ``lr`` when the loop starts. ``evaluate()``
    returns ``(train_loss, val_loss)`` and runs every ``eval_interval`` steps and at the end;
    ``progress(iter, train_loss, val_loss)`` sees each evaluation and ``on_step(done)`` each
    finished step. A non-finite training loss ends the run (``diverged``) instead of spending
    the rest of the budget on NaNs. Besides the wall time (``seconds``) the record holds the
    time spent evaluating (``eval_seconds``) and inside ``optimizer.step()`` (``step_seconds``)
    over ``steps`` steps, so the optimizer's share of a training step can be read off.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    start = time.perf_counter()
    train_curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    eval_seconds = step_seconds = 0.0
    steps = 0

    def record(it: int) -> None:
        nonlocal eval_seconds
        began = time.perf_counter()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            train_value, val_value = evaluate()
        model.train(was_training)
        train_curve.append((it, train_value))
        val_curve.append((it, val_value))
        eval_seconds += time.perf_counter() - began
        if progress is not None:
            progress(it, train_value, val_value)

    diverged = False
    for it in range(cfg.max_iters):
        if it % cfg.eval_interval == 0:
            record(it)
        factor = lr_factor(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        loss = train_loss()
        if not math.isfinite(loss.item()):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        began = time.perf_counter()
        optimizer.step()
        step_seconds += time.perf_counter() - began
        steps += 1
        if on_step is not None:
            on_step(steps)
    if not diverged:
        record(cfg.max_iters)
        diverged = not math.isfinite(val_curve[-1][1])
    final_val = math.nan if diverged else val_curve[-1][1]
    final_train = math.nan if diverged else train_curve[-1][1]
    return {
        "val_curve": val_curve,
        "train_curve": train_curve,
        "final_val_loss": final_val,
        "final_train_loss": final_train,
        "diverged": diverged,
        "n_params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
        "eval_seconds": eval_seconds,
        "step_seconds": step_seconds,
        "steps": steps,
    }
