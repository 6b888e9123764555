"""The study's optimizers: each built with the stated settings, bad names rejected."""

from __future__ import annotations

import pytest
import torch

from adan import Adan
from benchmarks import contenders


@pytest.mark.parametrize("family", ["lm", "cnn"])
@pytest.mark.parametrize("name", [contenders.OURS, *contenders.BASELINES])
def test_build_uses_lr_and_settings(name: str, family: str) -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = contenders.build(name, [{"params": [param]}], 0.125, family)
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.125
    for key, value in contenders.settings(name, family).items():
        assert group[key] == value, key
    assert isinstance(optimizer, Adan) == (name == contenders.OURS)


def test_sgd_is_nesterov_and_adam_family_uses_nanogpt_betas_on_lms() -> None:
    assert contenders.settings("SGD-Nesterov", "lm") == dict(momentum=0.9, nesterov=True,
                                                             weight_decay=0.0)
    assert contenders.settings("AdamW", "lm")["betas"] == (0.9, 0.99)
    assert contenders.settings("Adan", "cnn") == dict(weight_decay=0.02)


def test_peers_and_control_share_our_settings() -> None:
    for peer in contenders.PEER_NAMES:
        assert contenders.settings(peer, "lm")["weight_decay"] == 0.02
    found = contenders.available_peers()
    assert found[0] == contenders.CONTROL
    assert set(found[1:]) <= set(contenders.PEER_NAMES)
    param = torch.nn.Parameter(torch.zeros(3))
    control = contenders.build(contenders.CONTROL, [{"params": [param]}], 0.1, "lm")
    assert isinstance(control, Adan)
    assert control.param_groups[0]["foreach"] is False
    assert control.param_groups[0]["fused"] is False


@pytest.mark.parametrize(("name", "family", "match"), [
    ("Lion", "lm", "unknown optimizer 'Lion'"), ("Adan", "rnn", "family must be one of")])
def test_bad_names_are_rejected(name: str, family: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        contenders.settings(name, family)
