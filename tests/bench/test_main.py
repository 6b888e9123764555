"""``python -m benchmarks NAME ARGS``: runs from the repository root and hands ARGS to the
benchmark."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, main

ROOT = Path(__file__).resolve().parents[2]


def test_dispatches_to_the_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    """``NAME ARGS`` runs ``benchmarks.NAME.main(ARGS)`` and returns its status."""
    assert main(["lowmem", "memory", "--numel", "1000"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "16.0000" in out


def test_help_lists_every_benchmark_from_the_root() -> None:
    """A checkout's root is all ``python -m benchmarks`` needs to be found."""
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    for name, text in BENCHMARKS.items():
        assert f"  {name:8} {text}" in done.stdout


def test_unknown_benchmark_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
