"""The compiled CPU Sinkhorn (numba) against the slow log-domain torch solver: forward (plans,
potentials, iteration counts) and backward (envelope gradients) on fresh random problems, its
absorption fallback, and how backend="auto" chooses it."""
from __future__ import annotations

import importlib

import pytest
import torch

from goat_dist.ot import sinkhorn, sinkhorn_cpu

sk = importlib.import_module("goat_dist.ot.sinkhorn")
pytestmark = pytest.mark.skipif(not sinkhorn_cpu.available(), reason="numba not installed")


@pytest.mark.parametrize("seed", range(4))
def test_fixed_iterations_equal_the_log_domain_reference(seed):
    """Same updates, same order: after k iterations the plans and potentials agree to rounding."""
    gen = torch.Generator().manual_seed(100 + seed)
    B, n, m = 3, int(torch.randint(2, 70, (1,), generator=gen)), int(torch.randint(2, 70, (1,), generator=gen))
    cost = torch.rand(B, n, m, generator=gen, dtype=torch.float64) * 2
    a = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.05
    b = torch.rand(B, m, generator=gen, dtype=torch.float64) + 0.05
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    for iters in (1, 7, 40):
        r = sinkhorn(cost, a, b, eps=0.1, max_iter=iters, tol=0.0, backend="numba")
        ref = sinkhorn(cost, a, b, eps=0.1, max_iter=iters, tol=0.0, backend="torch_log")
        assert r.n_iter == ref.n_iter == iters
        torch.testing.assert_close(r.plan, ref.plan, atol=1e-12 * float(ref.plan.max()), rtol=0)
        # potentials are defined up to (f + c, g - c); both solvers fix it the same way (f starts at 0)
        torch.testing.assert_close(r.f, ref.f, atol=1e-11, rtol=0)
        torch.testing.assert_close(r.g, ref.g, atol=1e-11, rtol=0)
        torch.testing.assert_close(r.err, ref.err, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_equals_reference(dtype):
    """Envelope gradients of cost_value and reg_value w.r.t. cost, a and b match the log solver's."""
    gen = torch.Generator().manual_seed(11)
    cost = torch.rand(4, 23, 31, generator=gen, dtype=dtype)
    a = torch.rand(4, 23, generator=gen, dtype=dtype) + 0.1
    b = torch.rand(4, 31, generator=gen, dtype=dtype) + 0.1
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    w = torch.rand(4, generator=gen, dtype=dtype)
    grads = {}
    for backend in ("numba", "torch_log"):
        c_, a_, b_ = (t.clone().requires_grad_(True) for t in (cost, a, b))
        r = sinkhorn(c_, a_, b_, eps=0.05, max_iter=10_000, tol=1e-9 if dtype == torch.float64 else 1e-6,
                     backend=backend)
        assert r.converged.all()
        ((r.cost_value + 0.5 * r.reg_value) * w).sum().backward()
        grads[backend] = (c_.grad, a_.grad, b_.grad)
    tol = 1e-7 if dtype == torch.float64 else 2e-4
    for g_nb, g_ref in zip(grads["numba"], grads["torch_log"]):
        scale = float(g_ref.abs().max())
        assert float((g_nb - g_ref).abs().max()) <= tol * scale


def test_masked_rows_and_columns_match_reference():
    gen = torch.Generator().manual_seed(12)
    cost = torch.rand(3, 20, 15, generator=gen, dtype=torch.float64)
    ma = torch.ones(3, 20, dtype=torch.bool)
    mb = torch.ones(3, 15, dtype=torch.bool)
    ma[1, 12:] = False
    mb[2, 3:9] = False
    r = sinkhorn(cost, eps=0.05, max_iter=20_000, tol=1e-12, backend="numba", mask_a=ma, mask_b=mb)
    ref = sinkhorn(cost, eps=0.05, max_iter=20_000, tol=1e-12, backend="torch_log", mask_a=ma, mask_b=mb)
    assert r.converged.all()
    assert (r.plan[~(ma.unsqueeze(-1) & mb.unsqueeze(-2))] == 0).all()
    assert (r.f[~ma] == 0).all() and (r.g[~mb] == 0).all()
    torch.testing.assert_close(r.plan, ref.plan, atol=1e-10 * float(ref.plan.max()), rtol=0)


def test_out_of_range_scalings_fall_back_to_the_absorbing_torch_solver(monkeypatch):
    """eps = 1e-3 with costs up to 100: the kernel-space scalings leave the safe range, those problems
    are re-solved by the stabilised torch solver; the easy problem in the batch stays compiled."""
    gen = torch.Generator().manual_seed(13)
    cost = torch.rand(3, 16, 16, generator=gen, dtype=torch.float64)
    cost[0] *= 1e-3     # (C_max - C_min) / eps <= 1: the kernel-space iterations stay in range
    cost[1:] *= 100.0
    calls = []
    real = sk._solve_stabilized

    def spy(p, *args):
        calls.append(p.cost.shape[0])
        return real(p, *args)

    monkeypatch.setattr(sk, "_solve_stabilized", spy)
    r = sinkhorn(cost, eps=1e-3, max_iter=5000, tol=1e-9, backend="numba")
    assert calls == [2]    # the two hard problems, once
    ref = sinkhorn(cost, eps=1e-3, max_iter=5000, tol=1e-9, backend="torch_log")
    assert torch.isfinite(r.plan).all() and r.plan.sum() > 0
    torch.testing.assert_close(r.plan, ref.plan, atol=1e-6 * float(ref.plan.max()), rtol=0)


def test_auto_uses_numba_for_small_cpu_problems_and_torch_for_large(monkeypatch):
    used = []
    import goat_dist.ot.sinkhorn_cpu as cpu_mod

    real = cpu_mod.solve_numba

    def spy(*args):
        used.append("numba")
        return real(*args)

    monkeypatch.setattr(cpu_mod, "solve_numba", spy)
    small = torch.rand(2, 16, 16)
    sinkhorn(small, eps=0.1, backend="auto")
    assert used == ["numba"]
    side = int(sinkhorn_cpu.MAX_AUTO_ENTRIES ** 0.5) + 1
    sinkhorn(torch.rand(1, side, side), eps=0.5, max_iter=3, backend="auto")
    assert used == ["numba"]   # above the threshold: the torch solver


def test_without_numba_auto_falls_back_and_numba_backend_says_why(monkeypatch):
    monkeypatch.setattr(sinkhorn_cpu, "numba", None)
    cost = torch.rand(2, 8, 8, dtype=torch.float64)
    r = sinkhorn(cost, eps=0.1, backend="auto")
    ref = sinkhorn(cost, eps=0.1, backend="torch")
    torch.testing.assert_close(r.plan, ref.plan, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="numba"):
        sinkhorn(cost, eps=0.1, backend="numba")
