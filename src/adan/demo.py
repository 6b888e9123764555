"""The main job: train one small character-level GPT with Adan and with AdamW, side by side."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import torch

from adan.bench.charlm import CharData, CharLMConfig, find_data, train_charlm
from adan.optimizer import Adan

__all__ = ["DEMO_ITERS", "demo_config", "run_demo"]

DEMO_ITERS = 2000

# Learning rates tuned for this recipe by the convergence study (`python -m adan bench train`,
# docs/results.md: a 2x-spaced grid per optimizer, best by final validation loss). The other
# settings are the study's: Adan's paper betas and weight decay 0.02, nanoGPT's AdamW betas
# and weight decay 0.1.
ADAN_KWARGS: dict[str, Any] = dict(lr=2e-2, weight_decay=0.02)
ADAMW_KWARGS: dict[str, Any] = dict(lr=8e-3, betas=(0.9, 0.99), weight_decay=0.1)
# nanoGPT's published shakespeare_char settings: the public anchor (val loss about 1.88).
NANOGPT_KWARGS: dict[str, Any] = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


def demo_config(iters: int = DEMO_ITERS, seed: int = 1337) -> CharLMConfig:
    """nanoGPT's CPU recipe (2000 iterations: about 4 minutes for the three runs on 2 idle cores),
    with warm-up and evaluation spacing scaled to ``iters`` for shorter runs."""
    return CharLMConfig(
        max_iters=iters,
        warmup_iters=min(100, iters // 10),
        eval_interval=max(1, iters // 8),
        seed=seed,
    )


def _format_table(results: dict[str, dict[str, Any]]) -> str:
    """Validation loss of every optimizer at each evaluation, then final losses and times."""
    names = list(results)
    width = max(10, *(len(n) for n in names))
    head = f"{'iter':>6}  " + "  ".join(f"{n:>{width}}" for n in names)
    lines = ["validation loss", head, "-" * len(head)]
    curves = [results[n]["val_curve"] for n in names]
    for row in zip(*curves, strict=True):
        lines.append(f"{row[0][0]:>6}  " + "  ".join(f"{v:>{width}.4f}" for _, v in row))
    lines.append("-" * len(head))
    for label, key, fmt in (
        ("val", "final_val_loss", ".4f"),
        ("train", "final_train_loss", ".4f"),
        ("sec", "seconds", ".1f"),
    ):
        cells = "  ".join(f"{results[n][key]:>{width}{fmt}}" for n in names)
        lines.append(f"{label:>6}  {cells}")
    return "\n".join(lines)


def run_demo(
    data_path: str | Path | None = None,
    iters: int = DEMO_ITERS,
    seed: int = 1337,
    cfg: CharLMConfig | None = None,
    out: TextIO | None = None,
) -> dict[str, dict[str, Any]]:
    """Train the demo model with Adan, tuned AdamW and nanoGPT's AdamW from one init and data;
    print and return all three.

    ``cfg`` replaces the whole demo configuration (then ``iters`` and ``seed`` are unused);
    ``out`` receives the report (default: stdout).
    """
    stream = out if out is not None else sys.stdout

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    path = find_data(data_path)
    data = CharData.from_file(path)
    if cfg is None:
        cfg = demo_config(iters, seed)
    say(f"data: {path.resolve()} ({len(data.train) + len(data.val):,} characters, "
        f"vocabulary {data.vocab_size})")
    say("config: " + ", ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    say(f"threads: {torch.get_num_threads()}")
    settings = {"Adan": ADAN_KWARGS, "AdamW": ADAMW_KWARGS, "AdamW-nanoGPT": NANOGPT_KWARGS}
    optimizers: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
        "Adan": lambda groups: Adan(groups, **ADAN_KWARGS),
        "AdamW": lambda groups: torch.optim.AdamW(groups, **ADAMW_KWARGS),
        "AdamW-nanoGPT": lambda groups: torch.optim.AdamW(groups, **NANOGPT_KWARGS),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, make in optimizers.items():
        say(f"\n{name} {settings[name]}")

        def report(it: int, train_loss: float, val_loss: float) -> None:
            say(f"  iter {it:>5}  train {train_loss:.4f}  val {val_loss:.4f}")

        results[name] = train_charlm(make, cfg, data, progress=report)
        say(f"  {results[name]['seconds']:.1f} s")
    say()
    say(_format_table(results))
    say("Adan, AdamW: learning rates tuned by `python -m adan bench train` (docs/results.md); "
        "AdamW-nanoGPT: nanoGPT's published settings")
    return results
