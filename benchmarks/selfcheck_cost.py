"""What the first-use self-check of each fused kernel variant costs (adan.kernels.verify).

    python -m benchmarks.selfcheck_cost [--kind triton|cpu] [--device cpu|cuda] [--repeats 3]

For each state format (and a bf16 parameter with float32 state) and two option sets, the first
build and check of the variant in this process (compile included, from whatever on-disk cache
there is) and then the check alone (the best of ``--repeats`` more runs, the code compiled):
what a process pays once per variant. ``--kind triton --device cpu`` runs Triton's interpreter
(set TRITON_INTERPRET=1). Run from the repository root with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

import adan.kernels.routing as routing
from adan.state.formats import FORMATS

CASES = [("plain", torch.float32), ("fp32", torch.bfloat16), ("bf16", torch.float32),
         ("int8", torch.float32)]


def _options(kind: str, every: bool) -> dict[str, bool]:
    """The routing key's options: all off, or every one on."""
    if kind == "cpu":
        return dict(factor=every, stochastic_param=every, serial=True, parallel=every)
    return dict(factor=every, stochastic_param=every, no_prox=every, maximize=every,
                tensor_lr=every)


def _seconds(kind: str, device: torch.device, fmt: str, dtype: torch.dtype,
             options: dict[str, bool]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        routing._probe(kind, device, FORMATS[fmt], dtype, dtype, options)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    """Print a markdown table: variant, first use, the check alone."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["triton", "cpu"], default="triton")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print("| variant | first use (build + check) | the check alone |\n|---|---|---|")
    for fmt, dtype in CASES:
        for every in (False, True):
            options = _options(args.kind, every)
            first = _seconds(args.kind, device, fmt, dtype, options)
            again = min(_seconds(args.kind, device, fmt, dtype, options)
                        for _ in range(args.repeats))
            name = f"{args.kind}, {fmt}, {str(dtype).removeprefix('torch.')}, " + (
                "every option" if every else "no option")
            print(f"| {name} | {first:.2f} s | {again:.3f} s |", flush=True)


if __name__ == "__main__":
    main()
