"""Train a small character-level transformer with Adan under FSDP2, with DCP checkpoints.

    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 200 --save /tmp/adan-200
    torchrun --nproc_per_node 2 examples/fsdp_train.py --steps 300 --load /tmp/adan-200
    torchrun --nproc_per_node 1 examples/fsdp_train.py --steps 300 --load /tmp/adan-200

The last line resumes the 2-rank checkpoint on 1 rank: DCP reshards parameters and Adan state.

Runs on CPU (gloo) or on GPUs (nccl, one per process). Parameters, gradients and Adan's state are
sharded DTensors; ``max_grad_norm`` clips by the norm over all shards on all ranks.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

from adan import Adan


class CharTransformer(nn.Module):
    """A causal transformer over characters: embeddings, pre-norm blocks and a linear head."""

    def __init__(self, vocab: int, context: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True)
            for _ in range(depth)
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-character cross-entropy loss."""
        x = self.embed(idx) + self.position[: idx.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], device=idx.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def batches(data: torch.Tensor, step: int, rank: int, batch: int, context: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's random windows for ``step`` (reproducible, different on every rank)."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    starts = torch.randint(len(data) - context - 1, (batch,), generator=gen)
    x = torch.stack([data[s:s + context] for s in starts])
    y = torch.stack([data[s + 1:s + context + 1] for s in starts])
    return x.to(device), y.to(device)


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (gloo has no AVG reduction)."""
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ADAN_DATA",
                                                         "../shared/data/tinyshakespeare.txt"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--load", type=Path, default=None, help="resume from this checkpoint")
    parser.add_argument("--save", type=Path, default=None, help="checkpoint here at the end")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    text = Path(args.data).read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text[:200_000]], dtype=torch.long)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    torch.manual_seed(0)  # the same initial weights on every rank, before sharding
    model = CharTransformer(len(chars), args.context).to(device)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    opt = Adan(model.parameters(), lr=args.lr, weight_decay=0.02, max_grad_norm=1.0)

    start = 0
    if args.load is not None:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state,
                 "step": torch.zeros((), dtype=torch.long)}
        dcp.load(state, checkpoint_id=args.load)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = int(state["step"])

    begin = time.perf_counter()
    for step in range(start, args.steps):
        x, y = batches(train, step, rank, args.batch, args.context, device)
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            loss_all = mean_over_ranks(loss)
            if rank == 0:
                print(f"step {step:4d}  train loss {loss_all:.4f}", flush=True)

    with torch.no_grad():
        x, y = batches(val, 0, rank, 64, args.context, device)
        val_loss = mean_over_ranks(model(x, y))
    if rank == 0:
        print(f"val loss {val_loss:.4f}  ({args.steps - start} steps in "
              f"{time.perf_counter() - begin:.1f} s on {dist.get_world_size()} ranks)")

    if args.save is not None:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state,
                 "step": torch.tensor(args.steps, dtype=torch.long)}
        dcp.save(state, checkpoint_id=args.save)
        if rank == 0:
            print(f"saved step {args.steps} to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
