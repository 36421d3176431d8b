"""Sinkhorn (torch paths) against POT and against slow, obviously-correct references."""
from __future__ import annotations

import importlib
import math
import warnings

import ot
import pytest
import torch

from goat_dist.ot import SinkhornResult, sinkhorn, sinkhorn_cpu

# numba: the compiled CPU loop (goat_dist.ot.sinkhorn_cpu); installed by `make install`, optional
BACKENDS = ["torch", "torch_log"] + (["numba"] if sinkhorn_cpu.available() else [])


def _rand_problem(gen, n, m, scale=1.0, dtype=torch.float64):
    C = torch.rand(n, m, generator=gen, dtype=dtype) * scale
    a = torch.rand(n, generator=gen, dtype=dtype) + 0.1
    b = torch.rand(m, generator=gen, dtype=dtype) + 0.1
    return C, a / a.sum(), b / b.sum()


def _pot(C, a, b, eps, iters, stop):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=iters, stopThr=stop)


def _check_close(plan, cost_value, P, C, tol=1e-6):
    assert torch.isfinite(plan).all()
    assert (plan - P).abs().max() <= tol * P.max()
    ref_val = (P * C).sum()
    assert abs(float(cost_value) - float(ref_val)) <= tol * abs(float(ref_val))


def _naive_log_sinkhorn(C, a, b, eps, iters):
    """The obviously-correct reference: a Python loop of the log-domain updates, one problem, f64."""
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        g = eps * torch.log(b) - eps * torch.logsumexp((f[:, None] - C) / eps, dim=0)
        f = eps * torch.log(a) - eps * torch.logsumexp((g[None, :] - C) / eps, dim=1)
    return torch.exp((f[:, None] + g[None, :] - C) / eps)


def test_api_shapes_and_2d_cost():
    C = torch.rand(5, 7, dtype=torch.float64)
    r = sinkhorn(C, eps=0.1)
    assert isinstance(r, SinkhornResult)
    assert r.plan.shape == (1, 5, 7) and r.f.shape == (1, 5) and r.g.shape == (1, 7)
    assert r.cost_value.shape == (1,) and r.converged.shape == (1,) and isinstance(r.n_iter, int)
    assert r.converged.all()
    assert torch.allclose(r.plan.sum(-1), torch.full((1, 5), 0.2, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pot_converged_random(backend):
    """60 fresh random problems per backend, solved to tight tolerance by both."""
    gen = torch.Generator().manual_seed(1)
    for k in range(60):
        n, m = (int(v) for v in torch.randint(2, 13, (2,), generator=gen))
        eps = [0.05, 0.1, 0.5][k % 3]
        C, a, b = _rand_problem(gen, n, m)
        r = sinkhorn(C[None], a[None], b[None], eps=eps, max_iter=100_000, tol=1e-13, backend=backend)
        assert r.converged.all(), (k, r.err)
        P = _pot(C, a, b, eps, 100_000, 1e-15)
        _check_close(r.plan[0], r.cost_value[0], P, C)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pot_small_eps_large_cost(backend):
    """eps = 1e-3 with costs ~100 (C / eps ~ 1e5): the kernel exp(-C / eps) underflows to 0 (the
    reference RecGOAT failure); ours must stay finite and follow POT's log-domain iterates exactly.
    These problems do not converge in a few hundred iterations, so both run the same fixed number."""
    gen = torch.Generator().manual_seed(2)
    for k in range(25):
        n, m = (int(v) for v in torch.randint(2, 16, (2,), generator=gen))
        C, a, b = _rand_problem(gen, n, m, scale=100.0)
        assert (torch.exp(-C / 1e-3) == 0).double().mean() >= 0.8  # the naive kernel is ~all zeros
        iters = 50 + 10 * k
        r = sinkhorn(C[None], a[None], b[None], eps=1e-3, max_iter=iters, tol=0.0, backend=backend)
        assert r.n_iter == iters
        for t in (r.plan, r.f, r.g, r.cost_value):
            assert torch.isfinite(t).all()
        torch.testing.assert_close(r.plan[0].sum(-1), a, atol=0, rtol=1e-9)   # rows exact after f update (C/eps ~ 1e5)
        P = _pot(C, a, b, 1e-3, iters, 0.0)
        _check_close(r.plan[0], r.cost_value[0], P, C)
        assert bool(r.converged[0]) == bool(r.err[0] <= 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_of_different_sizes(backend):
    """20 problems of different n, m in one padded batch equal their unpadded POT solutions."""
    gen = torch.Generator().manual_seed(3)
    B, N, M, eps = 20, 11, 9, 0.1
    cost = torch.rand(B, N, M, generator=gen, dtype=torch.float64) * 5   # padding holds garbage
    a = torch.zeros(B, N, dtype=torch.float64)
    b = torch.zeros(B, M, dtype=torch.float64)
    ma = torch.zeros(B, N, dtype=torch.bool)
    mb = torch.zeros(B, M, dtype=torch.bool)
    sizes = []
    for k in range(B):
        n, m = int(torch.randint(1, N + 1, (1,), generator=gen)), int(torch.randint(1, M + 1, (1,), generator=gen))
        C, ak, bk = _rand_problem(gen, n, m)
        cost[k, :n, :m] = C
        a[k, :n], b[k, :m] = ak, bk
        ma[k, :n], mb[k, :m] = True, True
        sizes.append((n, m))
    r = sinkhorn(cost, a, b, eps=eps, max_iter=100_000, tol=1e-13, backend=backend, mask_a=ma, mask_b=mb)
    assert r.converged.all()
    for k, (n, m) in enumerate(sizes):
        P = _pot(cost[k, :n, :m], a[k, :n], b[k, :m], eps, 100_000, 1e-15)
        _check_close(r.plan[k, :n, :m], r.cost_value[k], P, cost[k, :n, :m])
        assert (r.plan[k, n:, :] == 0).all() and (r.plan[k, :, m:] == 0).all()
        assert (r.f[k, n:] == 0).all() and (r.g[k, m:] == 0).all()
    # masks alone (uniform marginals over the unmasked entries) give the same plans
    r2 = sinkhorn(cost, eps=eps, max_iter=100_000, tol=1e-13, backend=backend, mask_a=ma, mask_b=mb)
    for k, (n, m) in enumerate(sizes):
        P = _pot(cost[k, :n, :m], torch.full((n,), 1.0 / n, dtype=torch.float64),
                 torch.full((m,), 1.0 / m, dtype=torch.float64), eps, 100_000, 1e-15)
        _check_close(r2.plan[k, :n, :m], r2.cost_value[k], P, cost[k, :n, :m])


@pytest.mark.parametrize("backend", BACKENDS)
def test_converged_false_when_max_iter_too_small(backend):
    gen = torch.Generator().manual_seed(4)
    cost = torch.rand(3, 30, 30, generator=gen, dtype=torch.float64)
    r = sinkhorn(cost, eps=0.01, max_iter=2, tol=1e-9, backend=backend)
    assert not r.converged.any() and (r.err > 1e-9).all() and r.n_iter == 2
    assert torch.isfinite(r.plan).all()
    r = sinkhorn(cost, eps=0.1, max_iter=5000, tol=1e-9, backend=backend)
    assert r.converged.all() and (r.err <= 1e-9).all()


def test_per_problem_stopping_freezes_converged():
    """An easy and a hard problem in one batch: the easy one stops early and keeps its solution."""
    gen = torch.Generator().manual_seed(5)
    cost = torch.rand(2, 12, 12, generator=gen, dtype=torch.float64)
    cost[0] *= 0.01   # nearly uniform plan: converges in a couple of iterations
    for backend in BACKENDS:
        both = sinkhorn(cost, eps=0.05, max_iter=10_000, tol=1e-10, backend=backend)
        alone = sinkhorn(cost[:1], eps=0.05, max_iter=10_000, tol=1e-10, backend=backend)
        assert both.n_iter > 3 * alone.n_iter
        assert both.converged.all()
        torch.testing.assert_close(both.plan[0], alone.plan[0], atol=1e-14, rtol=0)
        torch.testing.assert_close(both.f[0], alone.f[0], atol=1e-14, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_never_nan(dtype, backend):
    gen = torch.Generator().manual_seed(6)
    cost = (torch.rand(3, 40, 24, generator=gen) * 100).to(dtype)
    r = sinkhorn(cost, eps=1e-3, max_iter=300, tol=1e-6, backend=backend)
    assert r.plan.dtype == torch.float32 and r.f.dtype == torch.float32
    for t in (r.plan, r.f, r.g, r.cost_value, r.reg_value):
        assert torch.isfinite(t).all()
    # float32 potentials of size ~C = 100 carry an absolute error ~1e-5, i.e. ~1e-2 in (f + g - C) / eps:
    # the marginals hold to that relative precision, not better
    torch.testing.assert_close(r.plan.sum(-1), torch.full((3, 40), 1 / 40), atol=0, rtol=5e-2)
    assert r.plan.sum() > 0


def test_fast_path_equals_log_path_float32():
    gen = torch.Generator().manual_seed(7)
    cost = torch.rand(6, 33, 17, generator=gen)
    ma = torch.ones(6, 33, dtype=torch.bool)
    ma[2, 20:] = False
    for eps in (0.5, 0.05):
        r1 = sinkhorn(cost, eps=eps, max_iter=20_000, tol=1e-6, backend="torch", mask_a=ma)
        r2 = sinkhorn(cost, eps=eps, max_iter=20_000, tol=1e-6, backend="torch_log", mask_a=ma)
        assert r1.converged.all() and r2.converged.all()
        assert (r1.plan - r2.plan).abs().max() <= 1e-4 * r2.plan.max()


def test_matches_naive_reference_loop():
    gen = torch.Generator().manual_seed(8)
    C, a, b = _rand_problem(gen, 9, 6)
    for backend in BACKENDS:
        r = sinkhorn(C, a, b, eps=0.05, max_iter=37, tol=0.0, backend=backend)
        torch.testing.assert_close(r.plan[0], _naive_log_sinkhorn(C, a, b, 0.05, 37), atol=1e-13, rtol=0)


@pytest.mark.parametrize("schedule", ["auto", [2.0, 1.0, 0.5, 0.2]])
def test_eps_schedule_reaches_same_solution(schedule):
    gen = torch.Generator().manual_seed(9)
    cost = torch.rand(4, 10, 14, generator=gen, dtype=torch.float64)
    ref = sinkhorn(cost, eps=0.02, max_iter=50_000, tol=1e-12, backend="torch_log")
    for backend in BACKENDS:
        r = sinkhorn(cost, eps=0.02, max_iter=50_000, tol=1e-12, eps_schedule=schedule, backend=backend)
        assert r.converged.all()
        assert (r.plan - ref.plan).abs().max() <= 1e-8 * ref.plan.max()


def test_envelope_gradient_equals_plan():
    gen = torch.Generator().manual_seed(10)
    cost = torch.rand(3, 7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    r = sinkhorn(cost, eps=0.1, tol=1e-12, max_iter=10_000)
    (w * r.cost_value).sum().backward()
    torch.testing.assert_close(cost.grad, w.view(-1, 1, 1) * r.plan, atol=0, rtol=0)
    assert not r.plan.requires_grad


def test_envelope_gradients_match_finite_differences_of_reg_value():
    """d reg_value / dC = P and d reg_value / da = f - eps (log a + 1), against central differences."""
    gen = torch.Generator().manual_seed(11)
    C, a, b = _rand_problem(gen, 6, 5)
    eps, h = 0.2, 1e-6
    C.requires_grad_(True)
    a.requires_grad_(True)
    r = sinkhorn(C, a, b, eps=eps, tol=1e-14, max_iter=100_000)
    r.reg_value.sum().backward()

    def value(c, aa):
        return float(sinkhorn(c, aa, b, eps=eps, tol=1e-14, max_iter=100_000).reg_value)

    dC = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    fd = (value(C.detach() + h * dC, a.detach()) - value(C.detach() - h * dC, a.detach())) / (2 * h)
    assert abs(fd - float((C.grad * dC).sum())) < 1e-6
    da = torch.randn(6, generator=gen, dtype=torch.float64)
    da -= da.mean()      # keep total mass (balanced problem)
    fd = (value(C.detach(), a.detach() + h * da) - value(C.detach(), a.detach() - h * da)) / (2 * h)
    assert abs(fd - float((a.grad * da).sum())) < 1e-6


def test_unrolled_gradcheck():
    gen = torch.Generator().manual_seed(12)
    cost = torch.rand(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64, requires_grad=True)

    def fn(c, aa):
        r = sinkhorn(c, aa, eps=0.3, max_iter=8, tol=0.0, grad="unrolled")
        return r.cost_value, r.plan, r.reg_value

    assert torch.autograd.gradcheck(fn, (cost, a))
    # with per-problem stopping active (tol > 0) as well
    assert torch.autograd.gradcheck(
        lambda c: sinkhorn(c, eps=0.3, max_iter=50, tol=1e-4, grad="unrolled").cost_value, (cost,))


def test_unrolled_reg_value_gradient_tends_to_envelope():
    """At convergence the unrolled gradient of reg_value equals the envelope one (the plan)."""
    gen = torch.Generator().manual_seed(13)
    cost = torch.rand(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    r = sinkhorn(cost, eps=0.2, max_iter=400, tol=0.0, grad="unrolled")
    (g,) = torch.autograd.grad(r.reg_value.sum(), cost)
    torch.testing.assert_close(g, r.plan.detach(), atol=1e-9, rtol=0)


def test_input_validation():
    with pytest.raises(ValueError):
        sinkhorn(torch.rand(2, 3, 4), eps=0.0)
    with pytest.raises(ValueError):
        sinkhorn(torch.rand(2, 3, 4), grad="implicit")
    with pytest.raises(ValueError):
        sinkhorn(torch.full((3, 3), math.nan))
    with pytest.raises(ValueError):
        sinkhorn(torch.rand(2, 3, 4), a=torch.rand(2, 5))


# --------------------------------------------------------------------------------------------------
# The CPU fast path's internals: cache-sized groups, float32 refinement, rate-predicted tests


def test_groups_of_problems_equal_one_batched_solve(monkeypatch):
    """Solving the batch in cache-sized groups (each stopping on its own) equals one group, and equals
    every problem solved alone; with padding too."""
    sk = importlib.import_module("goat_dist.ot.sinkhorn")
    gen = torch.Generator().manual_seed(20)
    cost = torch.rand(7, 24, 19, generator=gen, dtype=torch.float64)
    cost[3] *= 0.05                                     # an easy problem that stops early
    ma = torch.ones(7, 24, dtype=torch.bool)
    ma[5, 20:] = False
    kw = dict(eps=0.05, max_iter=10_000, tol=1e-11, backend="torch")
    one_group = sinkhorn(cost, mask_a=ma, **kw)
    monkeypatch.setattr(sk, "_GROUP_BYTES", 2 * 24 * 19 * 8 * 2)     # groups of 2 problems
    grouped = sinkhorn(cost, mask_a=ma, **kw)
    assert grouped.converged.all() and one_group.converged.all()
    torch.testing.assert_close(grouped.plan, one_group.plan, atol=1e-12, rtol=0)
    torch.testing.assert_close(grouped.f, one_group.f, atol=1e-10, rtol=0)
    for k in (3, 5):
        alone = sinkhorn(cost[k:k + 1], mask_a=ma[k:k + 1], **kw)
        torch.testing.assert_close(grouped.plan[k], alone.plan[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("d", [160, 300])
def test_float32_refined_plan_matches_float64_pot(d):
    """float32 input, n >= 128: the float64 refinement step brings the plan to ~1e-7 of its maximum
    against POT's float64 log-domain solution (float32 products alone leave ~1e-6 at n ~ 1,000),
    on both product paths (K^T kept for d <= 256, one gemv per problem above)."""
    gen = torch.Generator().manual_seed(21 + d)
    x, y = torch.rand(2, d, 3, generator=gen, dtype=torch.float64), torch.rand(2, d, 3, generator=gen, dtype=torch.float64)
    cost = torch.cdist(x, y).pow(2).float()
    r = sinkhorn(cost, eps=0.05, max_iter=10_000, tol=1e-6, backend="torch")
    assert r.converged.all() and r.plan.dtype == torch.float32
    for k in range(2):
        u = torch.full((d,), 1.0 / d, dtype=torch.float64)
        P = _pot(cost[k].double(), u, u, 0.05, 100_000, 1e-13)
        assert (r.plan[k].double() - P).abs().max() <= 5e-7 * P.max()
        torch.testing.assert_close(r.cost_value[k].double(), (P * cost[k].double()).sum(), atol=0, rtol=1e-6)


def test_rate_predicted_tests_stop_close_to_the_needed_iterations():
    """Small problems are tested at intervals predicted from the observed linear rate: the stop lands
    within a few iterations of the first iteration that meets tol (found by testing every iteration)."""
    gen = torch.Generator().manual_seed(22)
    cost = torch.rand(3, 40, 40, generator=gen, dtype=torch.float64)
    r = sinkhorn(cost, eps=0.05, max_iter=10_000, tol=1e-9, backend="torch")
    first = next(k for k in range(1, 2000)
                 if bool(sinkhorn(cost, eps=0.05, max_iter=k, tol=0.0, backend="torch_log").err.max() <= 1e-9))
    assert r.converged.all() and (r.err <= 1e-9).all()
    assert first <= r.n_iter <= first + 8, (first, r.n_iter)


def test_next_chunk_prediction():
    sk = importlib.import_module("goat_dist.ot.sinkhorn")
    assert sk._next_chunk(None, 1e-3, 4, 1e-6) == sk._CHECK_EVERY         # no rate yet
    assert sk._next_chunk(1e-3, 2e-3, 4, 1e-6) == sk._CHECK_EVERY         # not contracting
    # rate 0.1 per iteration from 1e-3: tol * aim = 2.5e-7 needs 4 iterations
    assert sk._next_chunk(1e-1, 1e-3, 2, 1e-6) == 4
    assert sk._next_chunk(1.0, 0.99, 1, 1e-6) == sk._CHECK_MAX           # slow: capped
