"""The speed benchmark: workload shapes, bytes moved per element, every row run or skipped with
a reason, the JSON report, and a clear error for CUDA without CUDA. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import adan
from adan import Adan
from benchmarks import speed
from benchmarks.__main__ import main as benchmarks_main
from benchmarks.peers import find_peers_dir, load_sail_sg_adan

# A stand-in for sail-sg's adan.py (same constructor flags, four state buffers), so that the
# loader and the sail-sg rows are exercised without the real copy or its CUDA extension.
FAKE_SAIL_SG = '''
import torch


class Adan(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 max_grad_norm=0.0, no_prox=False, foreach=True, fused=False):
        if fused:
            import fused_adan  # noqa: F401
        super().__init__(params, dict(lr=lr, foreach=foreach, fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):
                        state[key] = torch.zeros_like(p)
                p.add_(p.grad, alpha=-group["lr"])
'''


def test_gpt2_shapes_have_148_tensors_incl_biases_and_norms():
    shapes = speed.gpt2_shapes()
    assert len(shapes) == 148 and sum(len(s) == 1 for s in shapes) == 98


def test_cuda_workloads_have_the_stated_sizes_without_allocating():
    every = speed.workloads(1000)
    gpt2, llama, bf16 = every["gpt2"], every["llama"], every["llama-bf16"]
    assert len(gpt2.shapes) == 148 and gpt2.numel == 124_439_808  # GPT-2 small, tied wte
    assert len(llama.shapes) == 147 and llama.numel == 852_559_872
    assert sum(len(s) == 1 for s in llama.shapes) == 33  # RMSNorm weights only, no biases
    assert llama.shapes.count((512, 2048)) == 32 and llama.shapes.count((32000, 2048)) == 2
    assert bf16.shapes == llama.shapes and bf16.dtype == torch.bfloat16
    assert every["8x32M"].shapes == [(32 * 2**20,)] * 8


def test_default_workloads_depend_on_the_device_and_names_resolve_sensibly():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def names(tokens: list[str] | None, device: torch.device) -> list[str]:
        return [w.name for w in speed.select_workloads(tokens, device, 1000)]

    assert names(None, cpu) == ["large-75M", "gpt2-148", "custom-1000"]
    assert names(None, cuda) == ["8x32M", "gpt2", "llama", "llama-bf16"]
    assert names(["gpt2"], cpu) == ["gpt2-148"] and names(["gpt2"], cuda) == ["gpt2"]
    assert names(["llama"], cuda) == ["llama"] and names(["llama-"], cuda) == ["llama-bf16"]
    assert names(["custom"], cuda) == ["custom-1000"] and names(["8x"], cpu) == ["8x32M"]
    with pytest.raises(ValueError, match="no workload named 'nope'"):
        names(["nope"], cpu)


def _bytes_per_element(make: Any, dtype: torch.dtype) -> float:
    params = [torch.randn(s, dtype=dtype) for s in [(50, 20), (20,), (7,)]]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()
    return speed.moved_bytes(params, opt) / sum(p.numel() for p in params)


def test_bytes_moved_are_computed_from_the_tensors():
    def adan(ps: list[torch.Tensor]) -> Adan:
        return Adan(ps, foreach=True)

    assert _bytes_per_element(adan, torch.float32) == speed.ADAN_BYTES == 44
    assert _bytes_per_element(torch.optim.AdamW, torch.float32) == speed.ADAMW_BYTES == 28
    assert _bytes_per_element(adan, torch.bfloat16) == 22
    int8 = _bytes_per_element(lambda ps: Adan(ps, state_dtype="int8"), torch.float32)
    assert 4 + 4 + 2 * 4 < int8 < 44 / 2  # 8-bit codes plus their blocks' scale bytes


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """One run of every row on a tiny custom workload, with a stand-in sail-sg copy."""
    root = tmp_path_factory.mktemp("speed")
    (root / "peers" / "sail-sg-adan").mkdir(parents=True)
    (root / "peers" / "sail-sg-adan" / "adan.py").write_text(FAKE_SAIL_SG)
    out_json = root / "speed.json"
    argv = ["--device", "cpu", "--workload", "custom", "--numel", "1000", "--steps", "2",
            "--warmup", "1", "--bandwidth-mib", "4", "--peers", str(root / "peers"),
            "--json", str(out_json)]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert speed.main(argv) == 0
    return buffer.getvalue(), json.loads(out_json.read_text())


def test_every_row_runs_or_is_skipped_with_a_reason_on_cpu(cpu_run):
    out, report = cpu_run
    (work,) = report["workloads"]
    by_name = {r["row"]: r for r in work["rows"]}
    assert list(by_name) == [row.name for row in speed.rows(None)]
    for name, result in by_name.items():
        assert result["status"] in ("ok", "skipped"), result
        if result["status"] == "skipped":
            assert result["reason"] and f"- {name}: skipped: {result['reason']}" in out
        else:
            assert f"| {name} |" in out
    for name in ("adan default", "adan fused", "adan foreach", "adan single", "adan state bf16",
                 "adan state int8", "torch AdamW fused", "torch AdamW foreach",
                 "sail-sg foreach"):
        assert by_name[name]["status"] == "ok", name
    for name in ("sail-sg fused multi-tensor", "sail-sg fused single-tensor"):
        assert by_name[name]["reason"] == "needs CUDA"
    assert sys.modules["adan"] is adan and "_sail_sg_adan" in sys.modules


def test_markdown_table_and_header(cpu_run):
    out, _ = cpu_run
    assert "in-place bandwidth" in out and f"torch {torch.__version__}" in out
    header = "| " + " | ".join(speed.COLUMNS) + " |"
    assert header in out and "|---|---:|" in out
    assert "## custom-1000: 0.0M float32 params in 1 tensors" in out


def test_json_holds_the_run_and_every_column(cpu_run):
    _, report = cpu_run
    assert report["device"] == "cpu" and report["torch"] == torch.__version__
    assert report["bandwidth_gbs"] > 0 and report["bandwidth_method"] == "in-place"
    assert report["steps"] == 2 and report["warmup"] == 1
    (work,) = report["workloads"]
    assert (work["name"], work["params"], work["tensors"], work["dtype"]) == (
        "custom-1000", 1000, 1, "float32")
    rows = {r["row"]: r for r in work["rows"] if r["status"] == "ok"}
    fused = rows["adan fused"]
    for key in ("device_ms", "host_ms", "gbs", "floor_ms", "x_floor", "pct_copy_bw", "first_s",
                "graphs_after_first", "state_bytes_per_param"):
        assert isinstance(fused[key], (int, float)), key
    assert len(fused["device_ms_steps"]) == 2 and fused["peak_bytes_per_param"] is None
    assert fused["bytes_per_param"] == 44 and fused["state_bytes_per_param"] == 16
    assert rows["torch AdamW fused"]["bytes_per_param"] == 28
    assert rows["adan state bf16"]["bytes_per_param"] == 28
    assert fused["x_floor"] == pytest.approx(100 / fused["pct_copy_bw"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    assert benchmarks_main(["speed", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "error: --device cuda, but CUDA is not available" in err
    assert "Traceback" not in err


def test_bad_arguments_are_errors_not_tracebacks(capsys):
    assert speed.main(["--device", "cpu", "--workload", "nope"]) == 2
    assert speed.main(["--device", "mps"]) == 2
    assert speed.main(["--device", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "no workload named 'nope'" in err and "only cpu and cuda" in err
    assert "bad --device 'nonsense'" in err


def test_real_sail_sg_copy_loads_without_shadowing_ours():
    peers = find_peers_dir()
    if peers is None or not (peers / "sail-sg-adan" / "adan.py").is_file():
        pytest.skip("no sail-sg copy in .peers or ../shared/peers")
    cls, missing = load_sail_sg_adan(peers)
    assert cls.__name__ == "Adan" and cls.__module__ == "_sail_sg_adan"
    assert sys.modules["adan"] is adan
    assert str((peers / "sail-sg-adan").resolve()) not in sys.path
    assert missing is None or "build_ext --inplace" in missing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_measures_every_row(tmp_path: Path, capsys):
    out_json = tmp_path / "speed.json"
    argv = ["--device", "cuda", "--workload", "custom", "--numel", "100000", "--steps", "2",
            "--warmup", "1", "--bandwidth-mib", "64", "--json", str(out_json)]
    assert speed.main(argv) == 0
    report = json.loads(out_json.read_text())
    assert report["bandwidth_method"] == "copy" and report["device_name"]
    for result in report["workloads"][0]["rows"]:
        assert result["status"] in ("ok", "skipped"), result
        if result["status"] == "ok":
            assert result["peak_bytes_per_param"] is not None and result["device_ms"] > 0
            assert result.get("leaked_bytes", 0) < 2**20, result  # freed between rows


def test_an_interrupt_keeps_the_rows_measured_so_far(tmp_path: Path, monkeypatch, capsys):
    real = speed.run_row

    def interrupted_on_second_row(row: speed.Row, *args: Any) -> dict[str, Any]:
        if row.name != "adan foreach":
            raise KeyboardInterrupt
        return real(row, *args)

    monkeypatch.setattr(speed, "run_row", interrupted_on_second_row)
    out_json = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--workload", "custom", "--numel", "100", "--steps", "1",
            "--bandwidth-mib", "4", "--rows", "adan foreach,AdamW foreach",
            "--json", str(out_json)]
    assert speed.main(argv) == 130
    assert "| adan foreach |" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["interrupted"] is True
    assert [r["row"] for r in report["workloads"][0]["rows"]] == ["adan foreach"]


def test_the_deciding_columns_come_first():
    assert speed.COLUMNS[:4] == ("row", "device ms", "x floor", "vs best peer")


@pytest.mark.parametrize("cache", [None, 1 << 40])
def test_a_working_set_in_cache_is_marked_and_floored_by_its_own_size(
        cache: int | None, tmp_path: Path, monkeypatch, capsys):
    """With the last-level cache unknown the DRAM floor applies; once the working set fits in
    it, the row says (cache) and its floor is the bandwidth measured at the working set's size."""
    monkeypatch.setattr(speed, "cache_bytes", lambda device: cache)
    out_json = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--workload", "custom", "--numel", "1000", "--steps", "1",
            "--bandwidth-mib", "4", "--rows", "adan foreach", "--json", str(out_json)]
    assert speed.main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    (row,) = report["workloads"][0]["rows"]
    assert row["working_set_bytes"] == 1000 * (4 + 4 + 16)
    assert row["in_cache"] is (cache is not None)
    assert (row["floor_gbs"] == report["bandwidth_gbs"]) is (cache is None)
    line = next(text for text in out.splitlines() if text.startswith("| adan foreach |"))
    assert ("(cache)" in line) is (cache is not None)
    assert ("- (cache): 1 rows' working sets" in out) is (cache is not None)


def test_cache_size_is_read_or_unknown():
    size = speed.cache_bytes(torch.device("cpu"))
    assert size is None or size >= 1 << 16


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m benchmarks speed")
    assert "(default: 10000000)" in out and "(default: 20)" in out
