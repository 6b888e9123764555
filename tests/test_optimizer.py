"""The Adan optimizer against the float64 reference, in every configuration and path."""

from __future__ import annotations

import copy
import io
import itertools

import numpy as np
import pytest
import torch
from conftest import (
    assert_matches_reference,
    gradients,
    initial_params,
    run_pair,
    step_beside_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ReferenceAdan, RefGroup

from adan import Adan

PATHS = [dict(foreach=False), dict(foreach=True), dict(foreach=True, capturable=True),
         dict(foreach=False, capturable=True)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(f"{k}" for k in p if p[k]))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "no_prox,max_grad_norm,maximize",
    list(itertools.product([False, True], [0.0, 3.0], [False, True])),
)
def test_matches_reference(path, dtype, no_prox, max_grad_norm, maximize):
    """30+ steps, two groups (one with weight decay), a late and an intermittent gradient."""
    kwargs = dict(path, no_prox=no_prox, max_grad_norm=max_grad_norm, maximize=maximize)
    tparams, ref, opt = run_pair(32, dtype, kwargs)
    assert_matches_reference(tparams, ref, opt, **TOL[dtype])


def test_clipping_is_active_in_the_matrix():
    """The clipping threshold used above really clips (the global norm exceeds it)."""
    grads = gradients(1)[0]
    norm = np.sqrt(sum(float(np.sum(g * g)) for gs in grads for g in gs if g is not None))
    assert norm > 3.0


@pytest.mark.parametrize("foreach", [False, True])
def test_default_foreach_choice_matches_reference(foreach):
    tparams, ref, opt = run_pair(31, torch.float64, dict(weight_decay=0.0))
    assert_matches_reference(tparams, ref, opt, **TOL[torch.float64])


finite = dict(allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    b1=st.floats(0.0, 0.999, **finite),
    b2=st.floats(0.0, 0.999, **finite),
    b3=st.floats(0.0, 0.999, **finite),
    lr=st.floats(1e-5, 0.5, **finite),
    eps=st.sampled_from([0.0, 1e-12, 1e-8, 1e-3]),
    wd=st.floats(0.0, 0.5, **finite),
    no_prox=st.booleans(),
    maximize=st.booleans(),
    clip=st.sampled_from([0.0, 0.1, 10.0]),
    foreach=st.booleans(),
    shape=st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple),
    steps=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_property_random_hyperparameters(b1, b2, b3, lr, eps, wd, no_prox, maximize, clip,
                                         foreach, shape, steps, seed):
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=shape)
    p = torch.tensor(p0, dtype=torch.float64)
    opt = Adan([p], lr=lr, betas=(b1, b2, b3), eps=eps, weight_decay=wd, no_prox=no_prox,
               maximize=maximize, max_grad_norm=clip, foreach=foreach)
    ref = ReferenceAdan([RefGroup([p0], lr=lr, betas=(b1, b2, b3), eps=eps, weight_decay=wd,
                                  no_prox=no_prox, maximize=maximize)], max_grad_norm=clip)
    step_beside_reference(p, opt, ref, rng, steps, offset=0.5)
    np.testing.assert_allclose(p.numpy(), ref.groups[0].params[0], rtol=1e-10, atol=1e-12)


# --- state dicts ---------------------------------------------------------------------------


def _train(opt, params, grads_seq):
    for grads in grads_seq:
        for ps, gs in zip(params, grads, strict=True):
            for p, g in zip(ps, gs, strict=True):
                p.grad = None if g is None else torch.tensor(g)
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_is_bit_identical(foreach):
    seq = gradients(20)

    def fresh():
        ps = [[torch.tensor(p) for p in g] for g in initial_params()]
        opt = Adan([{"params": ps[0], "lr": 0.01, "weight_decay": 0.02},
                    {"params": ps[1], "lr": 0.003}], foreach=foreach, max_grad_norm=5.0)
        return ps, opt

    ps_a, opt_a = fresh()
    _train(opt_a, ps_a, seq)

    ps_b, opt_b = fresh()
    _train(opt_b, ps_b, seq[:9])
    buf = io.BytesIO()
    torch.save({"opt": opt_b.state_dict(), "params": ps_b}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    ps_c, opt_c = fresh()
    for pc, pb in zip(itertools.chain(*ps_c), itertools.chain(*saved["params"]), strict=True):
        pc.copy_(pb)
    opt_c.load_state_dict(saved["opt"])
    _train(opt_c, ps_c, seq[9:])
    for a, c in zip(itertools.chain(*ps_a), itertools.chain(*ps_c), strict=True):
        assert torch.equal(a, c)


def _foreign_state_dict(ref: ReferenceAdan, style: str) -> dict:
    """A state dict as sail-sg/Adan or timm save it, built from the reference's state."""
    state, groups, pid = {}, [], 0
    for rg in ref.groups:
        ids = []
        for rs in rg.states:
            if rs.k:
                entry = {"exp_avg": torch.tensor(rs.m), "exp_avg_sq": torch.tensor(rs.n),
                         "exp_avg_diff": torch.tensor(rs.v)}
                if style == "old-reference":
                    entry["pre_grad"] = torch.tensor(rs.prev)
                else:
                    entry["neg_pre_grad"] = torch.tensor(-rs.prev)
                state[pid] = entry
            ids.append(pid)
            pid += 1
        group = dict(lr=rg.lr, betas=rg.betas, eps=rg.eps, weight_decay=rg.weight_decay,
                     max_grad_norm=0.0, no_prox=rg.no_prox, step=rg.states[0].k, params=ids)
        if style == "reference":
            group.update(foreach=True, fused=False)
        if style == "timm":
            group.update(caution=False, foreach=None)
        groups.append(group)
    return {"state": state, "param_groups": groups}


@pytest.mark.parametrize("style", ["reference", "old-reference", "timm"])
def test_loads_foreign_state_dict_and_continues(style):
    """Switching from sail-sg/Adan or timm mid-run continues the same trajectory."""
    rng = np.random.default_rng(3)
    p0 = [rng.normal(size=(3, 4)), rng.normal(size=(6,))]
    ref = ReferenceAdan([RefGroup(p0, lr=0.01, weight_decay=0.02)])
    seq = [[[rng.normal(size=(3, 4)), rng.normal(size=(6,))]] for _ in range(15)]
    for grads in seq[:7]:
        ref.step(grads)
    ps = [torch.tensor(p) for p in ref.groups[0].params]
    opt = Adan(ps, lr=0.01, weight_decay=0.02)
    opt.load_state_dict(_foreign_state_dict(ref, style))
    assert opt.state[ps[0]]["step"].item() == 7
    _train(opt, [ps], seq[7:])
    for grads in seq[7:]:
        ref.step(grads)
    for p, rp in zip(ps, ref.groups[0].params, strict=True):
        np.testing.assert_allclose(p.numpy(), rp, rtol=1e-12, atol=1e-12)


def test_rejects_cautious_timm_state_dict():
    ref = ReferenceAdan([RefGroup([np.ones(3)])])
    ref.step([[np.ones(3)]])
    sd = _foreign_state_dict(ref, "timm")
    sd["param_groups"][0]["caution"] = True
    opt = Adan([torch.ones(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="caution"):
        opt.load_state_dict(sd)


# --- user-owned tensors and bad input -------------------------------------------------------


@pytest.mark.parametrize("path", PATHS[:2], ids=["single", "foreach"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("clip", [0.0, 0.1])
def test_grads_untouched(path, maximize, clip):
    ps = [torch.randn(4, 3), torch.randn(5, dtype=torch.complex64)]
    opt = Adan(ps, maximize=maximize, max_grad_norm=clip, weight_decay=0.1, **path)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        before = [p.grad.clone() for p in ps]
        opt.step()
        for p, b in zip(ps, before, strict=True):
            assert torch.equal(p.grad, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=torch.tensor(-1.0)), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(betas=(0.9, 0.9)), "betas"),
        (dict(betas=(0.9, 0.9, 0.9, 0.9)), "betas"),
        (dict(betas=(1.0, 0.9, 0.9)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1, 0.9)), r"betas\[1\]"),
        (dict(betas=(0.9, 0.9, 1.5)), r"betas\[2\]"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Adan([torch.zeros(2)], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(foreach=True, fused=True),
                                    dict(foreach=True, differentiable=True),
                                    dict(fused=True, differentiable=True)])
def test_contradictory_implementation_flags_raise_runtime_error(kwargs):
    """As torch's optimizers do for foreach+fused and fused+differentiable."""
    with pytest.raises(RuntimeError, match="foreach|fused|differentiable"):
        Adan([torch.zeros(2)], **kwargs)


def test_sparse_gradient_raises_and_leaves_params():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = Adan(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_max_grad_norm_must_agree_across_groups():
    """Rejected when the group is added, and at the step if a group is changed later."""
    a, b = torch.zeros(2), torch.zeros(2)
    with pytest.raises(ValueError, match="max_grad_norm in param group 1"):
        Adan([{"params": [a]}, {"params": [b], "max_grad_norm": 1.0}])
    opt = Adan([{"params": [a]}, {"params": [b]}])
    opt.param_groups[1]["max_grad_norm"] = 1.0
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="max_grad_norm in param group 1"):
        opt.step()
    assert not a.any() and not opt.state


def test_settings_replaced_between_steps_are_checked_again():
    """A setting replaced after a step by an equal value of another type (an integer, a NumPy
    scalar, a bool) is normalised or refused at the next step, as any new value is."""
    p = torch.zeros(2)
    opt = Adan([p], lr=0.01)
    p.grad = torch.ones(2)
    opt.step()
    group = opt.param_groups[0]
    group["weight_decay"], group["eps"] = 0, np.float64(1e-8)
    opt.step()
    assert type(group["weight_decay"]) is float and type(group["eps"]) is float
    group["max_grad_norm"] = False
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.step()


# --- features a torch.optim user relies on --------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_params_follow_their_real_view(foreach):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2))
    p = torch.tensor(p0, dtype=torch.complex128)
    opt = Adan([p], lr=0.05, weight_decay=0.1, max_grad_norm=1.0, foreach=foreach)
    ref = ReferenceAdan([RefGroup([np.stack([p0.real, p0.imag], -1)], lr=0.05,
                                  weight_decay=0.1)], max_grad_norm=1.0)
    for _ in range(12):
        g = rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2))
        p.grad = torch.tensor(g)
        opt.step()
        ref.step([[np.stack([g.real, g.imag], -1)]])
    np.testing.assert_allclose(torch.view_as_real(p).numpy(), ref.groups[0].params[0],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_scheduler_and_tensor_lr(foreach):
    """OneCycleLR changes lr (a tensor here) and cycles beta1 every step; the update follows."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(5,))
    p = torch.tensor(p0)
    opt = Adan([p], lr=torch.tensor(0.01), weight_decay=0.02, foreach=foreach)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    group = RefGroup([p0], weight_decay=0.02)
    ref = ReferenceAdan([group])
    for _ in range(19):
        g = rng.normal(size=(5,))
        group.lr = float(opt.param_groups[0]["lr"])
        group.betas = opt.param_groups[0]["betas"]
        p.grad = torch.tensor(g)
        opt.step()
        sched.step()
        ref.step([[g]])
    np.testing.assert_allclose(p.numpy(), group.params[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [False, True])
def test_restart_resets_moments(foreach):
    rng = np.random.default_rng(0)
    p = torch.tensor(rng.normal(size=(4,)))
    opt = Adan([p], lr=0.01, foreach=foreach)
    for _ in range(5):
        p.grad = torch.tensor(rng.normal(size=(4,)))
        opt.step()
    opt.restart()
    assert opt.state[p]["step"].item() == 0
    ref = ReferenceAdan([RefGroup([p.numpy().copy()], lr=0.01)])
    step_beside_reference(p, opt, ref, rng, 6)
    np.testing.assert_allclose(p.numpy(), ref.groups[0].params[0], rtol=1e-12, atol=1e-12)


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def test_closure_hooks_zero_grad_and_named_params():
    model = _tiny_model()
    opt = Adan(model.named_parameters(), lr=0.01)
    assert opt.param_groups[0]["param_names"][0] == "0.weight"
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(30):
        last = opt.step(closure).item()
    assert last < first
    assert calls[:2] == ["pre", "post"]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_differentiable_step_gradcheck():
    """With differentiable=True autograd flows through the update (checked numerically)."""

    def updated(p, g, m, v, n, prev):
        p = p.clone()
        opt = Adan([p], lr=0.1, weight_decay=0.1, differentiable=True, foreach=False)
        opt.state[p] = {"step": torch.tensor(3.0), "exp_avg": m.clone(),
                        "exp_avg_diff": v.clone(), "exp_avg_sq": n.clone(),
                        "prev_grad": prev.clone()}
        p.grad = g
        opt.step()
        return p

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(3, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(6)]
    args[4] = (args[4].detach() ** 2 + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(updated, args)


@pytest.mark.parametrize("no_prox", [False, True])
def test_differentiable_hypergradient_through_a_tensor_lr(no_prox):
    """d(params)/d(lr) for a tensor lr that requires grad (learned lr, meta-learning), over
    three steps, as torch's AdamW gives it (gradcheck against finite differences)."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(4, dtype=torch.float64, generator=gen)
    grads = [torch.randn(4, dtype=torch.float64, generator=gen) for _ in range(3)]

    def updated(lr):
        p = start.clone()
        opt = Adan([p], lr=lr, weight_decay=0.1, no_prox=no_prox, differentiable=True,
                   foreach=False)
        for g in grads:
            p.grad = g
            opt.step()
        return p

    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    updated(lr).sum().backward()
    assert lr.grad is not None and lr.grad != 0
    assert torch.autograd.gradcheck(updated, (lr,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_torch_compile_training_step(device):
    """A compiled train step (forward, backward and Adan) matches eager execution (on CUDA the
    step traced by Dynamo takes the eager paths, the eager one the Triton kernel)."""
    x, y = torch.randn(16, 4, device=device), torch.randn(16, 1, device=device)
    results = []
    for compiled in (False, True):
        model = _tiny_model().to(device)
        opt = Adan(model.parameters(), lr=0.01, weight_decay=0.02, max_grad_norm=1.0)

        def train_step(model=model, opt=opt):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

        fn = torch.compile(train_step) if compiled else train_step
        for _ in range(5):
            fn()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deepcopy_and_repr():
    opt = Adan([torch.zeros(2)], lr=0.1)
    assert "Adan" in repr(opt)
    assert copy.deepcopy(opt).defaults["lr"] == 0.1
