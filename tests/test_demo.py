"""The demo and the ``python -m adan`` command line, on a tiny text."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

import adan.__main__ as cli
from adan import demo
from adan.bench.charlm import CharLMConfig
from adan.demo import DEMO_ITERS, demo_config, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert [line.split()[0] for line in table[-4:-1]] == ["val", "train", "sec"]
    assert table[-1].startswith("Adan, AdamW: learning rates tuned by")


def test_cli_without_command_runs_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(cli, "run_demo", lambda **kw: calls.append(kw))
    assert cli.main([]) == 0
    assert calls == [{"data_path": None, "iters": DEMO_ITERS, "seed": 1337}]


def test_cli_missing_data_is_a_clear_error(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"
    assert cli.main(["demo", "--data", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data PATH" in err


def test_cli_bench_dispatches_to_the_benchmark(capsys):
    """`adan bench NAME ARGS` runs adan.bench.NAME.main(ARGS) and returns its status."""
    from adan.__main__ import main

    assert main(["bench", "lowmem", "memory"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "16.0000" in out
