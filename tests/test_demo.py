"""The demo and the ``python -m adan`` command line, on a tiny text."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import adan.__main__ as cli
from adan import demo
from adan.demo import DEMO_ITERS, demo_config, run_demo
from adan.demo.charlm import CharLMConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("error")
def test_run_demo_trains_all_from_one_init(text_file: Path) -> None:
    cfg = CharLMConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=16,
                       max_iters=40, warmup_iters=4, eval_interval=20, eval_iters=4)
    out = io.StringIO()
    results = run_demo(text_file, cfg=cfg, out=out)
    assert list(results) == ["Adan", "AdamW", "AdamW-nanoGPT"]
    assert len({res["val_curve"][0] for res in results.values()}) == 1
    assert len({res["final_val_loss"] for res in results.values()}) == 3
    for res in results.values():
        assert [it for it, _ in res["val_curve"]] == [0, 20, 40]
        assert res["final_val_loss"] < 0.9 * res["val_curve"][0][1]
    report = out.getvalue()
    assert str(text_file.resolve()) in report
    assert "max_iters=40" in report
    table = report[report.index("validation loss"):]
    assert "Adan" in table and "AdamW-nanoGPT" in table and "sec" in table
    for res in results.values():
        assert f"{res['final_val_loss']:.4f}" in table


def test_demo_config_scales_with_iters() -> None:
    cfg = demo_config(DEMO_ITERS)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 64)
    assert cfg.max_iters == DEMO_ITERS and cfg.max_iters % cfg.eval_interval == 0
    assert demo_config(3).eval_interval == 1 and demo_config(3).warmup_iters == 0


def test_cli_demo_prints_table(text_file: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    def small_config(iters: int, seed: int) -> CharLMConfig:
        """The demo's schedule for ``iters`` on a smaller model, to keep the test fast."""
        return replace(demo_config(iters, seed), n_layer=1, n_head=2, n_embd=32, block_size=16,
                       eval_iters=2)

    monkeypatch.setattr(demo, "demo_config", small_config)
    assert cli.main(["demo", "--data", str(text_file), "--iters", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "seed=5" in printed and "max_iters=2" in printed
    table = printed[printed.index("validation loss"):].splitlines()
    assert table[1].split() == ["iter", "Adan", "AdamW", "AdamW-nanoGPT"]
    assert [line.split()[0] for line in table[3:6]] == ["0", "1", "2"]
    labels = [line[:7].strip() for line in table[-8:-3]]
    assert labels == ["val", "train", "sec", "ms/step", "opt ms"]
    assert table[-2].startswith("Adan, AdamW: learning rates tuned by")
    assert "tuned for 2000 iterations" in table[-1]


def test_cli_without_command_runs_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(cli, "run_demo", lambda **kw: calls.append(kw))
    assert cli.main([]) == 0
    assert calls == [{"data_path": None, "iters": DEMO_ITERS, "seed": 1337, "threads": None}]


def test_cli_threads_sets_the_pool_for_the_run_only(text_file: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(demo, "available_cores", lambda: 4)
    monkeypatch.setattr(demo, "train_charlm", lambda *a, **kw: seen.append(
        torch.get_num_threads()) or fake_record())
    assert cli.main(["demo", "--data", str(text_file), "--iters", "2", "--threads", "3"]) == 0
    assert seen == [3, 3, 3] and torch.get_num_threads() == 1
    assert "threads: 3 of 4 cores" in capsys.readouterr().out
    assert cli.main(["demo", "--data", str(text_file), "--iters", "2"]) == 0
    assert seen[3:] == [demo.default_threads()] * 3 == [3] * 3
    with pytest.raises(SystemExit):
        cli.main(["demo", "--threads", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def fake_record() -> dict:
    """What train_charlm returns, for tests that only look at the demo's bookkeeping."""
    return {"val_curve": [(0, 4.0), (2, 3.0)], "train_curve": [(0, 4.0), (2, 3.0)],
            "final_val_loss": 3.0, "final_train_loss": 3.0, "seconds": 1.0,
            "eval_seconds": 0.5, "step_seconds": 0.1, "steps": 2}


def test_default_threads_leaves_a_core_free(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, threads in ((1, 1), (2, 1), (8, 7)):
        monkeypatch.setattr(demo, "available_cores", lambda cores=cores: cores)
        assert demo.default_threads() == threads


@pytest.mark.parametrize("iters", [250, 2000, 1000, 96, 97, 10, 3, 1])
def test_eval_schedule_is_evenly_spaced(iters: int) -> None:
    """No two evaluations closer than half the interval (250 once gave 248 and 250)."""
    interval = demo_config(iters).eval_interval
    points = sorted({*range(0, iters, interval), iters})
    gaps = [b - a for a, b in zip(points, points[1:], strict=False)]
    assert min(gaps) >= interval / 2 and len(points) <= 10
    assert demo_config(250).eval_interval == 50


def test_progress_lines_in_a_log(text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a terminal: plain lines naming the run of how many, with rate, ETA and losses."""
    monkeypatch.setattr(demo, "PROGRESS_LOG_EVERY", 0.0)
    cfg = CharLMConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=16,
                       max_iters=6, warmup_iters=0, eval_interval=3, eval_iters=2)
    progress = io.StringIO()
    run_demo(text_file, cfg=cfg, out=io.StringIO(), progress=progress)
    lines = progress.getvalue().splitlines()
    assert "\r" not in progress.getvalue()
    for k, name in enumerate(["Adan", "AdamW", "AdamW-nanoGPT"], 1):
        mine = [line.split(")", 1)[1] for line in lines if line.startswith(f"run {k}/3 {name} (")]
        assert [line.split()[0] for line in mine] == [f"{i}/6" for i in range(1, 7)]
        assert all("it/s" in line and "ETA" in line for line in mine[:-1])
        assert "took" in mine[-1] and "val " in mine[-1]


def test_cli_missing_data_is_a_clear_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"
    assert cli.main(["demo", "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data PATH" in err


def test_plain_install_imports_without_warnings() -> None:
    """The demo's install (``pip install -e .``) brings numpy, without which importing torch
    warns; and importing the command line warns about nothing else."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    deps = re.search(r"^dependencies = \[(.*)\]$", text, re.MULTILINE)
    assert deps is not None
    names = {re.split(r"[<>=;\s]", dep.strip(' "'))[0] for dep in deps.group(1).split(",")}
    assert {"torch", "numpy"} <= names
    done = subprocess.run([sys.executable, "-W", "error", "-c", "import adan.__main__"],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0 and done.stderr == ""


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """CI calls the test command README.md shows a newcomer, verbatim, in a fresh venv."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("Run the tests:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    command = block.strip()
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert command in ci
    assert any(line.startswith("python -m venv") for line in ci)
