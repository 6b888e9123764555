"""Command line: ``python -m benchmarks NAME [ARGS...]`` runs ``benchmarks.NAME.main(ARGS)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# The benchmarks this command runs, each with its help line.
BENCHMARKS = {
    "speed": "optimizer-step speed against the memory floor and the peers",
    "lowmem": "bytes, speed and convergence of the low-memory state settings",
    "train": "convergence study: Adan against tuned baselines on four small tasks",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser: a benchmark's name, then the arguments that go to it."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run a benchmark from the repository root; arguments after its name go to "
        "it (try `-h` after the name).",
        epilog="benchmarks:\n" + "\n".join(f"  {n:8} {h}" for n, h in BENCHMARKS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=list(BENCHMARKS), help="the benchmark to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the named benchmark; its module is imported only now, as it may need the bench
    extra."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"benchmarks.{args.name}")
    return int(module.main(args.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
