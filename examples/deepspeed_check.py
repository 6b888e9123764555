"""Check Adan as a DeepSpeed client optimizer (ZeRO stage 1 or 2) against a one-process run.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/deepspeed_check.py --stage 2

Trains a tiny MLP for a few steps with DeepSpeed's own gradient clipping, then repeats the same
training in one process with ``torch.nn.utils.clip_grad_norm_`` (the same clipping formula) and
prints the largest parameter difference. Needs ``pip install deepspeed``; runs on CPU with gloo.
"""

from __future__ import annotations

import argparse

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adan import Adan

BATCH, STEPS, CLIP = 8, 10, 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 6, generator=gen), torch.randn(BATCH, 5, generator=gen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = BATCH // world

    model = make_model()
    config = {"train_micro_batch_size_per_gpu": per_rank, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=Adan(model.parameters(), lr=0.02, weight_decay=0.02),
        config=config,
    )
    for k in range(STEPS):
        x, y = batch(k)
        loss = F.mse_loss(engine(x[rank * per_rank:(rank + 1) * per_rank]),
                          y[rank * per_rank:(rank + 1) * per_rank])
        engine.backward(loss)
        engine.step()

    single = make_model()
    opt = Adan(single.parameters(), lr=0.02, weight_decay=0.02)
    clipped = 0
    for k in range(STEPS):
        x, y = batch(k)
        opt.zero_grad()
        F.mse_loss(single(x), y).backward()
        clipped += int(torch.nn.utils.clip_grad_norm_(single.parameters(), CLIP) > CLIP)
        opt.step()
    diff = max((a - b).abs().max().item()
               for a, b in zip(model.parameters(), single.parameters(), strict=True))
    if rank == 0:
        print(f"ZeRO stage {args.stage}, {world} ranks, {STEPS} steps ({clipped} clipped): "
              f"max |DeepSpeed - one process| = {diff:.2e}")


if __name__ == "__main__":
    main()
