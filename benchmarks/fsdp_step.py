"""Time ``optimizer.step()`` on FSDP2-sharded parameters: Adan's paths beside torch's AdamW.

    torchrun --nproc_per_node 2 benchmarks/fsdp_step.py

Every optimizer steps the same sharded MLP in turn, interleaved round by round so that load from
other processes hits them alike; rank 0 prints the median step time of each and its ratio to
AdamW (foreach), which runs its foreach ops through DTensor dispatch. The "plain shards" rows
step ordinary tensors of the local shards' sizes: the cost without any DTensor.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from adan import Adan


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))
    for layer in model:
        fully_shard(layer)
    fully_shard(model)  # in place: the model's parameters become DTensors
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    factories: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "Adan foreach": lambda ps: Adan(ps, lr=1e-3, foreach=True),
        "Adan single": lambda ps: Adan(ps, lr=1e-3, foreach=False),
        "Adan foreach clip": lambda ps: Adan(ps, lr=1e-3, foreach=True, max_grad_norm=1.0),
    }
    setups = {}
    for name, factory in factories.items():
        model = make_model(args.width, args.depth)
        model(torch.randn(4, args.width)).sum().backward()
        setups[name] = factory(list(model.parameters()))
        setups[name].step()  # creates the state
    for name, factory in {"AdamW foreach, plain shards": factories["AdamW foreach"],
                          "Adan foreach, plain shards": factories["Adan foreach"],
                          "Adan foreach clip, plain shards": factories["Adan foreach clip"],
                          }.items():
        model = make_model(args.width, args.depth)
        model(torch.randn(4, args.width)).sum().backward()
        plain = [nn.Parameter(cast(DTensor, p).to_local().clone()) for p in model.parameters()]
        for p, q in zip(plain, model.parameters(), strict=True):
            p.grad = cast(DTensor, q.grad).to_local().clone()
        setups[name] = factory(plain)
        setups[name].step()
    times: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, opt in setups.items():
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        numel = sum(p.numel() for p in make_model(args.width, args.depth).parameters())
        print(f"{numel / 1e6:.2f} M parameters over {dist.get_world_size()} ranks, "
              f"median of {args.rounds} steps")
        base = statistics.median(times["AdamW foreach"])
        for name, values in times.items():
            med = statistics.median(values)
            print(f"{name:32s} {med * 1e3:8.2f} ms   x{med / base:.2f} of AdamW foreach")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
