import torch

from goat_dist.losses import bpr_loss, l2_loss


def test_bpr_matches_formula_and_denominator():
    g = torch.Generator().manual_seed(0)
    u, p, n = (torch.randn(7, 4, generator=g) for _ in range(3))
    ref = -torch.log(torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
    torch.testing.assert_close(bpr_loss(u, p, n), ref)
    torch.testing.assert_close(bpr_loss(u, p, n, denom=14), ref / 2)


def test_bpr_prefers_positive():
    u = torch.tensor([[1.0, 0.0]])
    assert bpr_loss(u, u, -u) < bpr_loss(u, -u, u)


def test_l2_is_half_sum_of_squares_per_row():
    a, b = torch.ones(4, 3), 2 * torch.ones(4, 3)
    torch.testing.assert_close(l2_loss(a, b), torch.tensor(0.5 * (12 + 48) / 4))
