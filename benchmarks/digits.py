"""A small residual CNN on scikit-learn's handwritten digits (8x8, shipped with the package).

The 1,797 images are split once (fixed permutation) into 300 for training and 1,497 for
validation. Training batches are randomly rotated, scaled, shifted and noised so that the
network cannot simply memorise 300 images and every optimizer saturates at the same loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adan.demo.charlm import param_groups
from adan.demo.loop import cap_threads, fit

__all__ = ["Digits", "DigitsConfig", "DigitsResNet", "train_digits"]

N_TRAIN = 300


class Digits:
    """The digits as float images in [0, 1] of shape ``(N, 1, 8, 8)``, split train/val."""

    def __init__(self, images: Tensor, labels: Tensor, n_train: int = N_TRAIN) -> None:
        if not 0 < n_train < len(images):
            raise ValueError(f"n_train must be in [1, {len(images) - 1}], got {n_train}")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        images, labels = images[order], labels[order]
        self.train_x, self.train_y = images[:n_train], labels[:n_train]
        self.val_x, self.val_y = images[n_train:], labels[n_train:]

    @classmethod
    def load(cls) -> Digits:
        """scikit-learn's copy of the UCI digits (no download)."""
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "the cnn task needs scikit-learn: pip install 'adan[bench]'"
            ) from err
        raw = load_digits()
        images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return cls(images, torch.tensor(raw.target, dtype=torch.int64))


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random rotation (+-15 degrees), scale (0.9-1.1), shift (+-1 pixel) and pixel noise."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(15)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 8)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    moved = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    return moved + 0.1 * torch.randn(x.shape, generator=gen)


class _Block(nn.Module):
    """Two 3x3 conv-BN layers on a residual path (a 1x1 projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class DigitsResNet(nn.Module):
    """Stem, two blocks at 8x8 with ``width`` channels, two at 4x4 with twice that, linear head."""

    def __init__(self, width: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_Block(width, width, 1), _Block(width, width, 1),
                                    _Block(width, 2 * width, 2), _Block(2 * width, 2 * width, 1))
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for images ``(N, 1, 8, 8)``."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


@dataclass
class DigitsConfig:
    """Model width and schedule: 64 epochs of the 300 training images at batch 64."""

    width: int = 32
    batch_size: int = 64
    max_iters: int = 300
    warmup_iters: int = 15
    lr_decay_to: float = 0.01
    grad_clip: float = 0.0
    eval_interval: int = 30
    seed: int = 0


def _loss_and_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a fixed, un-augmented set."""
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def train_digits(
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    cfg: DigitsConfig,
    data: Digits,
    progress: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train a fresh, seed-initialised DigitsResNet; returns :func:`adan.demo.loop.fit`'s
    record plus ``final_val_acc``. Train loss is measured on the un-augmented training
    images so it is comparable with the validation loss."""
    cap_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DigitsResNet(cfg.width)
        optimizer = make_optimizer(param_groups(model))
        gen = torch.Generator().manual_seed(cfg.seed)
        train_probe = (data.train_x, data.train_y)

        def train_loss() -> Tensor:
            idx = torch.randint(len(data.train_x), (cfg.batch_size,), generator=gen)
            x = augment(data.train_x[idx], gen)
            return F.cross_entropy(model(x), data.train_y[idx])

        def evaluate() -> tuple[float, float]:
            return (_loss_and_accuracy(model, *train_probe)[0],
                    _loss_and_accuracy(model, data.val_x, data.val_y)[0])

        result = fit(model, optimizer, cfg, train_loss, evaluate, progress)
        model.eval()
        with torch.no_grad():
            result["final_val_acc"] = _loss_and_accuracy(model, data.val_x, data.val_y)[1]
    return result
