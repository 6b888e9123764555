"""The study's optimizers: each built with the stated settings, bad names rejected."""

from __future__ import annotations

import pytest
import torch

from adan import Adan
from adan.bench import contenders


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


def test_peers_share_our_settings() -> None:
    for peer in contenders.PEER_NAMES:
        assert contenders.settings(peer, "lm")["weight_decay"] == 0.02
    assert set(contenders.available_peers()) <= set(contenders.PEER_NAMES)


@pytest.mark.parametrize(("name", "family", "match"), [
    ("Lion", "lm", "unknown optimizer 'Lion'"), ("Adan", "rnn", "family must be one of")])
def test_bad_names_are_rejected(name: str, family: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        contenders.settings(name, family)
