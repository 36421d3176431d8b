import pytest
import torch

from goat_dist.config import OTConfig
from goat_dist.model.fusion import (ConcatFusion, IdentityFusion, OATFusion, SumFusion, build_fusion, unpack_stats)


def views(m=2, n=30, d=6, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, d, generator=g)).requires_grad_(), \
        (scale * torch.randn(m, n, d, generator=g)).requires_grad_()


def oat(m=2, d=6, **ot):
    return OATFusion(d, m, alpha_init=0.1, dropout=0.0, ot_cfg=OTConfig(**{"eps": 0.05, "max_iter": 500, **ot}))


def test_cost_from_stats_equals_explicit_mean_of_squares():
    x_id, xs = views()
    rows = torch.tensor([0, 3, 3, 7, 29, 11])
    f = oat(cost_scale=2.5)
    _, cost, _ = f.solve(f.statistics(x_id, xs, rows))
    explicit = 2.5 * ((xs[:, rows].unsqueeze(3) - x_id[rows].unsqueeze(1).unsqueeze(0)) ** 2).mean(1)  # [M, d, d]
    torch.testing.assert_close(cost, explicit, rtol=1e-5, atol=1e-5)


def test_plan_is_doubly_stochastic_and_weights_start_at_alpha_init():
    x_id, xs = views()
    f = oat()
    out = f(x_id, xs)
    ones = torch.ones(2, 6)
    torch.testing.assert_close(out.plan.sum(2), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.plan.sum(1), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.weights, torch.tensor([0.8, 0.1, 0.1]))
    assert out.fused.shape == (30, 6) and out.W.shape == (2,)
    # no LayerNorm / normalisation: the fused item is the weighted residual sum (dropout 0 here)
    torch.testing.assert_close(out.fused, 0.8 * x_id + 0.1 * out.aligned[0] + 0.1 * out.aligned[1])
    # aligned = x_m @ T at initialisation (Delta = 0)
    torch.testing.assert_close(out.aligned, xs @ out.plan)


def test_alpha_delta_and_inputs_receive_gradients_w_through_cost():
    x_id, xs = views()
    f = oat()
    out = f(x_id, xs)
    (out.fused * torch.randn_like(out.fused)).sum().backward()
    assert f.logits.grad.abs().sum() > 0 and f.delta.grad.abs().sum() > 0
    assert xs.grad.abs().sum() > 0 and x_id.grad.abs().sum() > 0
    # W = <P, C> carries the envelope gradient P into the cost (hence into x)
    x_id2, xs2 = views(seed=1)
    out2 = f(x_id2, xs2)
    out2.W.sum().backward()
    assert xs2.grad.abs().sum() > 0 and x_id2.grad.abs().sum() > 0


def test_no_nan_with_large_costs():
    x_id, xs = views(scale=300.0)
    out = oat()(x_id, xs)
    assert out.cost.max() > 1e4
    for t in (out.fused, out.plan, out.W):
        assert torch.isfinite(t).all()
    # eps = 0.05 against costs ~1e5 is far from converged within max_iter, but the plan stays a
    # valid row-stochastic map (the last half-step projects the rows exactly) and the flag says so
    torch.testing.assert_close(out.plan.sum(2), torch.ones(2, 6), atol=1e-4, rtol=0)
    assert not bool(out.converged.all())


def test_reduce_stats_hook_and_ema_for_eval():
    x_id, xs = views()
    f = oat()
    calls = []

    def hook(flat):
        calls.append(flat.shape)
        return flat * 2.0          # e.g. two identical ranks: sums and count double, cost unchanged

    out = f(x_id, xs, reduce_stats=hook)
    assert calls == [(2 * 6 + 6 + 2 * 36 + 1,)]
    torch.testing.assert_close(out.plan, f(x_id, xs).plan, atol=1e-5, rtol=1e-5)
    # train mode: the EMA follows the batches; eval: the plan comes from the EMA, not the eval batch
    x_b, xs_b = views(seed=5)
    f(x_b, xs_b)
    assert int(f.ema_updates) == 3
    sq_m, _, _, count = unpack_stats(f.ema_statistics(), 2, 6)
    assert float(count) == 1.0
    f.eval()
    p1 = f(x_id[:10], xs[:, :10]).plan
    p2 = f(x_b[10:], xs_b[:, 10:]).plan
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(p1, f.solve(f.ema_statistics())[0])


def test_baselines_and_identity():
    x_id, xs = views()
    assert isinstance(build_fusion("none", 6, 2, 0.1, 0.0, OTConfig()), IdentityFusion)
    assert isinstance(build_fusion("oat", 6, 0, 0.1, 0.0, OTConfig()), IdentityFusion)
    torch.testing.assert_close(build_fusion("oat", 6, 0, 0.1, 0.0, OTConfig())(x_id, xs[:0]).fused, x_id)
    for kind, cls in (("concat", ConcatFusion), ("sum", SumFusion)):
        f = build_fusion(kind, 6, 2, 0.1, 0.0, OTConfig())
        assert isinstance(f, cls)
        out = f(x_id, xs).fused
        assert out.shape == (30, 6)
        out.sum().backward()
    with pytest.raises(ValueError):
        build_fusion("attention", 6, 2, 0.1, 0.0, OTConfig())
    with pytest.raises(ValueError, match="alpha_init"):
        OATFusion(6, 2, 0.6, 0.0, OTConfig())


@pytest.mark.parametrize("kind", ["oat", "concat", "sum"])
def test_fusion_normalize_switch(kind):
    """``model.fusion_normalize``: the paper's normalize(dropout(LayerNorm(.))) gives unit rows; the
    default keeps the norms (which carry popularity)."""
    torch.manual_seed(0)
    x_id, xs = torch.randn(30, 8) * 3, torch.randn(2, 30, 8)
    for normalize in (True, False):
        fusion = build_fusion(kind, 8, 2, 0.1, 0.0, OTConfig(max_iter=50), normalize=normalize).eval()
        for m in fusion.modules():
            if m is not fusion and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if hasattr(fusion, "reset_parameters"):
            fusion.reset_parameters()
        norms = fusion(x_id, xs).fused.norm(dim=-1)
        if normalize:
            torch.testing.assert_close(norms, torch.ones(30))
        else:
            assert (norms - 1).abs().max() > 0.5
