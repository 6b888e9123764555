"""A small character-level GPT on Tiny Shakespeare, trained the same way for any optimizer.

The recipe follows nanoGPT's CPU run of ``shakespeare_char``: 4 layers, 4 heads, width 128,
context 64, batch 12, warm-up then cosine decay, gradient clipping at 1.0. Model init and
every batch are fixed by the seed, so optimizers compared with it see identical runs up to
their own updates.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_DATA",
    "CharData",
    "CharGPT",
    "CharLMConfig",
    "find_data",
    "param_groups",
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

    def decode(self, ids: Tensor | list[int]) -> str:
        """Turn token ids back into text."""
        return "".join(self.chars[int(i)] for i in ids)

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


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split parameters as nanoGPT does: matrices decay, vectors (LayerNorm gains) do not.

    The first group leaves ``weight_decay`` unset so the optimizer's own default applies.
    """
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _lr_factor(it: int, cfg: CharLMConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``lr_decay_to`` at ``max_iters``."""
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (it - cfg.warmup_iters) / span)
    return cfg.lr_decay_to + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.lr_decay_to)


def _cap_threads() -> None:
    """Keep torch's intra-op pool no larger than the cores this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cores and torch.get_num_threads() > cores:
        torch.set_num_threads(cores)


@torch.no_grad()
def _estimate_loss(
    model: CharGPT, data: CharData, cfg: CharLMConfig
) -> tuple[float, float]:
    """Mean train and val loss over the same ``eval_iters`` batches at every evaluation."""
    model.eval()
    means = []
    for offset, split in enumerate(("train", "val")):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + offset)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, cfg.block_size, gen)
            logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        means.append(total / cfg.eval_iters)
    model.train()
    return means[0], means[1]


def train_charlm(
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    cfg: CharLMConfig,
    data: CharData,
    progress: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train a fresh, seed-initialised CharGPT with the optimizer built from its param groups.

    ``make_optimizer`` receives the param groups and returns the optimizer; the peak learning
    rate of each group is the ``lr`` it has after that call. ``progress(iter, train_loss,
    val_loss)`` is called at every evaluation. Returns the loss curves, final losses, the
    parameter count and the wall time in seconds of training and evaluation (the model and
    optimizer construction, which may include one-time imports, are not counted).
    """
    _cap_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = CharGPT(data.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd,
                        cfg.dropout)
        optimizer = make_optimizer(param_groups(model))
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        start = time.perf_counter()
        batches = torch.Generator().manual_seed(cfg.seed)
        train_curve: list[tuple[int, float]] = []
        val_curve: list[tuple[int, float]] = []

        def evaluate(it: int) -> None:
            train_loss, val_loss = _estimate_loss(model, data, cfg)
            train_curve.append((it, train_loss))
            val_curve.append((it, val_loss))
            if progress is not None:
                progress(it, train_loss, val_loss)

        for it in range(cfg.max_iters):
            if it % cfg.eval_interval == 0:
                evaluate(it)
            factor = _lr_factor(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            x, y = data.get_batch("train", cfg.batch_size, cfg.block_size, batches)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
        evaluate(cfg.max_iters)
    return {
        "val_curve": val_curve,
        "train_curve": train_curve,
        "final_val_loss": val_curve[-1][1],
        "final_train_loss": train_curve[-1][1],
        "n_params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - start,
    }
