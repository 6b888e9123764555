"""Scenarios run in each spawned process by test_distributed.py (gloo on CPU, float64).

Every scenario trains the same tiny model on the same global batches and writes, from rank 0,
the full (unsharded) gradients seen at each step and the final full parameters, so the parent
can replay them through the float64 reference.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from adan import Adan

GLOBAL_BATCH = 8
STEPS = 6
GROUP_HPARAMS = [dict(lr=0.02, weight_decay=0.05), dict(lr=0.01, weight_decay=0.0)]


def make_model() -> nn.Module:
    """A two-layer MLP; the second layer's 5 rows shard unevenly (3 + 2) over two ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weights (with weight decay) and biases (without, own lr) as two groups."""
    named = list(model.named_parameters())
    weights = [p for n, p in named if n.endswith("weight")]
    biases = [p for n, p in named if n.endswith("bias")]
    return [{"params": ps, **hp} for ps, hp in zip([weights, biases], GROUP_HPARAMS, strict=True)]


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch for ``step`` (the same on every launch)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 5, generator=gen, dtype=torch.float64)
    size = GLOBAL_BATCH // world
    return x[rank * size:(rank + 1) * size], y[rank * size:(rank + 1) * size]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, world: int,
          clip: float = 0.0) -> list[list[torch.Tensor]]:
    """Train on ``steps``; return the full gradients each step hands to the optimizer.

    ``clip`` > 0 clips them first with ``torch.nn.utils.clip_grad_norm_``. The step must leave
    ``.grad`` as it was.
    """
    seen = []
    for k in steps:
        x, y = batch(k, rank, world)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        seen.append([full(p.grad) for p in model.parameters()])
        opt.step()
        for p, g in zip(model.parameters(), seen[-1], strict=True):
            assert torch.equal(full(p.grad), g), "the optimizer step modified .grad"
    return seen


def shard(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def save(out: Path, name: str, rank: int, model: nn.Module, **extra: Any) -> None:
    result = {"params": [full(p) for p in model.parameters()], **extra}
    if rank == 0:
        torch.save(result, out / f"{name}.pt")


def fsdp(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """FSDP2 with Adan's own clipping, without and with a clipping threshold.

    With ``grad_norm_group`` too (as under ZeRO), DTensor norms must not be summed once more.
    """
    for name, max_grad_norm, group in (("0.0", 0.0, None), ("0.05", 0.05, None),
                                        ("0.05-group", 0.05, dist.group.WORLD)):
        model = shard(make_model())
        opt = Adan(param_groups(model), max_grad_norm=max_grad_norm, grad_norm_group=group,
                   **opt_kwargs)
        grads = train(model, opt, range(STEPS), rank, world)
        save(out, f"fsdp-{name}", rank, model, grads=grads, state_layout=state_layout(model, opt),
             plain_state_rejected=plain_state_rejected(opt))


def state_layout(model: nn.Module, opt: Adan) -> dict[str, Any]:
    """How the first parameter's state is held, and how state_dict() hands it out."""
    param = next(iter(model.parameters()))
    state, saved = opt.state[param], opt.state_dict()["state"][0]
    return {key: (type(state[key]).__name__, state[key].dtype, type(saved[key]).__name__,
                  saved[key].dtype) for key in ("exp_avg", "exp_avg_sq", "prev_grad")}


def plain_state_rejected(opt: Adan) -> bool:
    """Whether unsharded state loaded for DTensor params is refused clearly, leaving the
    optimizer as it was."""
    state_dict = opt.state_dict()
    for state in state_dict["state"].values():
        for key, value in state.items():
            state[key] = full(value)
    before = {id(s): dict(s) for s in opt.state.values()}
    try:
        opt.load_state_dict(state_dict)
    except ValueError as exc:
        clear = "set_optimizer_state_dict" in str(exc)
    else:
        clear = False
    return clear and all(dict(s) == before[id(s)] for s in opt.state.values())


def fsdp_compact(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """FSDP2 with compact state (``opt_kwargs["state_dtype"]``) and clipping."""
    model = shard(make_model())
    opt = Adan(param_groups(model), **opt_kwargs)
    grads = train(model, opt, range(STEPS), rank, world)
    save(out, "fsdp_compact", rank, model, grads=grads, state_layout=state_layout(model, opt))


def ddp(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    model = DistributedDataParallel(make_model())
    opt = Adan(param_groups(model.module), **opt_kwargs)
    grads = train(model, opt, range(STEPS), rank, world)
    save(out, "ddp", rank, model, grads=grads)


def zero(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """ZeRO-1 with Adan's own clipping over all partitions; a consolidated checkpoint mid-way.

    Steps 0-2 run, ZeRO's state dict is consolidated on rank 0 and saved with ``torch.save``;
    fresh optimizers on every rank load it and run the remaining steps.
    """
    model = DistributedDataParallel(make_model())
    grads = []
    for steps in (range(STEPS // 2), range(STEPS // 2, STEPS)):
        opt = ZeroRedundancyOptimizer(param_groups(model.module), optimizer_class=Adan,
                                      grad_norm_group=dist.group.WORLD, **opt_kwargs)
        if steps.start:
            opt.load_state_dict(torch.load(out / "zero-optim.pt"))
        grads += train(model, opt, steps, rank, world)
        opt.consolidate_state_dict(to=0)
        if rank == 0 and not steps.start:
            torch.save(opt.state_dict(), out / "zero-optim.pt")
        dist.barrier()
    save(out, "zero", rank, model, grads=grads, local_states=len(opt.optim.state))


def dcp_save(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """Train the first ``stop`` steps with FSDP2 and write a distributed checkpoint."""
    model = shard(make_model())
    opt = Adan(param_groups(model), **opt_kwargs["adan"])
    grads = train(model, opt, range(opt_kwargs["stop"]), rank, world)
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=out / "ckpt")
    save(out, "dcp_save", rank, model, grads=grads)


def dcp_resume(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """Fresh processes: load the checkpoint (FSDP2 on 2 ranks, a plain model on 1), continue.

    8-bit state is saved dequantised, as float32 DTensors; a plain model's own 8-bit state
    dict (codes) is no template for it, so one process converts the checkpoint to a torch.save
    file instead, as the docs say.
    """
    model = shard(make_model()) if world > 1 else make_model()
    opt = Adan(param_groups(model), **opt_kwargs["adan"])
    if world == 1 and opt_kwargs["adan"].get("state_dtype") == "int8":
        dcp_to_torch_save(out / "ckpt", out / "ckpt.pt")
        state = torch.load(out / "ckpt.pt")
    else:
        state = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=out / "ckpt")
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    grads = train(model, opt, range(opt_kwargs["stop"], STEPS), rank, world)
    save(out, f"dcp_resume-{world}", rank, model, grads=grads)


def release(rank: int, world: int, out: Path, opt_kwargs: dict[str, Any]) -> None:
    """Gradient release under DDP (stepped in DDP's communication hook, after the all-reduce);
    refused without DDP (a local gradient) and under FSDP2 (no hook after its reduce-scatter)."""
    model = DistributedDataParallel(make_model())
    opt = Adan(param_groups(model.module), gradient_release=True, **opt_kwargs)
    opt.register_ddp(model)
    freed = True
    for k in range(STEPS):
        x, y = batch(k, rank, world)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        freed &= all(p.grad is None for p in model.parameters())
        opt.step()
    local = make_model()
    local_opt = Adan(local.parameters(), gradient_release=True)  # noqa: F841 (kept alive)
    try:
        F.mse_loss(local(batch(0, rank, world)[0]), batch(0, rank, world)[1]).backward()
    except RuntimeError as exc:
        local_refused = "register_ddp" in str(exc)
    try:
        Adan(shard(make_model()).parameters(), gradient_release=True)
    except ValueError as exc:
        fsdp_refused = "FSDP2" in str(exc)
    save(out, "release", rank, model.module, freed=freed, local_refused=local_refused,
         fsdp_refused=fsdp_refused)
    model = DistributedDataParallel(make_model())  # accumulation: no_sync(), then a synced pass
    opt = Adan(param_groups(model.module), gradient_release=True, **opt_kwargs)
    opt.register_ddp(model)
    for k in range(STEPS):
        x, y = batch(k, rank, world)
        with model.no_sync():
            F.mse_loss(model(x[:2]), y[:2]).backward()
        F.mse_loss(model(x[2:]), y[2:]).backward()
        opt.step()
    save(out, "release-accumulated", rank, model.module)


SCENARIOS = {f.__name__: f for f in (fsdp, fsdp_compact, ddp, zero, dcp_save, dcp_resume,
                                     release)}


def entry(rank: int, world: int, port: int, scenario: str, out: str,
          opt_kwargs: dict[str, Any]) -> None:
    """Process entry point for ``torch.multiprocessing.start_processes``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        SCENARIOS[scenario](rank, world, Path(out), opt_kwargs)
    finally:
        dist.destroy_process_group()
