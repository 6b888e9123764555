"""One jitted optimizer step in JAX over GPT-2-small-shaped params (148 arrays, 124.4M),
``adan.optax.adan`` beside ``optax.adamw`` and ``optax.adan`` in one run:
``python -m benchmarks.jax_step [--scale S] [--layers L] [--repeats N]``.

Each contender steps its own copy of the same float32 params, with the same gradients and its
weight decay on; params and state are donated to the step (updated in place, as a training
loop would). The contenders take turns, one step each per round, so that a busy host slows all
of them alike; it prints each round and then the median step time of each and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adan.optax import adan
from benchmarks.speed import gpt2_shapes

LR, WEIGHT_DECAY = 1e-3, 0.02


def contenders() -> dict[str, optax.GradientTransformation]:
    """The optimizers timed, in the order they run."""
    return {
        "adan.optax.adan": adan(LR, weight_decay=WEIGHT_DECAY),
        "optax.adamw": optax.adamw(LR, weight_decay=WEIGHT_DECAY),
        "optax.adan": optax.adan(LR, weight_decay=WEIGHT_DECAY),
    }


Step = Callable[[list[jax.Array], optax.OptState, list[jax.Array]],
                tuple[list[jax.Array], optax.OptState]]


def jitted_step(tx: optax.GradientTransformation) -> Step:
    """A jitted training-loop step of ``tx`` that takes params, state and gradients and
    donates the params and state (updating them in place)."""

    def step(p: list[jax.Array], state: optax.OptState, g: list[jax.Array]
             ) -> tuple[list[jax.Array], optax.OptState]:
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv: Sequence[str] | None = None) -> int:
    """Time each contender on the same params and gradients; print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the width, context and vocabulary by this (the "
                        "parameter count by about its square; default 1: GPT-2 small)")
    parser.add_argument("--layers", type=int, default=12,
                        help="transformer blocks, 12 arrays each (default 12: GPT-2 small)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps each (default 7)")
    args = parser.parse_args(argv)
    if not args.scale > 0 or args.layers < 0 or args.repeats < 1:
        parser.error("--scale must be > 0, --layers >= 0 and --repeats >= 1")
    shapes = gpt2_shapes(max(1, round(768 * args.scale)), args.layers,
                         max(1, round(50257 * args.scale)), max(1, round(1024 * args.scale)))
    rng = np.random.default_rng(0)
    params, grads = ([jnp.asarray(scale * rng.standard_normal(s, np.float32)) for s in shapes]
                     for scale in (0.02, 1e-3))
    numel = sum(p.size for p in params)
    print(f"{len(shapes)} float32 arrays, {numel / 1e6:.1f}M parameters; jax {jax.__version__}, "
          f"optax {optax.__version__}, {jax.devices()[0].platform}")
    txs = contenders()
    runs: dict[str, tuple[Step, list[Any], list[float]]] = {}
    for i, (name, tx) in enumerate(txs.items(), 1):
        print(f"[{i}/{len(txs)}] compiling {name}", flush=True)
        step, copy = jitted_step(tx), [jnp.copy(p) for p in params]
        runs[name] = step, list(jax.block_until_ready(step(copy, tx.init(copy), grads))), []
    for r in range(args.repeats):  # one step of each in turn: the host's noise hits all alike
        for step, carry, times in runs.values():
            start = time.perf_counter()
            carry[:] = jax.block_until_ready(step(carry[0], carry[1], grads))
            times.append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{name} {times[-1] * 1e3:.0f} ms" for name, (_, _, times) in runs.items()),
            flush=True)
    medians = {name: statistics.median(times) for name, (_, _, times) in runs.items()}
    print(f"{'optimizer':<18}{'median ms':>11}{'vs optax.adamw':>16}{'vs optax.adan':>15}")
    for name, seconds in medians.items():
        print(f"{name:<18}{seconds * 1e3:>11.1f}{seconds / medians['optax.adamw']:>16.2f}"
              f"{seconds / medians['optax.adan']:>15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
