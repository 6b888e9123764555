"""Command line: ``python -m adan <command>``; with no command it runs the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from adan.demo import DEMO_ITERS, default_threads, run_demo


def _run_demo(args: argparse.Namespace) -> int:
    """Run the Adan-vs-AdamW demo with the parsed options."""
    run_demo(data_path=args.data, iters=args.iters, seed=args.seed, threads=args.threads)
    return 0


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``: train a char-level GPT with Adan and AdamW, compare val losses."""
    parser = subparsers.add_parser(
        "demo",
        help="train a small character-level GPT with Adan and with AdamW (the default)",
        description="Train a small character-level GPT on Tiny Shakespeare with Adan, with AdamW "
        "at its tuned learning rate and with AdamW at nanoGPT's settings, from the same init and "
        "batches, and print their validation losses side by side.",
    )
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="training text (default: $ADAN_DATA, else "
                        "../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS,
                        help=f"training iterations per optimizer (default: {DEMO_ITERS})")
    parser.add_argument("--seed", type=int, default=1337,
                        help="seed for the model init and the batches (default: 1337)")
    parser.add_argument("--threads", type=_positive, default=None, metavar="N",
                        help="torch intra-op threads (default: all cores but one, here "
                        f"{default_threads()}: a thread per core stalls when other work "
                        "keeps a core busy); the losses can change with it")
    parser.set_defaults(handler=_run_demo)


def _positive(text: str) -> int:
    """An integer of at least 1, for ``--threads``."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


# Each entry adds one subcommand and sets its ``handler`` (args -> exit status); a new command
# is one more ``add_*`` function in this list. The benchmarks live outside the package, in the
# repository's benchmarks/ (``python -m benchmarks``).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The ``adan`` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="adan", description="The Adan optimizer for PyTorch. With no command, runs `demo`."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    try:
        status: int = args.handler(args)
    except FileNotFoundError as err:
        print(f"adan: error: {err}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
