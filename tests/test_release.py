"""Gradient release (``gradient_release=True``): each parameter is stepped inside backward.

Training with release must equal training without it, bit for bit on every path and state
format (stochastic rounding's noise depends on the parameter, step and element alone).
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_runs, route_cpu_to_triton
from reference import ReferenceAdan, RefGroup
from torch import nn

import adan.release
from adan import Adan

STEPS = 4


@pytest.fixture(params=["each", "small-together"])
def release_mode(request, monkeypatch):
    """Every parameter stepped in its own hook, or (the default for these tiny models, whose
    tensors are all small) the small ones stepped together at the end of backward."""
    if request.param == "each":
        monkeypatch.setattr(adan.release, "SMALL_NUMEL", 0)
    return request.param


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)


class TinyTransformer(nn.Module):
    """Embedding, one pre-norm attention block (no dropout) and a tied-free head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 16)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(16, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


MODELS = {"mlp": mlp, "transformer": TinyTransformer}


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    """A deterministic batch and loss for ``step`` (the same for every run)."""
    gen = torch.Generator().manual_seed(100 + step)
    if isinstance(model, TinyTransformer):
        x = torch.randint(0, 11, (3, 5), generator=gen)
        return F.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())
    dtype = next(model.parameters()).dtype
    x = torch.randn(4, 6, generator=gen, dtype=dtype)
    return F.mse_loss(model(x), torch.randn(4, 3, generator=gen, dtype=dtype))


def groups(model: nn.Module, release: bool) -> list[dict]:
    """Matrices with weight decay, vectors without and with their own lr."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.05},
            {"params": [p for p in params if p.dim() <= 1], "lr": 0.004,
             "gradient_release": release}]


def make(model: nn.Module, release: bool, **kwargs) -> Adan:
    return Adan(groups(model, release), lr=0.01, gradient_release=release, **kwargs)


def train(model: nn.Module, opt: Adan, steps: range, sched=None) -> None:
    for k in steps:
        opt.zero_grad()
        loss_of(model, k).backward()
        opt.step()
        if sched is not None:
            sched.step()


def pair(name: str, steps: int = STEPS, **kwargs) -> tuple[nn.Module, nn.Module]:
    """The same model trained without and with release; the released one's grads checked."""
    plain, released = MODELS[name](), MODELS[name]()
    torch.manual_seed(5)  # both runs draw the optimizer's rounding seed from here
    train(plain, make(plain, False, **kwargs), range(steps))
    torch.manual_seed(5)
    opt = make(released, True, **kwargs)
    for k in range(steps):
        loss_of(released, k).backward()
        assert all(p.grad is None for p in released.parameters())
        opt.step()
    return plain, released


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True), dict(fused=True),
                                  dict(no_prox=True, maximize=True)], ids=str)
def test_release_is_bit_identical_to_the_normal_step(name, path, release_mode):
    plain, released = pair(name, **path)
    assert_same(plain, released)


def distance(a: nn.Module, b: nn.Module) -> float:
    return float(torch.cat([(p - q).detach().flatten() for p, q in zip(a.parameters(),
                                                                       b.parameters(),
                                                                       strict=True)]).norm())


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("path", [dict(foreach=False), dict()], ids=["eager", "compiled"])
def test_compact_state_is_bit_identical_to_the_normal_step(fmt, path, release_mode):
    """Rounding noise is a function of (seed, step, element), and a parameter's seed of its
    position in the optimizer, not of the order states are created in (backward's, with
    release): compact state released equals the normal step's bit for bit."""
    plain, released = pair("transformer", 6, state_dtype=fmt, **path)
    assert_same(plain, released)


@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True)], ids=str)
def test_release_matches_the_float64_reference(path, release_mode):
    """Gradients recorded by tensor hooks (before release frees them), replayed in float64."""
    model = mlp(torch.float64)
    opt = make(model, True, **path)
    params = list(model.parameters())
    seen: list[dict[int, np.ndarray]] = []
    for i, p in enumerate(params):
        p.register_hook(lambda g, i=i: seen[-1].__setitem__(i, g.detach().numpy().copy()))
    init = [p.detach().numpy().copy() for p in params]
    for k in range(6):
        seen.append({})
        loss_of(model, k).backward()
        opt.step()
    mats = [i for i, p in enumerate(params) if p.dim() > 1]
    vecs = [i for i, p in enumerate(params) if p.dim() <= 1]
    ref = ReferenceAdan([RefGroup([init[i] for i in mats], lr=0.01, weight_decay=0.05),
                         RefGroup([init[i] for i in vecs], lr=0.004)])
    for grads in seen:
        ref.step([[grads[i] for i in mats], [grads[i] for i in vecs]])
    for index, arr in zip(mats + vecs, ref.groups[0].params + ref.groups[1].params,
                          strict=True):
        np.testing.assert_allclose(params[index].detach().numpy(), arr, rtol=1e-12,
                                   atol=1e-12)


def test_step_updates_nothing_but_runs_closure_and_hooks():
    model = mlp()
    opt = make(model, True)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    loss_of(model, 0).backward()
    after_backward = [p.detach().clone() for p in model.parameters()]
    assert all(len(s) for s in opt.state.values()) and len(opt.state) == 4
    opt.step()
    assert calls == ["pre", "post"]
    for p, q in zip(model.parameters(), after_backward, strict=True):
        assert torch.equal(p, q)
    loss = opt.step(lambda: loss_of(model, 1).backward() or 1.5)  # the closure releases
    assert loss == 1.5 and all(s["step"].item() == 2 for s in opt.state.values())


def test_a_second_backward_without_a_step_raises_before_any_update():
    model = mlp()
    opt = make(model, True)
    loss_of(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="pause_gradient_release"):
        loss_of(model, 1).backward()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    assert all(s["step"].item() == 1 for s in opt.state.values())
    opt.zero_grad()  # ends the iteration: the next backward releases again
    loss_of(model, 1).backward()
    assert all(s["step"].item() == 2 for s in opt.state.values())


def test_pause_accumulates_as_a_normal_accumulation_step():
    plain, released = mlp(), mlp()
    opt_a, opt_b = make(plain, False), make(released, True)
    for k in range(3):
        for micro in range(3):
            loss_of(plain, 3 * k + micro).backward()
        opt_a.step()
        opt_a.zero_grad()
        for micro in range(2):
            with opt_b.pause_gradient_release():
                loss_of(released, 3 * k + micro).backward()
            assert all(p.grad is not None for p in released.parameters())
        loss_of(released, 3 * k + 2).backward()
        assert all(p.grad is None for p in released.parameters())
        opt_b.step()
    assert_same(plain, released)


@pytest.mark.parametrize("options", [{}, {"foreach": False}, {"fused": True},
                                     {"state_dtype": "int8"}, {"state_dtype": "bf16"}], ids=str)
def test_accumulation_leaves_no_stepped_gradient_behind(options):
    """A parameter with no gradient in the last micro-batch (a conditional branch, an MoE
    expert) is stepped by opt.step() with what the paused backward accumulated; the README's
    loop (no zero_grad) must not add that gradient to the next iteration's."""
    models = [mlp(), mlp()]
    opts = [make(models[0], False, **options), make(models[1], True, **options)]
    head = list(models[1].parameters())[-2:]  # the last layer's weight and bias

    def micro_loss(model: nn.Module, step: int, last: bool) -> torch.Tensor:
        if not last:
            return loss_of(model, step)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        return model[:2](x).square().mean()  # misses the last layer

    torch.manual_seed(5)  # each run draws its rounding seed from here at its first step
    for k in range(3):
        opts[0].zero_grad()
        for micro in range(2):
            micro_loss(models[0], 2 * k + micro, micro == 1).backward()
        opts[0].step()
    torch.manual_seed(5)
    for k in range(3):
        with opts[1].pause_gradient_release():
            micro_loss(models[1], 2 * k, False).backward()
        micro_loss(models[1], 2 * k + 1, True).backward()
        assert all(p.grad is not None for p in head)  # the branch the last pass missed
        opts[1].step()
        assert all(p.grad is None for p in models[1].parameters())
    assert_same(*models)


@pytest.mark.parametrize("drop", ["del", "kept"])
def test_a_new_release_optimizer_takes_over_from_the_old_one(drop):
    """A new phase creates a new optimizer for the same model: the old one, deleted or still
    referenced (by a scheduler, say), steps nothing more, and the new one steps every
    parameter, as with AdamW."""
    plain, released = mlp(), mlp()
    train(plain, make(plain, False), range(2))
    opt_a = make(plain, False, betas=(0.9, 0.9, 0.9))
    train(plain, opt_a, range(2, 4))
    old = make(released, True)
    for k in range(2):
        loss_of(released, k).backward()
        old.step()
    old_steps = [old.state[p]["step"].item() for p in released.parameters()]
    kept = old if drop == "kept" else None
    del old
    new = make(released, True, betas=(0.9, 0.9, 0.9))
    for k in range(2, 4):
        loss_of(released, k).backward()  # no "second backward" error
        new.step()
    assert_same(plain, released)
    assert all(new.state[p]["step"].item() == 2 for p in released.parameters())
    if kept is not None:
        assert [kept.state[p]["step"].item() for p in released.parameters()] == old_steps


def test_hooks_do_not_keep_a_deleted_optimizer_alive():
    import gc
    import weakref

    model = mlp()
    opt = make(model, True)
    loss_of(model, 0).backward()
    opt.step()
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    loss_of(model, 1).backward()  # the hooks stand aside: gradients stay, as with AdamW
    assert all(p.grad is not None for p in model.parameters())


def test_a_backward_that_is_not_the_optimizers_can_be_discarded():
    """A GAN's generator loss reaches the discriminator: inside
    ``pause_gradient_release(discard=True)`` its backward steps nothing of the discriminator
    and leaves it no gradient, as AdamW's loop discards it with the next zero_grad."""
    def gan() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        return nn.Linear(3, 6), nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))

    runs = []
    for release in (False, True):
        gen, disc = gan()
        opt_g = Adan(gen.parameters(), lr=0.01)
        opt_d = Adan(disc.parameters(), lr=0.02, gradient_release=release)
        for k in range(3):
            z = torch.randn(5, 3, generator=torch.Generator().manual_seed(k))
            real = torch.randn(5, 6, generator=torch.Generator().manual_seed(50 + k))
            opt_d.zero_grad()
            (disc(real).mean() - disc(gen(z).detach()).mean()).backward()
            opt_d.step()
            opt_g.zero_grad()
            with opt_d.pause_gradient_release(discard=True):
                disc(gen(z)).mean().backward()
            opt_g.step()
            if release:
                assert all(p.grad is None for p in disc.parameters())
        assert all(opt_d.state[p]["step"].item() == 3 for p in disc.parameters())
        runs.append((gen, disc))
    for plain, released in zip(*runs, strict=True):
        assert_same(plain, released)


def test_a_sparse_gradient_is_refused_naming_the_parameter():
    torch.manual_seed(0)
    embed, head = nn.Embedding(7, 4, sparse=True), nn.Linear(4, 2)
    opt = Adan([{"params": head.parameters()}, {"params": embed.parameters()}],
               lr=0.01, gradient_release=True)
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 1 \(shape \(7, 4\)\)"
                       r".*sparse"):
        head(embed(torch.tensor([1, 2]))).sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.is_sparse
    assert not opt.state.get(embed.weight)


def test_scheduler_lr_is_used_from_the_next_backward():
    plain, released = mlp(), mlp()
    runs = []
    for model, release in ((plain, False), (released, True)):
        opt = make(model, release)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.02], total_steps=10)
        runs.append(opt)
        train(model, opt, range(6), sched)
    assert runs[1].param_groups[0]["lr"] != 0.01
    assert_same(plain, released)


def test_state_dict_round_trip_mid_run_deepcopy_and_pickle():
    full = mlp()
    train(full, make(full, True), range(6))
    half = mlp()
    opt = make(half, True)
    train(half, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert saved["opt"]["param_groups"][0]["gradient_release"] is True
    resumed = mlp()
    resumed.load_state_dict(saved["model"])
    opt_r = make(resumed, True)
    opt_r.load_state_dict(saved["opt"])
    train(resumed, opt_r, range(3, 6))
    assert_same(full, resumed)
    for clone in (copy.deepcopy((half, opt)), pickle.loads(pickle.dumps((half, opt)))):
        train(clone[0], clone[1], range(3, 6))
        assert all(p.grad is None for p in clone[0].parameters())
        assert_same(full, clone[0])
    assert all(s["step"].item() == 3 for s in opt.state.values())  # the original untouched


def test_loading_keeps_each_groups_own_setting():
    model = mlp()
    opt = make(model, True)
    train(model, opt, range(2))
    plain = make(model, False)
    plain.load_state_dict(opt.state_dict())
    opt.remove_gradient_release()
    loss_of(model, 2).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_remove_group_switch_and_added_groups():
    model = mlp()
    params = list(model.parameters())
    opt = Adan(params[:2], gradient_release=True)
    opt.add_param_group({"params": params[2:]})  # inherits the default: released
    loss_of(model, 0).backward()
    assert all(p.grad is None for p in params)
    opt.param_groups[1]["gradient_release"] = False
    opt.zero_grad()
    loss_of(model, 1).backward()
    assert params[0].grad is None and params[2].grad is not None
    state = opt.state[params[2]]["step"].item()
    opt.step()
    assert opt.state[params[2]]["step"].item() == state + 1
    opt.remove_gradient_release()
    opt.zero_grad()
    loss_of(model, 2).backward()
    assert all(p.grad is not None for p in params)
    assert not any(p._post_accumulate_grad_hooks for p in params)


@pytest.mark.parametrize("setting, error, match", [
    (dict(max_grad_norm=1.0), ValueError, "max_grad_norm"),
    (dict(differentiable=True, foreach=False), ValueError, "differentiable"),
    (dict(gradient_release="yes"), ValueError, "gradient_release"),
])
def test_what_cannot_be_released_is_refused_at_set_up(setting, error, match):
    setting = {"gradient_release": True, **setting}
    with pytest.raises(error, match=match):
        Adan(mlp().parameters(), **setting)
    opt = Adan(mlp().parameters())
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **setting})
    assert len(opt.param_groups) == 1


def test_a_setting_changed_to_clipping_is_refused_before_the_update():
    model = mlp()
    opt = make(model, True)
    train(model, opt, range(1))
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["max_grad_norm"] = 1.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        loss_of(model, 1).backward()
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_grad_scaler_is_refused():
    model = mlp()
    opt = make(model, True)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(loss_of(model, 0)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_triton_kernel_per_tensor_with_its_own_cached_table(monkeypatch, fmt):
    """The Triton kernel launched from each hook (CPU tensors through Triton's interpreter in
    CI): plain state bit for bit; each parameter keeps one address table across steps."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from adan.kernels.triton import triton_adan

    route_cpu_to_triton(monkeypatch)
    monkeypatch.setattr(adan.release, "SMALL_NUMEL", 0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plain, released = mlp().to(device), mlp().to(device)
    torch.manual_seed(5)  # both runs draw the optimizer's rounding seed from here
    train(plain, make(plain, False, state_dtype=fmt), range(3))
    torch.manual_seed(5)
    opt = make(released, True, state_dtype=fmt)
    caches = []
    for k in range(3):
        loss_of(released, k).backward()
        plans = [opt._stepper.plans[(e.group, (id(e.param),))]
                 for e in opt._release.entries.values()]
        assert all(plan.calls[0].kernel is triton_adan for plan in plans)
        caches.append([id(plan.calls[0].cache) for plan in plans])
        opt.step()
    # Plans made in the first backward are renewed once (states of later parameters are
    # created after them, which the plans' key counts); then they are kept.
    assert caches[1] == caches[2]
    assert_same(plain, released)


def _new_tensor_lr(group: dict) -> None:
    group["lr"] = torch.tensor(0.02, dtype=torch.float64)


def _halve_lr_in_place(group: dict) -> None:
    group["lr"].mul_(0.5)


# Changes to the first group between iterations: new values (a scheduler's), a betas list, a
# tensor lr (then changed in place, then replaced by another one), a switch of no_prox.
CHANGES = [lambda g: None, lambda g: g.update(lr=0.02), lambda g: g.update(betas=[0.9, 0.8, 0.95]),
           lambda g: g.update(weight_decay=0.2, eps=1e-4), _new_tensor_lr, _halve_lr_in_place,
           lambda g: g.update(no_prox=True), _new_tensor_lr, lambda g: g.update(lr=0.0)]


@pytest.mark.parametrize("path", [dict(foreach=True), dict(fused=True)], ids=str)
def test_settings_changed_between_iterations_reach_the_kept_plans(path, release_mode):
    """Each released parameter keeps its plan and kernel arguments between iterations; every
    change of its group's settings is applied from the next backward, bit for bit as a
    normal step applies it."""
    models = mlp(), mlp()
    opts = [make(models[0], False, **path), make(models[1], True, **path)]
    for k, change in enumerate(CHANGES):
        for model, opt in zip(models, opts, strict=True):
            change(opt.param_groups[0])
            train(model, opt, range(k, k + 1))
    assert_same(*models)


@pytest.mark.parametrize("path", [dict(foreach=True), dict(fused=True)], ids=str)
def test_replaced_or_loaded_state_renews_the_kept_plans(path, release_mode):
    """A kept plan writes the state it was made for: replacing a buffer, a parameter's
    whole state or loading a state dict must renew it (else the old buffers would be
    written), as it renews the normal step's plan."""
    models = mlp(), mlp()
    opts = [make(models[0], False, **path), make(models[1], True, **path)]
    for model, opt in zip(models, opts, strict=True):
        train(model, opt, range(2))
        saved = copy.deepcopy(opt.state_dict())
        train(model, opt, range(2, 4))
        opt.load_state_dict(saved)
        train(model, opt, range(4, 5))
        first, last = list(model.parameters())[0], list(model.parameters())[-1]
        opt.state[first]["exp_avg"] = opt.state[first]["exp_avg"].clone()
        opt.state[last] = {k: v.clone() for k, v in opt.state[last].items()}
        train(model, opt, range(5, 7))
    assert_same_runs(list(models[0].parameters()), opts[0], list(models[1].parameters()),
                     opts[1])
