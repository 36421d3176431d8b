"""OAT cost from sufficient statistics, exact Wasserstein distances and the Sinkhorn divergence."""
from __future__ import annotations

import pytest
import torch

from goat_dist.ot import oat_cost, oat_cost_from_stats, oat_sufficient_stats
from goat_dist.ot.distances import sinkhorn_divergence, wasserstein1, wasserstein2


def _explicit_cost(x_m, x_id, scale):
    """The I x d_m x d tensor the reference code builds (only ever in this test)."""
    return ((x_m[..., :, :, None] - x_id[:, None, :]) ** 2).mean(-3) * scale


def test_cost_from_stats_equals_explicit():
    gen = torch.Generator().manual_seed(0)
    x_m = torch.randn(3, 17, 6, generator=gen, dtype=torch.float64)
    x_id = torch.randn(17, 5, generator=gen, dtype=torch.float64)
    for scale in (1.0, 100.0):
        torch.testing.assert_close(oat_cost(x_m, x_id, scale), _explicit_cost(x_m, x_id, scale))
        torch.testing.assert_close(oat_cost(x_m[1], x_id, scale), _explicit_cost(x_m[1], x_id, scale))
    # float32 inputs: accumulate in float32, same answer to float32 precision
    torch.testing.assert_close(oat_cost(x_m.float(), x_id.float()), _explicit_cost(x_m, x_id, 1.0).float(),
                               atol=1e-5, rtol=1e-5)
    assert (oat_cost(x_m, x_m[0]) >= 0).all()    # cancellation is clamped


def test_stats_are_additive_over_row_shards():
    """What a distributed caller relies on: all-reduced (summed) shard statistics give the global cost."""
    gen = torch.Generator().manual_seed(1)
    x_m = torch.randn(2, 20, 4, generator=gen, dtype=torch.float64)
    x_id = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    parts = [oat_sufficient_stats(x_m[:, s], x_id[s]) for s in (slice(0, 7), slice(7, 20))]
    summed = [parts[0][k] + parts[1][k] for k in range(4)]
    torch.testing.assert_close(oat_cost_from_stats(*summed, scale=3.0), oat_cost(x_m, x_id, 3.0))


def test_cost_is_differentiable_like_explicit():
    gen = torch.Generator().manual_seed(2)
    x_m = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x_id = torch.randn(9, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    g1 = torch.autograd.grad((oat_cost(x_m, x_id) * w).sum(), (x_m, x_id))
    g2 = torch.autograd.grad((_explicit_cost(x_m, x_id, 1.0) * w).sum(), (x_m, x_id))
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v)


def test_shape_errors():
    with pytest.raises(ValueError):
        oat_sufficient_stats(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError):
        oat_cost_from_stats(torch.randn(3), torch.randn(4), torch.randn(4, 3), 5)


def test_wasserstein_exact_1d_and_shift():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, generator=gen, dtype=torch.float64)
    y = torch.randn(8, generator=gen, dtype=torch.float64)
    # 1-D with equal uniform weights: W_p^p is the mean of |sorted differences|^p
    w1 = (x.sort().values - y.sort().values).abs().mean()
    w2 = (x.sort().values - y.sort().values).pow(2).mean().sqrt()
    assert wasserstein1(x, y) == pytest.approx(float(w1), abs=1e-12)
    assert wasserstein2(x, y) == pytest.approx(float(w2), abs=1e-12)
    pts = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    shift = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert wasserstein2(pts, pts + shift) == pytest.approx(float(shift.norm()), abs=1e-9)


def test_sinkhorn_divergence_properties():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, generator=gen, dtype=torch.float64) + 1.0
    assert abs(float(sinkhorn_divergence(x, x, eps=0.1, tol=1e-12))) < 1e-9
    s = sinkhorn_divergence(x, y, eps=0.1, tol=1e-12)
    assert s > 0
    # small eps: close to the exact squared W2
    s_small = float(sinkhorn_divergence(x, y, eps=0.01, tol=1e-10, max_iter=20_000))
    assert s_small == pytest.approx(wasserstein2(x, y) ** 2, rel=0.05)


def test_sinkhorn_divergence_gradient_is_finite_difference():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, generator=gen, dtype=torch.float64) + 0.5
    s = sinkhorn_divergence(x, y, eps=1.0, tol=1e-12, max_iter=5000)
    (gx,) = torch.autograd.grad(s, x)
    d = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    h = 1e-6
    fd = (float(sinkhorn_divergence(x.detach() + h * d, y, eps=1.0, tol=1e-12, max_iter=5000))
          - float(sinkhorn_divergence(x.detach() - h * d, y, eps=1.0, tol=1e-12, max_iter=5000))) / (2 * h)
    assert fd == pytest.approx(float((gx * d).sum()), abs=1e-6)
