"""Triton kernels (interpreter mode on CPU) against the torch solver, float32, to 1e-5."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from goat_dist.ot import sinkhorn  # noqa: E402
from goat_dist.ot.sinkhorn import _prepare  # noqa: E402
from goat_dist.ot.sinkhorn_triton import solve_triton  # noqa: E402

needs_device = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(3, 20, 13, generator=gen)
    ma = torch.ones(3, 20, dtype=torch.bool)
    ma[1, 15:] = False
    mb = torch.ones(3, 13, dtype=torch.bool)
    mb[2, :4] = False
    return cost, ma, mb


@needs_device
@pytest.mark.parametrize("fused", [True, False])
def test_triton_equals_torch_float32(fused):
    cost, ma, mb = _problem()
    eps, tol = 0.2, 1e-5
    ref = sinkhorn(cost, eps=eps, tol=tol, max_iter=200, backend="torch_log", mask_a=ma, mask_b=mb)
    f, g, n_iter, conv, err = solve_triton(_prepare(cost, None, None, ma, mb), eps, 200, tol, [], fused=fused)
    assert conv.all() and ref.converged.all()
    assert abs(n_iter - ref.n_iter) <= 1
    if n_iter == ref.n_iter:
        torch.testing.assert_close(f, ref.f, atol=1e-5, rtol=0)
        torch.testing.assert_close(g, ref.g, atol=1e-5, rtol=0)


@needs_device
def test_triton_backend_through_public_api_fixed_iterations():
    """Fixed iteration count: identical iterates, so plans agree to float32 rounding; padding stays 0."""
    cost, ma, mb = _problem(1)
    ref = sinkhorn(cost, eps=0.1, tol=0.0, max_iter=12, backend="torch_log", mask_a=ma, mask_b=mb)
    got = sinkhorn(cost, eps=0.1, tol=0.0, max_iter=12, backend="triton", mask_a=ma, mask_b=mb)
    assert got.n_iter == ref.n_iter == 12
    assert (got.plan - ref.plan).abs().max() <= 1e-5 * ref.plan.max()
    assert (got.plan[1, 15:] == 0).all() and (got.plan[2, :, :4] == 0).all()
    torch.testing.assert_close(got.cost_value, ref.cost_value, atol=1e-5, rtol=1e-5)
    # tiled (non-fused) path with eps-scaling levels and the stopping rule
    p = _prepare(cost, None, None, ma, mb)
    f, g, n_iter, conv, err = solve_triton(p, 0.1, 3, 1e-12, [0.4, 0.2], fused=False)
    assert n_iter == 5 and not conv.any() and torch.isfinite(f).all()


@needs_device
def test_triton_small_eps_large_cost_finite():
    gen = torch.Generator().manual_seed(2)
    cost = torch.rand(2, 9, 7, generator=gen) * 100
    got = sinkhorn(cost, eps=1e-3, tol=0.0, max_iter=5, backend="triton")
    ref = sinkhorn(cost, eps=1e-3, tol=0.0, max_iter=5, backend="torch_log")
    for t in (got.plan, got.f, got.g):
        assert torch.isfinite(t).all()
    assert (got.plan - ref.plan).abs().max() <= 1e-2 * ref.plan.max()   # C/eps ~ 1e5 in float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: CUDA timings are in the benchmark")
def test_triton_cuda_matches_torch():
    gen = torch.Generator().manual_seed(3)
    cost = torch.rand(4, 256, 256, generator=gen).cuda()
    ref = sinkhorn(cost, eps=0.05, tol=1e-6, max_iter=1000, backend="torch")
    got = sinkhorn(cost, eps=0.05, tol=1e-6, max_iter=1000, backend="triton")
    assert (got.plan - ref.plan).abs().max() <= 1e-4 * ref.plan.max()
