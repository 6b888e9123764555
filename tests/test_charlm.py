"""The char-level GPT workload: data lookup, batching, and a short training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_text

from adan import Adan
from adan.demo import charlm
from adan.demo.charlm import CharData, CharGPT, CharLMConfig, find_data, param_groups, train_charlm

TINY = CharLMConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=16, max_iters=60,
                    warmup_iters=5, eval_interval=20, eval_iters=4, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_find_data_prefers_argument_then_env(text_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other.txt"
    other.write_text("xyz", encoding="utf-8")
    monkeypatch.setenv("ADAN_DATA", str(other))
    assert find_data(text_file) == text_file
    assert find_data(None) == other


def test_find_data_default_is_relative_to_cwd(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "shared" / "data" / "tinyshakespeare.txt"
    data.parent.mkdir(parents=True)
    data.write_text("hello", encoding="utf-8")
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.delenv("ADAN_DATA", raising=False)
    assert find_data().resolve() == data.resolve()


@pytest.mark.parametrize("via_env", [False, True])
def test_find_data_missing_names_path_and_override(tmp_path: Path, via_env: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.txt"
    if via_env:
        monkeypatch.setenv("ADAN_DATA", str(missing))
    with pytest.raises(FileNotFoundError) as info:
        find_data(None if via_env else missing)
    message = str(info.value)
    assert str(missing) in message
    assert "--data PATH" in message
    assert "ADAN_DATA" in message


def test_find_data_nothing_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAN_DATA", raising=False)
    monkeypatch.setattr(charlm, "_SHARED_REL", Path("no/such/corpus.txt"))
    with pytest.raises(FileNotFoundError, match="--data PATH") as info:
        find_data()
    assert str((tmp_path / charlm.DEFAULT_DATA).resolve()) in str(info.value)


def test_char_data_split_and_batches() -> None:
    text = tiny_text(1000)
    data = CharData(text)
    assert data.vocab_size == len(set(text))
    assert len(data.train) == 900 and len(data.val) == 100
    assert "".join(data.chars[int(i)] for i in data.train[:20]) == text[:20]
    x, y = data.get_batch("val", 5, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.get_batch("val", 5, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="block_size"):
        data.get_batch("val", 5, 100, torch.Generator())


def test_param_groups_decay_matrices_only() -> None:
    model = CharGPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
    decay, no_decay = param_groups(model)
    assert "weight_decay" not in decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())
    assert model.head.weight is model.tok_emb.weight


def test_train_charlm_learns_and_is_reproducible(text_file: Path) -> None:
    data = CharData.from_file(text_file)
    seen: list[int] = []

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        return Adan(groups, lr=1e-2, weight_decay=0.02)

    result = train_charlm(make, TINY, data, progress=lambda it, tr, va: seen.append(it))
    assert seen == [0, 20, 40, 60]
    assert [it for it, _ in result["val_curve"]] == seen
    assert [it for it, _ in result["train_curve"]] == seen
    assert result["final_val_loss"] == result["val_curve"][-1][1]
    assert result["final_train_loss"] == result["train_curve"][-1][1]
    assert result["seconds"] > 0 and result["n_params"] > 0
    first, last = result["val_curve"][0][1], result["final_val_loss"]
    assert last < 0.6 * first, result["val_curve"]
    again = train_charlm(make, TINY, data)
    assert again["val_curve"] == result["val_curve"]


def test_train_charlm_schedule_warms_up_and_decays(text_file: Path) -> None:
    data = CharData.from_file(text_file)
    cfg = CharLMConfig(**{**TINY.__dict__, "max_iters": 20, "eval_interval": 100})
    lrs: list[float] = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            lrs.append(self.param_groups[0]["lr"])
            assert self.param_groups[1]["lr"] == 2 * lrs[-1]
            return super().step(closure)

    def make(groups: list[dict]) -> torch.optim.Optimizer:
        groups[1]["lr"] = 0.2
        return Recorder(groups, lr=0.1)

    train_charlm(make, cfg, data)
    assert len(lrs) == 20
    assert lrs[0] == pytest.approx(0.1 / 6)
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[-1] > 0.1 * cfg.lr_decay_to and lrs == sorted(lrs[:5]) + sorted(lrs[5:],
                                                                                reverse=True)
