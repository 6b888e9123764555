"""``benchmarks/gpu_session.sh`` runs unattended on a GPU machine, in one call of limited time;
what it would find broken there is checked here without a GPU: the script's syntax, that its
benchmark commands parse, and that its test selection collects."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

from benchmarks.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
COMMAND = "python3 -m benchmarks "


def _setting(name: str) -> str:
    """The text the script assigns to ``name=`` (quoted, possibly over several lines)."""
    found = re.search(rf'^{name}="([^"]*)"', SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert found is not None, f"{name}= not found in {SCRIPT}"
    return found.group(1)


def benchmark_commands(out: str) -> list[list[str]]:
    """The arguments after ``python3 -m benchmarks`` of each command the script runs, with
    continuation lines joined, redirections dropped, ``$OUT`` as ``out`` and ``"$@"`` as the
    script's default (its ``set --`` line)."""
    text = SCRIPT.read_text(encoding="utf-8").replace("\\\n", " ")
    default = re.search(r"set -- (.*)$", text, re.MULTILINE)
    assert default is not None, "the default speed arguments (set -- ...) not found"
    commands = []
    for line in text.splitlines():
        if COMMAND not in line or line.lstrip().startswith(("#", "say ")):
            continue
        words = re.split(r" [12]?>| \|", line.split(COMMAND, 1)[1])[0]
        argv = []
        for word in shlex.split(words):
            argv += shlex.split(default.group(1)) if word == "$@" else [
                word.replace("$OUT", out)]
        commands.append(argv)
    return commands


class _Parsed(Exception):
    """Raised in place of running a benchmark once its arguments have parsed."""


def _parse_then_stop(parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
    raise _Parsed(_PARSE(parser, *args, **kwargs))


_PARSE = argparse.ArgumentParser.parse_args


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


def test_benchmark_commands_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command's arguments parse in full (an unknown or malformed option fails), and the
    benchmark stops there instead of running."""
    commands = benchmark_commands(str(tmp_path))
    assert [argv[:2] for argv in commands] == [["lowmem", "training"], ["speed", "--device"]]
    for argv in commands:
        args = build_parser().parse_args(argv)
        module = importlib.import_module(f"benchmarks.{args.name}")
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _parse_then_stop)
        with pytest.raises(_Parsed):
            module.main(args.args)
        monkeypatch.undo()


def test_test_selection_collects() -> None:
    """The default pytest selection (``CUDA_TESTS``) names files that exist and collect without
    errors; the script runs pytest with ``--continue-on-collection-errors``, so a broken file
    would only show as fewer tests."""
    paths = _setting("CUDA_TESTS").split()
    assert paths and all((ROOT / path).is_file() for path in paths), paths
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-o", "addopts=",
                           "-qq", "-p", "no:cacheprovider", *paths],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counts = dict(re.findall(r"^(\S+): (\d+)$", done.stdout, re.MULTILINE))
    assert all(int(counts.get(path, 0)) > 0 for path in paths), done.stdout
