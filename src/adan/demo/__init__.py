"""The main job: train one small character-level GPT with Adan and with AdamW, side by side.

The model and its data are in :mod:`adan.demo.charlm`, the training loop in
:mod:`adan.demo.loop`; the repository's benchmarks reuse both."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch

from adan.demo.charlm import CharData, CharLMConfig, find_data, train_charlm
from adan.demo.loop import available_cores
from adan.optimizer import Adan
from adan.progress import Progress

__all__ = ["DEMO_ITERS", "default_threads", "demo_config", "eval_interval", "run_demo"]

DEMO_ITERS = 2000

# Seconds between progress lines when stderr is not a terminal (a log file or a pipe).
PROGRESS_LOG_EVERY = 30.0

# Learning rates tuned for this recipe by the convergence study (`python -m benchmarks train`,
# docs/results.md: a 2x-spaced grid per optimizer, best by final validation loss). The other
# settings are the study's: Adan's paper betas and weight decay 0.02, nanoGPT's AdamW betas
# and weight decay 0.1.
ADAN_KWARGS: dict[str, Any] = dict(lr=2e-2, weight_decay=0.02)
ADAMW_KWARGS: dict[str, Any] = dict(lr=8e-3, betas=(0.9, 0.99), weight_decay=0.1)
# nanoGPT's published shakespeare_char settings: the public anchor (val loss about 1.88).
NANOGPT_KWARGS: dict[str, Any] = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


def default_threads() -> int:
    """All cores but one: on a host where other work keeps a core busy, a pool as large as the
    machine stalls at every parallel region (2-4x slower on 2 cores), one thread fewer does not."""
    return max(1, available_cores() - 1)


def eval_interval(iters: int, evals: int = 8) -> int:
    """Evaluation spacing for a run of ``iters`` steps: about ``evals`` evenly spaced ones.

    The smallest divisor of ``iters`` from ``iters / evals`` up to a third of ``iters``
    (250 -> 50), so the last periodic evaluation is the final one; failing that, the smallest
    spacing in that range that leaves at least half an interval before the final evaluation.
    """
    step = max(1, math.ceil(iters / evals))
    spans = range(step, max(step, iters // 3) + 1)
    for fits in (lambda d: iters % d == 0, lambda d: iters % d >= d / 2):
        for candidate in spans:
            if fits(candidate):
                return candidate
    return step


def demo_config(iters: int = DEMO_ITERS, seed: int = 1337) -> CharLMConfig:
    """nanoGPT's CPU recipe (2000 iterations), with warm-up and evaluation spacing scaled to
    ``iters`` for shorter runs."""
    return CharLMConfig(
        max_iters=iters,
        warmup_iters=min(100, iters // 10),
        eval_interval=eval_interval(iters),
        seed=seed,
    )


def _format_table(results: dict[str, dict[str, Any]]) -> str:
    """Validation loss of every optimizer at each evaluation, then final losses and times."""
    names = list(results)
    width = max(10, *(len(n) for n in names))
    head = f"{'iter':>7} " + "  ".join(f"{n:>{width}}" for n in names)
    lines = ["validation loss", head, "-" * len(head)]
    curves = [results[n]["val_curve"] for n in names]
    for row in zip(*curves, strict=True):
        lines.append(f"{row[0][0]:>7} " + "  ".join(f"{v:>{width}.4f}" for _, v in row))
    lines.append("-" * len(head))
    rows: list[tuple[str, Callable[[dict[str, Any]], float], str]] = [
        ("val", lambda r: r["final_val_loss"], ".4f"),
        ("train", lambda r: r["final_train_loss"], ".4f"),
        ("sec", lambda r: r["seconds"], ".1f"),
        ("ms/step", lambda r: 1e3 * (r["seconds"] - r["eval_seconds"]) / max(1, r["steps"]),
         ".1f"),
        ("opt ms", lambda r: 1e3 * r["step_seconds"] / max(1, r["steps"]), ".2f"),
    ]
    for label, value, fmt in rows:
        cells = "  ".join(f"{value(results[n]):>{width}{fmt}}" for n in names)
        lines.append(f"{label:>7} {cells}")
    return "\n".join(lines)


def run_demo(
    data_path: str | Path | None = None,
    iters: int = DEMO_ITERS,
    seed: int = 1337,
    cfg: CharLMConfig | None = None,
    out: TextIO | None = None,
    threads: int | None = None,
    progress: TextIO | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the demo model with Adan, tuned AdamW and nanoGPT's AdamW from one init and data;
    print and return all three.

    ``cfg`` replaces the whole demo configuration (then ``iters`` and ``seed`` are unused);
    ``out`` receives the report (default: stdout), ``progress`` the progress line of each run
    (default: stderr). ``threads`` sets torch's intra-op threads for the runs (default:
    :func:`default_threads`; at most the cores available), restored afterwards.
    """
    stream = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    path = find_data(data_path)
    data = CharData.from_file(path)
    if cfg is None:
        cfg = demo_config(iters, seed)
    before = torch.get_num_threads()
    torch.set_num_threads(min(available_cores(), threads or default_threads()))
    try:
        say(f"data: {path.resolve()} ({len(data.train) + len(data.val):,} characters, "
            f"vocabulary {data.vocab_size})")
        say("config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        say(f"threads: {torch.get_num_threads()} of {available_cores()} cores (--threads N); "
            f"torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")
        results = _train_all(cfg, data, say, progress)
    finally:
        torch.set_num_threads(before)
    say()
    say(_format_table(results))
    say("ms/step: one training step (forward, backward, clipping, optimizer), evaluations "
        "excluded; opt ms: optimizer.step() alone")
    say("Adan, AdamW: learning rates tuned by `python -m benchmarks train` (docs/results.md); "
        "AdamW-nanoGPT: nanoGPT's published settings")
    if cfg.max_iters != DEMO_ITERS:
        say(f"The learning rates were tuned for {DEMO_ITERS} iterations: at {cfg.max_iters} "
            "the ranking says little about the optimizers.")
    return results


def _train_all(cfg: CharLMConfig, data: CharData, say: Callable[[str], None],
               progress: TextIO | None) -> dict[str, dict[str, Any]]:
    """The three runs, each with its own progress line; returns their records by name."""
    settings = {"Adan": ADAN_KWARGS, "AdamW": ADAMW_KWARGS, "AdamW-nanoGPT": NANOGPT_KWARGS}
    optimizers: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
        "Adan": lambda groups: Adan(groups, **ADAN_KWARGS),
        "AdamW": lambda groups: torch.optim.AdamW(groups, **ADAMW_KWARGS),
        "AdamW-nanoGPT": lambda groups: torch.optim.AdamW(groups, **NANOGPT_KWARGS),
    }
    results: dict[str, dict[str, Any]] = {}
    for k, (name, make) in enumerate(optimizers.items(), 1):
        label = f"run {k}/{len(optimizers)} {name}"
        say(f"\n{label}: {settings[name]}")
        bar = Progress(cfg.max_iters, label, stream=progress, log_every=PROGRESS_LOG_EVERY)

        def report(it: int, train_loss: float, val_loss: float, bar: Progress = bar) -> None:
            bar.clear()
            say(f"  iter {it:>5}  train {train_loss:.4f}  val {val_loss:.4f}")
            bar.losses(train_loss, val_loss)

        result = train_charlm(make, cfg, data, progress=report, on_step=bar.update)
        bar.close()
        per_step = 1e3 * (result["seconds"] - result["eval_seconds"]) / max(1, result["steps"])
        say(f"  {result['seconds']:.1f} s; {per_step:.1f} ms per training step, of which "
            f"optimizer.step() {1e3 * result['step_seconds'] / max(1, result['steps']):.2f} ms")
        results[name] = result
    return results
