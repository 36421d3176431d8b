"""Distances between empirical distributions: exact Wasserstein (POT, for tests and diagnostics) and
the debiased Sinkhorn divergence (differentiable, usable as a loss).

- ``wasserstein(x, y, p)``: exact W_p between ``sum_i a_i delta_{x_i}`` and ``sum_j b_j delta_{y_j}``,
  ``W_p = (min_{P in U(a, b)} sum_ij P_ij ||x_i - y_j||^p)^(1/p)`` solved by POT's network simplex
  (``ot.emd2``) in float64 — O(n^3): small inputs only.
- ``sinkhorn_divergence(x, y, eps)``: Feydy et al. 2019,
  ``S_eps(a, b) = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2`` with
  ``OT_eps(a, b) = min_P <P, C> + eps KL(P || a x b)`` (``SinkhornResult.reg_value``). S_eps >= 0,
  S_eps(a, a) = 0, and its envelope gradients wrt the points (through C) and the weights are exact
  at convergence. The three problems are solved in one batched :func:`sinkhorn` call when their
  sizes allow (padding otherwise).
"""
from __future__ import annotations

import torch
from torch import Tensor

from goat_dist.ot.sinkhorn import sinkhorn

__all__ = ["wasserstein", "wasserstein1", "wasserstein2", "sinkhorn_divergence", "ground_cost"]


def ground_cost(x: Tensor, y: Tensor, p: int = 2) -> Tensor:
    """``C_ij = ||x_i - y_j||^p`` (p = 2: squared Euclidean). Shapes: x [..., n, D], y [..., m, D] -> [..., n, m]."""
    if p == 2:
        d2 = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
        return d2
    return torch.cdist(x, y, p=2).pow(p)


def _uniform(n: int, like: Tensor) -> Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def wasserstein(x: Tensor, y: Tensor, p: int = 2, a: Tensor | None = None, b: Tensor | None = None) -> float:
    """Exact W_p between two small empirical distributions (POT ``ot.emd2``, float64, no gradient).

    Shapes: x [n, D] or [n]; y [m, D] or [m]; a [n], b [m] (uniform when None). Returns a float.
    """
    import ot

    x64 = x.detach().to(torch.float64).cpu()
    y64 = y.detach().to(torch.float64).cpu()
    if x64.dim() == 1:
        x64, y64 = x64.unsqueeze(-1), y64.unsqueeze(-1)
    a64 = _uniform(x64.shape[0], x64) if a is None else a.detach().to(torch.float64).cpu()
    b64 = _uniform(y64.shape[0], y64) if b is None else b.detach().to(torch.float64).cpu()
    cost = torch.cdist(x64, y64, p=2).pow(p)
    value = float(ot.emd2(a64.numpy(), b64.numpy(), cost.numpy()))
    return max(value, 0.0) ** (1.0 / p)


def wasserstein1(x: Tensor, y: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> float:
    """Exact W_1 (ground cost ||x - y||)."""
    return wasserstein(x, y, 1, a, b)


def wasserstein2(x: Tensor, y: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> float:
    """Exact W_2 (ground cost ||x - y||^2, result is the square root of the optimal cost)."""
    return wasserstein(x, y, 2, a, b)


def sinkhorn_divergence(x: Tensor, y: Tensor, eps: float = 0.05, a: Tensor | None = None, b: Tensor | None = None,
                        p: int = 2, max_iter: int = 1000, tol: float = 1e-6, backend: str = "auto") -> Tensor:
    """Debiased Sinkhorn divergence ``S_eps = OT_eps(a, b) - (OT_eps(a, a) + OT_eps(b, b)) / 2``.

    Differentiable wrt x, y (through the ground cost) and a, b (envelope gradients of
    ``reg_value``). Shapes: x [n, D], y [m, D], a [n], b [m] -> scalar tensor.
    """
    if x.dim() == 1:
        x, y = x.unsqueeze(-1), y.unsqueeze(-1)
    n, m = x.shape[0], y.shape[0]
    a = _uniform(n, x) if a is None else a
    b = _uniform(m, y) if b is None else b
    s = max(n, m)
    costs = torch.stack([
        torch.nn.functional.pad(ground_cost(x, y, p), (0, s - m, 0, s - n)),
        torch.nn.functional.pad(ground_cost(x, x, p), (0, s - n, 0, s - n)),
        torch.nn.functional.pad(ground_cost(y, y, p), (0, s - m, 0, s - m)),
    ])
    pad_a = torch.nn.functional.pad
    wa = torch.stack([pad_a(a, (0, s - n)), pad_a(a, (0, s - n)), pad_a(b, (0, s - m))])
    wb = torch.stack([pad_a(b, (0, s - m)), pad_a(a, (0, s - n)), pad_a(b, (0, s - m))])
    res = sinkhorn(costs, wa, wb, eps=eps, max_iter=max_iter, tol=tol, backend=backend)
    ot_xy, ot_xx, ot_yy = res.reg_value.unbind(0)
    return ot_xy - 0.5 * (ot_xx + ot_yy)
