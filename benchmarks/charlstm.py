"""A character-level LSTM language model on the same text and splits as :mod:`charlm`.

The paper's third model family. Each batch is an independent window (no hidden state carried
across batches), so batches, evaluation and the schedule are exactly those of the GPT task.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adan.demo.charlm import CharData, train_char_model

__all__ = ["CharLSTM", "CharLSTMConfig", "train_charlstm"]


class CharLSTM(nn.Module):
    """Embedding, a stacked LSTM and a linear read-out of next-character logits."""

    def __init__(self, vocab_size: int, n_embd: int, hidden: int, n_layer: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.lstm = nn.LSTM(n_embd, hidden, n_layer, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits of shape ``(batch, time, vocab)`` for token ids ``idx``."""
        out, _ = self.lstm(self.emb(idx))
        return self.head(out)


@dataclass
class CharLSTMConfig:
    """Model size and schedule: a 2-layer, 128-unit LSTM, about 45 s on one core."""

    n_embd: int = 64
    hidden: int = 128
    n_layer: int = 2
    block_size: int = 64
    batch_size: int = 32
    max_iters: int = 800
    warmup_iters: int = 40
    lr_decay_to: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_iters: int = 10
    seed: int = 1337
    eval_batch_size: int | None = None


def train_charlstm(
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    cfg: CharLSTMConfig,
    data: CharData,
    progress: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train a fresh, seed-initialised CharLSTM; returns :func:`adan.demo.loop.fit`'s record."""
    return train_char_model(
        lambda: CharLSTM(data.vocab_size, cfg.n_embd, cfg.hidden, cfg.n_layer),
        make_optimizer, cfg, data, progress)
