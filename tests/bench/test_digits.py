"""The digits CNN task: the fixed split, the augmentation and the model's shapes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.digits import N_TRAIN, Digits, DigitsResNet, augment


def test_split_is_fixed_and_disjoint() -> None:
    images = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1).expand(40, 1, 8, 8)
    labels = torch.arange(40) % 10
    a, b = Digits(images, labels, n_train=30), Digits(images, labels, n_train=30)
    assert torch.equal(a.train_x, b.train_x) and len(a.val_x) == 10
    seen = torch.cat([a.train_x[:, 0, 0, 0], a.val_x[:, 0, 0, 0]]).sort().values
    assert torch.equal(seen, torch.arange(40, dtype=torch.float32))
    with pytest.raises(ValueError, match="n_train must be in"):
        Digits(images, labels, n_train=40)


def test_sklearn_digits_load_as_unit_images() -> None:
    data = Digits.load()
    assert data.train_x.shape == (N_TRAIN, 1, 8, 8)
    assert len(data.train_x) + len(data.val_x) == 1797
    assert 0.0 <= data.train_x.min() and data.train_x.max() <= 1.0
    assert set(data.val_y.tolist()) == set(range(10))


def test_augment_moves_pixels_but_keeps_shape_and_is_seeded() -> None:
    x = torch.rand(16, 1, 8, 8)
    one = augment(x, torch.Generator().manual_seed(1))
    assert one.shape == x.shape and not torch.allclose(one, x, atol=0.05)
    assert torch.equal(one, augment(x, torch.Generator().manual_seed(1)))


def test_resnet_gives_class_logits() -> None:
    torch.manual_seed(0)
    assert DigitsResNet(width=8)(torch.rand(5, 1, 8, 8)).shape == (5, 10)
