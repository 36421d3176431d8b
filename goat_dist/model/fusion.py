"""Fusion of the ID view with the modality views: OAT (RecGOAT's distribution-level alignment) and
the ``concat`` / ``sum`` / ``none`` baselines.

OAT (DESIGN.md section 1, step 3), for M modalities x_m [I, d] and the ID view x_id [I, d]:

    C_m[j, k] = scale * mean_i (x_m[i, j] - x_id[i, k])^2            (from sufficient statistics)
    P_m       = Sinkhorn(C_m, 1/d, 1/d, eps)                          (log domain, ONE batched call)
    T_m       = d * P_m                                               (rows and columns sum to 1)
    aligned_m = x_m (T_m + Delta_m)
    fused     = out(w_0 x_id + sum_m w_m aligned_m),                   w = softmax(logits)
    out(z)    = dropout(z)            (default), or the paper's normalize(dropout(LayerNorm(z)))
                                      with ``model.fusion_normalize: true``
    W_m       = <P_m, C_m>                                            (logged; optional loss term)

Design choices:
- Scaling of T: the uniform-marginal d x d plan has entries ~1/d^2, so ``x_m P_m`` would shrink the
  modality by a factor ~d. We use ``T = d * P``, a doubly-stochastic map: each ID dimension k receives a
  convex combination of modality dimensions, so ``x_m T`` keeps the magnitude of ``x_m``. ``Delta_m``
  starts at 0 (the learnable correction starts from the transport map, not from noise).
- Gradient through the cost: T is a CONSTANT w.r.t. the cost (the solver runs without autograd,
  like the reference's ``no_grad`` plan); ``aligned_m`` gets gradients through x_m and Delta_m only.
  Differentiating the plan itself would need unrolled or implicit Sinkhorn gradients for little
  benefit. W = <P, C> does carry the envelope-theorem gradient d W / d C = P, so with
  ``OTConfig.w_weight > 0`` the W term pulls x_m and x_id together through C.
- By default no LayerNorm / L2 normalisation of the fused item (the paper's normalize(LayerNorm(.)),
  kept as ``model.fusion_normalize`` for ablations): they
  erase the item's norm, which in LightGCN carries popularity, and scoring against unit items cost a
  third of Recall@20 in real runs (MovieLens-100K valid Recall@20 after one epoch 0.20 normalised vs
  0.31 without; TikTok 0.05 vs 0.09 for LightGCN). Without them the fused item starts as the
  LightGCN item plus small modality terms and the model can only improve on LightGCN from there.
- Weights: ``w = softmax(logits)`` over [ID, modality_1..M], initialised to
  ``w_m = alpha_init`` and ``w_0 = 1 - M alpha_init``: this is exactly the paper's
  ``(1 - sum alpha_m) x_id + sum alpha_m aligned_m`` with the alphas kept positive and summing below 1.
- Statistics: sums over the rows the caller selects (the batch's triple items, pos and neg, with
  multiplicity, so that summing over ranks gives the global batch's sums). They are packed into ONE
  flat tensor and passed to ``reduce_stats`` (e.g. an all-reduce; it must be autograd-aware, like
  ``torch.distributed.nn.functional.all_reduce``, if the W term is trained), so every rank solves the
  same problem.
- Train vs eval: like BatchNorm. In training the plan comes from the batch statistics and the means
  (sums / count) update an exponential moving average (``ema_momentum``; the first update copies). In
  eval mode — mini-batch eval and ``RecGOAT.compute_all_representations`` alike — the plan comes from
  the EMA, so scoring uses the plan the model was trained with, identical on every rank, independent
  of the eval batch. Before any training step the current statistics are used instead.
- M = 0 or fusion ``none``: the fused item is x_id itself (pure LightGCN scoring).

**Shapes:** x_id [I, d], xs [M, I, d] -> fused [I, d]; plan/cost [M, d, d]; W [M].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from goat_dist.config import OTConfig
from goat_dist.ot import oat_cost_from_stats, oat_sufficient_stats, sinkhorn

ReduceStats = Callable[[Tensor], Tensor]
FUSIONS = ("oat", "concat", "sum", "none")


@dataclass
class FusionOutput:
    """fused [I, d]; aligned [M, I, d] (OAT) ; plan = T_m = d * P_m [M, d, d]; cost [M, d, d];
    W [M]; weights [M + 1] (ID first); converged [M] bool (Sinkhorn met ``tol``; the row marginals
    are exact either way). Fields a fusion does not produce are None."""

    fused: Tensor
    aligned: Tensor | None = None
    plan: Tensor | None = None
    cost: Tensor | None = None
    W: Tensor | None = None
    weights: Tensor | None = None
    converged: Tensor | None = None


class FusedOutput(nn.Module):
    """The last step of every learned fusion: ``dropout(z)``, or with ``normalize`` the paper's
    ``normalize(dropout(LayerNorm(z)))`` (unit-norm items)."""

    def __init__(self, dim: int, dropout: float, normalize: bool = False):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim) if normalize else None

    def forward(self, z: Tensor) -> Tensor:
        if self.norm is None:
            return self.drop(z)
        return nn.functional.normalize(self.drop(self.norm(z)), dim=-1)


class IdentityFusion(nn.Module):
    """``fused = x_id`` (fusion ``none``, or no modalities)."""

    def forward(self, x_id: Tensor, xs: Tensor, stats_rows: Tensor | None = None,
                reduce_stats: ReduceStats | None = None) -> FusionOutput:
        return FusionOutput(fused=x_id)


class ConcatFusion(nn.Module):
    """``out(Linear([x_id, x_1, .., x_M]))`` — baseline."""

    def __init__(self, dim: int, n_modalities: int, dropout: float, normalize: bool = False):
        super().__init__()
        self.proj = nn.Linear((n_modalities + 1) * dim, dim)
        self.drop = FusedOutput(dim, dropout, normalize)

    def forward(self, x_id: Tensor, xs: Tensor, stats_rows: Tensor | None = None,
                reduce_stats: ReduceStats | None = None) -> FusionOutput:
        z = self.proj(torch.cat([x_id, *xs.unbind(0)], dim=-1))
        return FusionOutput(fused=self.drop(z))


class SumFusion(nn.Module):
    """``out(Linear(x_id + sum_m x_m))`` — baseline."""

    def __init__(self, dim: int, dropout: float, normalize: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.drop = FusedOutput(dim, dropout, normalize)

    def forward(self, x_id: Tensor, xs: Tensor, stats_rows: Tensor | None = None,
                reduce_stats: ReduceStats | None = None) -> FusionOutput:
        z = self.proj(x_id + xs.sum(0))
        return FusionOutput(fused=self.drop(z))


def pack_stats(sum_sq_m: Tensor, sum_sq_id: Tensor, cross: Tensor, count: int | float | Tensor) -> Tensor:
    """One flat tensor [M d + d + M d d + 1] (so a distributed caller needs ONE all-reduce)."""
    count_t = torch.as_tensor(count, dtype=sum_sq_id.dtype, device=sum_sq_id.device).reshape(1)
    return torch.cat([sum_sq_m.reshape(-1), sum_sq_id.reshape(-1), cross.reshape(-1), count_t])


def unpack_stats(flat: Tensor, n_modalities: int, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, d = n_modalities, dim
    a, b = m * d, m * d + d
    return (flat[:a].reshape(m, d), flat[a:b], flat[b:b + m * d * d].reshape(m, d, d), flat[-1])


class OATFusion(nn.Module):
    """Optimal adaptive transport fusion (see the module docstring)."""

    def __init__(self, dim: int, n_modalities: int, alpha_init: float, dropout: float, ot_cfg: OTConfig,
                 ema_momentum: float = 0.1, normalize: bool = False):
        super().__init__()
        if n_modalities < 1:
            raise ValueError("OAT fusion needs at least one modality (use fusion 'none' for ID only)")
        if not (0.0 < alpha_init and n_modalities * alpha_init < 1.0):
            raise ValueError(f"alpha_init must be in (0, 1/M) = (0, {1.0 / n_modalities:.3g}), got {alpha_init}")
        if not 0.0 < ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum must be in (0, 1], got {ema_momentum}")
        self.dim, self.n_modalities, self.alpha_init = dim, n_modalities, float(alpha_init)
        self.ot_cfg, self.ema_momentum = ot_cfg, float(ema_momentum)
        self.logits = nn.Parameter(torch.empty(n_modalities + 1))
        self.delta = nn.Parameter(torch.empty(n_modalities, dim, dim))
        self.drop = FusedOutput(dim, dropout, normalize)
        self.register_buffer("ema_sq_m", torch.empty(n_modalities, dim))
        self.register_buffer("ema_sq_id", torch.empty(dim))
        self.register_buffer("ema_cross", torch.empty(n_modalities, dim, dim))
        self.register_buffer("ema_updates", torch.empty((), dtype=torch.int64))
        if self.logits.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        m = self.n_modalities
        w = torch.tensor([1.0 - m * self.alpha_init] + [self.alpha_init] * m)
        self.logits.copy_(w.log())
        self.delta.zero_()
        for buf in (self.ema_sq_m, self.ema_sq_id, self.ema_cross, self.ema_updates):
            buf.zero_()

    def weights(self) -> Tensor:
        """[M + 1]: w_0 (ID) then alpha_1..alpha_M; sums to 1."""
        return torch.softmax(self.logits, dim=0)

    def statistics(self, x_id: Tensor, xs: Tensor, rows: Tensor | None = None) -> Tensor:
        """Packed sufficient statistics (sums) over ``rows`` (all rows when None)."""
        if rows is not None:
            x_id, xs = x_id.index_select(0, rows), xs.index_select(1, rows)
        return pack_stats(*oat_sufficient_stats(xs, x_id))

    def solve(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Packed sums -> (T = d P [M, d, d] constant, C [M, d, d], W [M] with dW/dC = P)."""
        plan, cost, w_value, _ = self._solve(flat)
        return plan, cost, w_value

    def _solve(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sum_sq_m, sum_sq_id, cross, count = unpack_stats(flat, self.n_modalities, self.dim)
        cost = oat_cost_from_stats(sum_sq_m, sum_sq_id, cross, count.clamp_min(1.0), scale=self.ot_cfg.cost_scale)
        res = sinkhorn(cost, eps=self.ot_cfg.eps, max_iter=self.ot_cfg.max_iter, tol=self.ot_cfg.tol,
                       grad="envelope", backend=self.ot_cfg.backend)
        return res.plan.detach() * self.dim, cost, res.cost_value, res.converged

    @torch.no_grad()
    def _update_ema(self, flat: Tensor) -> None:
        sum_sq_m, sum_sq_id, cross, count = unpack_stats(flat.detach(), self.n_modalities, self.dim)
        c = count.clamp_min(1.0)
        mom = 1.0 if int(self.ema_updates) == 0 else self.ema_momentum
        for buf, new in ((self.ema_sq_m, sum_sq_m / c), (self.ema_sq_id, sum_sq_id / c), (self.ema_cross, cross / c)):
            buf.mul_(1.0 - mom).add_(new.to(buf.dtype), alpha=mom)
        self.ema_updates += 1

    def ema_statistics(self) -> Tensor | None:
        """The EMA means packed like sums with count 1, or None before the first training step."""
        if int(self.ema_updates) == 0:
            return None
        return pack_stats(self.ema_sq_m, self.ema_sq_id, self.ema_cross, 1.0)

    def fuse(self, x_id: Tensor, xs: Tensor, plan: Tensor) -> tuple[Tensor, Tensor]:
        """``(fused [I, d], aligned [M, I, d])`` for a given T [M, d, d]; row-wise, so chunkable."""
        aligned = torch.matmul(xs, plan + self.delta)
        w = self.weights()
        z = w[0] * x_id + (w[1:].view(-1, 1, 1) * aligned).sum(0)
        return self.drop(z), aligned

    def forward(self, x_id: Tensor, xs: Tensor, stats_rows: Tensor | None = None,
                reduce_stats: ReduceStats | None = None) -> FusionOutput:
        flat = self.ema_statistics() if not self.training else None
        if flat is None:
            flat = self.statistics(x_id, xs, stats_rows)
            if reduce_stats is not None:
                flat = reduce_stats(flat)
            if self.training:
                self._update_ema(flat)
        plan, cost, w_value, converged = self._solve(flat)
        fused, aligned = self.fuse(x_id, xs, plan)
        return FusionOutput(fused, aligned, plan, cost, w_value, self.weights(), converged)


def build_fusion(kind: str, dim: int, n_modalities: int, alpha_init: float, dropout: float, ot_cfg: OTConfig,
                 ema_momentum: float = 0.1, normalize: bool = False) -> nn.Module:
    """The fusion module for ``ModelConfig.fusion``; no modalities always gives ``IdentityFusion``."""
    if kind not in FUSIONS:
        raise ValueError(f"unknown fusion {kind!r}; expected one of {', '.join(FUSIONS)}")
    if kind == "none" or n_modalities == 0:
        return IdentityFusion()
    if kind == "oat":
        return OATFusion(dim, n_modalities, alpha_init, dropout, ot_cfg, ema_momentum, normalize)
    if kind == "concat":
        return ConcatFusion(dim, n_modalities, dropout, normalize)
    return SumFusion(dim, dropout, normalize)
