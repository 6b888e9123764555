"""A small character-level GPT on Tiny Shakespeare, trained the same way for any optimizer.

The recipe follows nanoGPT's CPU run of ``shakespeare_char``: 4 layers, 4 heads, width 128,
context 64, batch 12, warm-up then cosine decay, gradient clipping at 1.0. Model init and
every batch are fixed by the seed, so optimizers compared with it see identical runs up to
their own updates.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adan.demo.loop import Schedule, cap_threads, fit

__all__ = [
    "DEFAULT_DATA",
    "CharData",
    "CharGPT",
    "CharLMConfig",
    "find_data",
    "estimate_loss",
    "param_groups",
    "train_char_model",
    "train_charlm",
]

DEFAULT_DATA = Path("../shared/data/tinyshakespeare.txt")
_DATA_ENV = "ADAN_DATA"
_SHARED_REL = Path("shared/data/tinyshakespeare.txt")


def find_data(path: str | Path | None = None) -> Path:
    """Locate the training text: ``path``, else ``$ADAN_DATA``, else the default locations."""
    explicit = path if path is not None else os.environ.get(_DATA_ENV) or None
    if explicit is not None:
        chosen = Path(explicit).expanduser()
        if chosen.is_file():
            return chosen
        source = "--data" if path is not None else f"${_DATA_ENV}"
        raise FileNotFoundError(
            f"data file not found: {chosen.resolve()} (given by {source}); "
            f"pass an existing text file with --data PATH or set {_DATA_ENV}"
        )
    tried = [DEFAULT_DATA.resolve()]
    tried += [parent / _SHARED_REL for parent in Path(__file__).resolve().parents]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"data file not found: tried {tried[0]} (the default, {DEFAULT_DATA} relative to the "
        f"current directory) and {_SHARED_REL} above {Path(__file__).resolve().parent}; "
        f"pass the Tiny Shakespeare text with --data PATH or set {_DATA_ENV}"
    )


class CharData:
    """A text encoded per character, split 90/10 into train and validation streams."""

    def __init__(self, text: str) -> None:
        if not text:
            raise ValueError("the text is empty")
        self.chars = sorted(set(text))
        self.vocab_size = len(self.chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        # uint8 keeps the whole corpus at one byte per character when the vocabulary allows it.
        dtype = torch.uint8 if self.vocab_size <= 256 else torch.int64
        encoded = torch.tensor([self.stoi[ch] for ch in text], dtype=dtype)
        n_train = int(0.9 * len(encoded))
        self.train = encoded[:n_train]
        self.val = encoded[n_train:]

    @classmethod
    def from_file(cls, path: str | Path) -> CharData:
        """Read a UTF-8 text file."""
        return cls(Path(path).read_text(encoding="utf-8"))

    def get_batch(
        self, split: str, batch_size: int, block_size: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random ``(inputs, next-character targets)`` windows, reproducible via ``generator``."""
        stream = {"train": self.train, "val": self.val}[split]
        if len(stream) <= block_size:
            raise ValueError(
                f"the {split} split has {len(stream)} characters, too few for block_size "
                f"{block_size}; use a longer text or a shorter context"
            )
        starts = torch.randint(len(stream) - block_size, (batch_size,), generator=generator)
        windows = stream[starts[:, None] + torch.arange(block_size + 1)].long()
        return windows[:, :-1], windows[:, 1:]


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees only itself and the past."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))


class _MLP(nn.Module):
    """Position-wise feed-forward layer, four times wider inside than the residual stream."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: attention then a 4x MLP, each on a residual path."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = _CausalSelfAttention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = _MLP(n_embd, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A GPT over characters; the output head shares its weight with the token embedding."""

    def __init__(
        self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # GPT-2's scaled init: each residual branch's output projection shrinks with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: Tensor) -> Tensor:
        """Next-character logits of shape ``(batch, time, vocab)`` for token ids ``idx``."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclass
class CharLMConfig:
    """Model size and training schedule; the defaults are nanoGPT's CPU shakespeare_char run."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    max_iters: int = 2000
    warmup_iters: int = 100
    lr_decay_to: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    dropout: float = 0.0
    eval_batch_size: int | None = None


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split parameters as nanoGPT does: matrices decay, vectors (LayerNorm gains) do not.

    The first group leaves ``weight_decay`` unset so the optimizer's own default applies.
    """
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class EvalWindows(Protocol):
    """The fields of a character-model configuration that define its evaluation batches."""

    seed: int
    eval_iters: int
    batch_size: int
    eval_batch_size: int | None
    block_size: int


@torch.no_grad()
def estimate_loss(model: nn.Module, data: CharData, cfg: EvalWindows) -> tuple[float, float]:
    """Mean train and val loss of a ``(batch, time) -> logits`` model over the same
    ``eval_iters`` batches at every evaluation (of ``eval_batch_size``, default the
    training batch size)."""
    batch = cfg.eval_batch_size or cfg.batch_size
    means = []
    for offset, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + offset)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, batch, cfg.block_size, gen)
            logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        means.append(total / cfg.eval_iters)
    return means[0], means[1]


class CharRun(EvalWindows, Schedule, Protocol):
    """A character-model configuration: evaluation windows plus the training schedule."""


def train_char_model(
    build_model: Callable[[], nn.Module],
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    cfg: CharRun,
    data: CharData,
    progress: Callable[[int, float, float], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``build_model()`` (a ``(batch, time) -> logits`` model, built under ``cfg.seed``)
    on next-character prediction with the same seeded batches for any optimizer."""
    cap_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model()
        optimizer = make_optimizer(param_groups(model))
        batches = torch.Generator().manual_seed(cfg.seed)

        def train_loss() -> Tensor:
            x, y = data.get_batch("train", cfg.batch_size, cfg.block_size, batches)
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        return fit(model, optimizer, cfg, train_loss, lambda: estimate_loss(model, data, cfg),
                   progress, on_step)


def train_charlm(
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    cfg: CharLMConfig,
    data: CharData,
    progress: Callable[[int, float, float], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train a fresh, seed-initialised CharGPT with the optimizer built from its param groups.

    ``make_optimizer`` receives the param groups and returns the optimizer; the peak learning
    rate of each group is the ``lr`` it has after that call. ``progress(iter, train_loss,
    val_loss)`` is called at every evaluation, ``on_step(done)`` after every step. Returns
    what :func:`adan.demo.loop.fit` does: loss curves, final losses, the parameter count and
    the wall time of training and evaluation (model and optimizer construction, which may
    import things once, not counted), with the time inside ``optimizer.step()``.
    """
    return train_char_model(
        lambda: CharGPT(data.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        cfg.dropout),
        make_optimizer, cfg, data, progress, on_step)
