"""The OAT fusion cost between modality dimensions and ID dimensions, from sufficient statistics.

RecGOAT's distribution-level alignment (DESIGN.md section 1, step 3) transports the ``d_m`` columns
of a modality embedding ``x_m`` [I, d_m] onto the ``d`` columns of the ID embedding ``x_id`` [I, d]
with the squared-difference cost averaged over the I batch items:

    C[j, k] = scale / count * sum_i (x_m[i, j] - x_id[i, k])^2
            = scale / count * (sumsq_m[j] + sumsq_id[k] - 2 * cross[j, k]),

    sumsq_m = sum_i x_m[i, :]^2      [d_m]
    sumsq_id = sum_i x_id[i, :]^2    [d]
    cross    = x_m^T @ x_id          [d_m, d]

The expansion never materialises the I x d_m x d tensor the reference code builds. The statistics
are sums (not means) so that a distributed caller can all-reduce ``(sumsq_m, sumsq_id, cross,
count)`` across ranks and every rank then builds the same cost (DESIGN.md section 4).

Everything is batched over an optional leading modality axis M: pass ``x_m`` as [M, I, d_m] (one
stacked tensor per modality, equal d_m) to get [M, d_m, d] costs for one batched Sinkhorn call.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["oat_sufficient_stats", "oat_cost_from_stats", "oat_cost"]


def oat_sufficient_stats(x_m: Tensor, x_id: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Sums needed by :func:`oat_cost_from_stats`, accumulated in float32 (or float64 if given).

    Shapes:
        x_m: [I, d_m] or [M, I, d_m] (M modalities stacked);  x_id: [I, d].
        returns sum_sq_m [d_m] or [M, d_m]; sum_sq_id [d]; cross [d_m, d] or [M, d_m, d]; count = I.
    """
    if x_id.dim() != 2:
        raise ValueError(f"x_id must be [I, d], got shape {tuple(x_id.shape)}")
    if x_m.dim() not in (2, 3) or x_m.shape[-2] != x_id.shape[0]:
        raise ValueError(f"x_m must be [I, d_m] or [M, I, d_m] with I = {x_id.shape[0]}, got {tuple(x_m.shape)}")
    acc = torch.float64 if torch.float64 in (x_m.dtype, x_id.dtype) else torch.float32
    xm, xi = x_m.to(acc), x_id.to(acc)
    sum_sq_m = (xm * xm).sum(dim=-2)
    sum_sq_id = (xi * xi).sum(dim=0)
    cross = xm.transpose(-1, -2) @ xi
    return sum_sq_m, sum_sq_id, cross, int(x_id.shape[0])


def oat_cost_from_stats(sum_sq_m: Tensor, sum_sq_id: Tensor, cross: Tensor, count: int | float | Tensor,
                        scale: float = 1.0) -> Tensor:
    """``C[j, k] = (sum_sq_m[j] + sum_sq_id[k] - 2 cross[j, k]) / count * scale``, clamped at 0.

    The clamp removes tiny negative values produced by cancellation in floating point (the exact
    cost is a mean of squares, hence >= 0).

    Shapes:
        sum_sq_m: [d_m] or [M, d_m];  sum_sq_id: [d];  cross: [d_m, d] or [M, d_m, d].
        returns [d_m, d] or [M, d_m, d].
    """
    if cross.shape[-2] != sum_sq_m.shape[-1] or cross.shape[-1] != sum_sq_id.shape[-1]:
        raise ValueError(f"shape mismatch: sum_sq_m {tuple(sum_sq_m.shape)}, sum_sq_id {tuple(sum_sq_id.shape)}, "
                         f"cross {tuple(cross.shape)}")
    cost = sum_sq_m.unsqueeze(-1) + sum_sq_id.unsqueeze(-2) - 2.0 * cross
    return (cost * (scale / count)).clamp_min(0.0)


def oat_cost(x_m: Tensor, x_id: Tensor, scale: float = 1.0) -> Tensor:
    """Single-process convenience: ``oat_cost_from_stats(*oat_sufficient_stats(x_m, x_id), scale)``."""
    return oat_cost_from_stats(*oat_sufficient_stats(x_m, x_id), scale=scale)
