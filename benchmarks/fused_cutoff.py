"""Step time of the CPU paths on both sides of ``FUSED_MIN_NUMEL``, to choose the cut-off.

    PYTHONPATH=src python benchmarks/fused_cutoff.py [--threads 1] [--steps 20] [--pieces 1,16]
        [--log2 16:22] [--per-octave 2]

For each group size (2^16 to 2^22 elements by default, ``--per-octave`` sizes an octave, each
split into ``--pieces`` equal tensors) it times
``Adan.step`` with the default route, ``fused=True`` and ``foreach=True`` in one process,
interleaved, and prints the median milliseconds per step and which route the default took.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from adan import Adan
from adan.kernels import routing

PATHS: dict[str, dict[str, Any]] = {
    "default": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}


def time_steps(opt: Adan, params: list[torch.Tensor], steps: int) -> float:
    """Median seconds of ``opt.step()`` over ``steps`` calls after three warm-up steps."""
    times = []
    for i in range(steps + 3):
        for p in params:
            assert p.grad is not None
            p.grad.normal_()
        start = time.perf_counter()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    parser.add_argument("--pieces", default="1,16",
                        help="comma-separated tensor counts to split each group into")
    parser.add_argument("--log2", default="16:22", help="first:last group size, as log2")
    parser.add_argument("--per-octave", type=int, default=2, help="group sizes per octave")
    opts = parser.parse_args()
    first, last = (int(x) for x in opts.log2.split(":"))
    torch.set_num_threads(opts.threads)
    print(f"threads {opts.threads}, FUSED_MIN_NUMEL {routing.FUSED_MIN_NUMEL}, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}")
    pieces_list = [int(k) for k in opts.pieces.split(",")]
    print(f"{'log2 n':>6} {'tensors':>7} " + " ".join(f"{k + ' ms':>11}" for k in PATHS)
          + "  fused/foreach")
    per = opts.per_octave
    for index in range(first * per, last * per + 1):
        log2 = index / per
        for pieces in pieces_list:
            n = round(2**log2 / pieces) * pieces
            cells = {}
            for name, kwargs in PATHS.items():
                torch.manual_seed(0)
                params = [torch.randn(n // pieces, requires_grad=True) for _ in range(pieces)]
                for p in params:
                    p.grad = torch.randn_like(p)
                opt = Adan(params, lr=1e-3, weight_decay=0.02, **kwargs)
                opt.warm_up()
                cells[name] = time_steps(opt, params, opts.steps) * 1e3
            print(f"{log2:>6.3g} {pieces:>7} " + " ".join(f"{v:>11.3f}" for v in cells.values())
                  + f"  {cells['fused'] / cells['foreach']:>13.2f}", flush=True)


if __name__ == "__main__":
    main()
