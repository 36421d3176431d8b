"""Batched entropic optimal transport (Sinkhorn) in the log domain.

Problem (per batch element, Cuturi 2013; entropy form, the same as POT's ``ot.sinkhorn``)::

    P* = argmin_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> - eps * H(P),    H(P) = -sum_ij P_ij (log P_ij - 1)

with the solution ``P_ij = exp((f_i + g_j - C_ij) / eps)`` for dual potentials f, g. The log-domain
Sinkhorn updates alternate exact column and row projections (starting from f = g = 0, column first,
the same order as POT's ``sinkhorn_log``, so a fixed number of iterations gives the same plan)::

    g_j = eps * log b_j - eps * LSE_i((f_i - C_ij) / eps)
    f_i = eps * log a_i - eps * LSE_j((g_j - C_ij) / eps)

(LSE = log-sum-exp). After an f update the row marginals are exact; the stopping criterion is the
L1 error of the column marginals, ``err = sum_j |sum_i P_ij - b_j| <= tol``, evaluated per problem every
iteration (it costs nothing: the LSE of the next g update is the log of the column sums). A
``tol <= 0`` runs exactly ``max_iter`` iterations.

Design choices:
- Everything is batched: ``cost`` [B, n, m]; a 2-D cost is treated as B = 1 and the result keeps the
  batch axis (shapes [1, n, m], [1, n], ...). Problems of different sizes share one batch through
  padding plus ``mask_a`` [B, n] / ``mask_b`` [B, m]: padded rows/columns get zero mass, zero plan and
  zero potentials. Entries of ``a``/``b`` equal to 0 are treated as masked.
- float16/bfloat16 inputs are solved in float32; results are float32 (float64 stays float64).
- Two interchangeable torch solvers: ``_solve_log`` (pure log-domain, the simple one) and
  ``_solve_stabilized`` (kernel-space updates ``u = a / (K v)``, ``v = b / (K^T u)`` on
  ``K = exp((f + g - C) / eps)``, with the scalings absorbed into f, g whenever they leave
  [1e-30, 1e30] (float64: 1e-100) — the stabilised scheme of Schmitzer 2019). The stabilised solver is
  the CPU fast path: one matrix-vector product per half-iteration instead of five passes over an
  [n, m] temporary. K is rebuilt in the log domain after every absorption, so it cannot underflow to
  an all-zero plan the way ``exp(-C / eps)`` does in the reference RecGOAT code.
- Problems that meet ``tol`` are frozen (their f, g stop changing) while the others continue;
  ``converged`` [B] says which met it within ``max_iter``.
- ``eps_schedule``: optional eps-scaling (one Sinkhorn iteration per eps level, decreasing to
  ``eps``, warm-starting the potentials): ``"auto"`` (halving from the largest cost) or an explicit
  sequence of eps values. Iterations spent there count in ``n_iter``.
- Gradients: ``grad="envelope"`` (default) solves without autograd and attaches the envelope-theorem
  gradient ``d cost_value / d C = P`` (``cost_value = <P, C>``; the plan is held fixed, which is the
  exact gradient of the regularised value) and, for ``reg_value`` (the entropic OT value
  OT_eps(a, b) with the KL(P || a x b) regulariser), ``d/dC = P``, ``d/da = f - eps (log a + 1)``,
  ``d/db = g - eps (log b + 1)``. In envelope mode ``plan``, ``f``, ``g`` are returned detached.
  ``grad="unrolled"`` runs the log-domain iterations under autograd: every output is differentiable
  (memory grows with the number of iterations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from goat_dist.log import get_logger

log = get_logger(__name__)

__all__ = ["SinkhornResult", "sinkhorn", "sinkhorn_log_reference_step"]


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn`.

    Shapes: plan [B, n, m]; f [B, n]; g [B, m]; cost_value [B] (= <plan, cost>); n_iter: int (the
    largest number of iterations any problem ran); converged [B] bool; reg_value [B] (entropic OT value
    ``<P, C> + eps KL(P || a x b)`` = ``<f, a> + <g, b> + eps (H(a) + H(b))``, used by the Sinkhorn
    divergence); err [B] (final L1 column-marginal error).
    """

    plan: Tensor
    f: Tensor
    g: Tensor
    cost_value: Tensor
    n_iter: int
    converged: Tensor
    reg_value: Tensor | None = None
    err: Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Input preparation


@dataclass
class _Prepared:
    cost: Tensor          # [B, n, m] compute dtype, padded entries zeroed
    a: Tensor             # [B, n] (0 where masked)
    b: Tensor             # [B, m]
    log_a: Tensor         # [B, n] (-inf where masked)
    log_b: Tensor         # [B, m]
    mask_a: Tensor        # [B, n] bool
    mask_b: Tensor        # [B, m] bool
    squeeze: bool


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(cost: Tensor, a: Tensor | None, b: Tensor | None, mask_a: Tensor | None, mask_b: Tensor | None
             ) -> _Prepared:
    squeeze = cost.dim() == 2
    if squeeze:
        cost = cost.unsqueeze(0)
        a = None if a is None else a.reshape(1, -1)
        b = None if b is None else b.reshape(1, -1)
        mask_a = None if mask_a is None else mask_a.reshape(1, -1)
        mask_b = None if mask_b is None else mask_b.reshape(1, -1)
    if cost.dim() != 3:
        raise ValueError(f"cost must be [B, n, m] or [n, m], got shape {tuple(cost.shape)}")
    B, n, m = cost.shape
    dt = _compute_dtype(cost.dtype)
    dev = cost.device
    ma = torch.ones(B, n, dtype=torch.bool, device=dev) if mask_a is None else mask_a.to(dev, torch.bool)
    mb = torch.ones(B, m, dtype=torch.bool, device=dev) if mask_b is None else mask_b.to(dev, torch.bool)
    if ma.shape != (B, n) or mb.shape != (B, m):
        raise ValueError(f"masks must be [B, n]={B, n} and [B, m]={B, m}, got {tuple(ma.shape)}, {tuple(mb.shape)}")

    def marginal(x: Tensor | None, mask: Tensor, size: int, name: str) -> tuple[Tensor, Tensor]:
        if x is None:
            cnt = mask.sum(-1, keepdim=True).clamp_min(1)
            x = mask.to(dt) / cnt.to(dt)
        else:
            if x.dim() == 1:
                x = x.unsqueeze(0).expand(B, -1)
            if x.shape != (B, size):
                raise ValueError(f"{name} must be [B, {size}] = {(B, size)}, got {tuple(x.shape)}")
            x = x.to(dt)
            mask = mask & (x > 0)
            x = torch.where(mask, x, torch.zeros((), dtype=dt, device=dev))
        return x, mask

    a_, ma = marginal(a, ma, n, "a")
    b_, mb = marginal(b, mb, m, "b")
    if not (ma.any(-1).all() and mb.any(-1).all()):
        raise ValueError("every problem needs at least one unmasked row and column with positive mass")
    c = cost.to(dt)
    valid = ma.unsqueeze(-1) & mb.unsqueeze(-2)
    c = torch.where(valid, c, torch.zeros((), dtype=dt, device=dev))
    ninf = torch.full((), -math.inf, dtype=dt, device=dev)
    log_a = torch.where(ma, torch.log(a_.clamp_min(torch.finfo(dt).tiny)), ninf)
    log_b = torch.where(mb, torch.log(b_.clamp_min(torch.finfo(dt).tiny)), ninf)
    return _Prepared(c, a_, b_, log_a, log_b, ma, mb, squeeze)


def _eps_levels(eps: float, eps_schedule: str | Sequence[float] | None, cost: Tensor) -> list[float]:
    """The eps values of the scaling phase (each gets one iteration), all > eps, decreasing."""
    if eps_schedule is None:
        return []
    if isinstance(eps_schedule, str):
        if eps_schedule != "auto":
            raise ValueError(f"eps_schedule must be None, 'auto' or a sequence of floats, got {eps_schedule!r}")
        diam = float(cost.abs().max()) if cost.numel() else 0.0
        levels, e = [], diam
        while e > eps:
            levels.append(e)
            e *= 0.5
        return levels
    levels = [float(e) for e in eps_schedule]
    if any(e <= 0 for e in levels):
        raise ValueError(f"eps_schedule values must be positive, got {levels}")
    return [e for e in levels if e > eps]


# --------------------------------------------------------------------------------------------------
# Log-domain solver


def _row_lse(cost: Tensor, g: Tensor, log_b_bias: Tensor, eps: float) -> Tensor:
    """LSE_j((g_j - C_ij) / eps) over unmasked columns -> [B, n]."""
    return torch.logsumexp((g.unsqueeze(-2) - cost) / eps + log_b_bias.unsqueeze(-2), dim=-1)


def _col_lse(cost: Tensor, f: Tensor, log_a_bias: Tensor, eps: float) -> Tensor:
    """LSE_i((f_i - C_ij) / eps) over unmasked rows -> [B, m]."""
    return torch.logsumexp((f.unsqueeze(-1) - cost) / eps + log_a_bias.unsqueeze(-1), dim=-2)


def sinkhorn_log_reference_step(cost: Tensor, f: Tensor, g: Tensor, log_a: Tensor, log_b: Tensor, eps: float
                                ) -> tuple[Tensor, Tensor]:
    """One full log-domain iteration ``g <- G(f)``, ``f <- F(g)`` without masks (for tests/kernels)."""
    g = eps * (log_b - torch.logsumexp((f.unsqueeze(-1) - cost) / eps, dim=-2))
    f = eps * (log_a - torch.logsumexp((g.unsqueeze(-2) - cost) / eps, dim=-1))
    return f, g


def _solve_log(p: _Prepared, eps: float, max_iter: int, tol: float, levels: list[float]
               ) -> tuple[Tensor, Tensor, int, Tensor, Tensor]:
    """Log-domain iterations; differentiable when autograd is on. Returns f, g, n_iter, converged, err."""
    cost, ma, mb = p.cost, p.mask_a, p.mask_b
    B, n, m = cost.shape
    dt = cost.dtype
    zero = torch.zeros((), dtype=dt, device=cost.device)
    # additive biases that exclude masked rows/columns from the LSEs
    bias_a = torch.where(ma, zero, torch.full((), -math.inf, dtype=dt, device=cost.device))
    bias_b = torch.where(mb, zero, torch.full((), -math.inf, dtype=dt, device=cost.device))
    f = torch.zeros(B, n, dtype=dt, device=cost.device)
    g = torch.zeros(B, m, dtype=dt, device=cost.device)
    for e in levels:
        g = torch.where(mb, e * (p.log_b - _col_lse(cost, f, bias_a, e)), zero)
        f = torch.where(ma, e * (p.log_a - _row_lse(cost, g, bias_b, e)), zero)
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    err = torch.full((B,), math.inf, dtype=dt, device=cost.device)
    lse_c = _col_lse(cost, f, bias_a, eps)
    n_iter = len(levels)
    ninf = torch.full((), -math.inf, dtype=dt, device=cost.device)
    for _ in range(max_iter):
        n_iter += 1
        upd = active.unsqueeze(-1)
        g = torch.where(upd & mb, eps * (p.log_b - lse_c), torch.where(mb, g, zero))
        f_new = eps * (p.log_a - _row_lse(cost, g, bias_b, eps))
        f = torch.where(upd & ma, f_new, torch.where(ma, f, zero))
        lse_c = _col_lse(cost, f, bias_a, eps)
        # column marginals of the current (f, g): exp(g / eps + lse_c); rows are exact after the f update
        col = torch.exp(torch.where(mb, g / eps + lse_c, ninf))
        err_now = (col - p.b).abs().sum(-1).detach()
        err = torch.where(active, err_now, err)
        active = active & ~(err_now <= tol)
        if not bool(active.any()):
            break
    return f, g, n_iter, ~active, err


def _scaling_bound(dtype: torch.dtype) -> float:
    """|log u|, |log v| above which the scalings are absorbed into the potentials.

    The plan is ``u_i K_ij v_j``; K entries below the dtype's smallest normal are lost, so the product
    ``u_i v_j`` must stay small enough that a lost entry is a negligible plan entry:
    float32: u, v in [1e-15, 1e15]; float64: [1e-100, 1e100].
    """
    return math.log(1e100) if dtype == torch.float64 else math.log(1e15)


def _solve_stabilized(p: _Prepared, eps: float, max_iter: int, tol: float, levels: list[float]
                      ) -> tuple[Tensor, Tensor, int, Tensor, Tensor, Tensor]:
    """Kernel-space Sinkhorn with log-domain absorption (no autograd); the CPU fast path.

    With potentials (f, g) and ``K_ij = exp((f_i + g_j - C_ij) / eps)`` the plan is
    ``P = diag(u) K diag(v)``; the updates::

        v = b / (K^T u)        (= g <- G(f) for the potentials g + eps log v)
        u = a / (K v)          (= f <- F(g) for f + eps log u)

    are the log-domain updates of :func:`_solve_log` (same order, same start f = 0), each one batched
    matrix-vector product over K instead of ~5 passes over an [n, m] temporary.

    Log-domain guarantee: K starts as ``exp((g0_j - C_ij) / eps)`` with ``g0_j = min_i (C_ij - f_i)``,
    so every column's largest entry is 1 (the first ``K^T u`` cannot underflow). Whenever a problem's
    new ``|log u|`` or ``|log v|`` exceeds :func:`_scaling_bound` (also what a clamped, underflowed
    ``K v`` produces), that problem's iteration is redone exactly in the log domain from the previous
    potentials, the scalings are absorbed (u = v = 1) and its K is rebuilt — K is never the all-zero
    ``exp(-C / eps)`` of the reference code, and no precision is silently lost.

    Returns f, g, n_iter, converged, err and the plan (built in place of K).
    """
    cost, ma, mb = p.cost, p.mask_a, p.mask_b
    B, n, m = cost.shape
    dt = cost.dtype
    dev = cost.device
    zero = torch.zeros((), dtype=dt, device=dev)
    one = torch.ones((), dtype=dt, device=dev)
    ninf = torch.full((), -math.inf, dtype=dt, device=dev)
    tiny = torch.finfo(dt).tiny
    bound = _scaling_bound(dt)
    padded = not (bool(ma.all()) and bool(mb.all()))
    valid = ma.unsqueeze(-1) & mb.unsqueeze(-2)
    bias_a = torch.where(ma, zero, ninf)
    bias_b = torch.where(mb, zero, ninf)
    f = torch.zeros(B, n, dtype=dt, device=dev)
    g = torch.zeros(B, m, dtype=dt, device=dev)
    for e in levels:   # eps-scaling phase, log domain (one iteration per level)
        g = torch.where(mb, e * (p.log_b - _col_lse(cost, f, bias_a, e)), zero)
        f = torch.where(ma, e * (p.log_a - _row_lse(cost, g, bias_b, e)), zero)
    n_iter = len(levels)
    inv_eps = 1.0 / eps

    def build_kernel(f_: Tensor, g_: Tensor, c_: Tensor, valid_: Tensor) -> Tensor:
        k = torch.sub(g_.unsqueeze(-2), c_).add_(f_.unsqueeze(-1)).mul_(inv_eps).exp_()
        return k.masked_fill_(~valid_, 0.0) if padded else k

    # g0 = c-transform of f: largest entry of every column of K is exactly 1
    shifted = cost - f.unsqueeze(-1)
    if padded:
        shifted = shifted.masked_fill_(~valid, math.inf)
    g = torch.where(mb, -shifted.amin(-2), zero)
    del shifted
    K = build_kernel(f, g, cost, valid)
    if dev.type == "cpu" and n * m >= 128 * 128:
        # CPU: one BLAS gemv per problem; torch.bmm with a vector operand is several times slower
        # there (and stalls on thread barriers when the cores are shared)
        def matvec_t(K_: Tensor, x: Tensor) -> Tensor:        # K^T x: [B, m]
            out = torch.empty(K_.shape[0], K_.shape[2], dtype=dt, device=dev)
            for i in range(K_.shape[0]):
                torch.mv(K_[i].t(), x[i], out=out[i])
            return out

        def matvec(K_: Tensor, x: Tensor) -> Tensor:          # K x: [B, n]
            out = torch.empty(K_.shape[0], K_.shape[1], dtype=dt, device=dev)
            for i in range(K_.shape[0]):
                torch.mv(K_[i], x[i], out=out[i])
            return out
    else:
        def matvec_t(K_: Tensor, x: Tensor) -> Tensor:
            return torch.bmm(x.unsqueeze(1), K_).squeeze(1)

        def matvec(K_: Tensor, x: Tensor) -> Tensor:
            return torch.bmm(K_, x.unsqueeze(-1)).squeeze(-1)

    u = torch.where(ma, one, zero)
    v = torch.where(mb, one, zero)
    a_, b_ = p.a, p.b
    KTu = matvec_t(K, u)                                              # [B, m]
    err = torch.full((B,), math.inf, dtype=dt, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    lo, hi = math.exp(-bound), math.exp(bound)
    # Small problems are bound by per-op overhead: run `chunk` unchecked iterations (4 ops each), then
    # test convergence and the scaling range; a chunk whose scalings left [lo, hi] (or overflowed) is
    # rolled back and redone one checked iteration at a time. Like POT, such problems are tested for
    # convergence at intervals (they may run up to chunk - 1 extra iterations: more accurate, not less).
    chunk = 1 if B * n * m >= (1 << 20) else 8
    done = 0
    while done < max_iter and bool(active.any()):
        k = min(chunk, max_iter - done)
        if k > 1:
            all_active = bool(active.all())
            u0, v0, KTu0 = u, v, KTu
            for _ in range(k):
                v_new = b_ / KTu.clamp_min(tiny)
                v = v_new if all_active else torch.where(active.unsqueeze(-1), v_new, v)
                u_new = a_ / matvec(K, v).clamp_min(tiny)
                u = u_new if all_active else torch.where(active.unsqueeze(-1), u_new, u)
                KTu = matvec_t(K, u)
            u_chk = torch.where(ma, u, one) if padded else u
            v_chk = torch.where(mb, v, one) if padded else v
            umin, umax = torch.aminmax(u_chk, dim=-1)
            vmin, vmax = torch.aminmax(v_chk, dim=-1)
            ok = bool(((umin >= lo) & (umax <= hi) & (vmin >= lo) & (vmax <= hi)).all())
            if ok:
                done += k
                n_iter += k
                err_now = (v * KTu - b_).abs().sum(-1)
                err = torch.where(active, err_now, err)
                active = active & ~(err_now <= tol)
                continue
            u, v, KTu = u0, v0, KTu0           # roll back; redo this stretch with checked iterations
        for _ in range(k):
            done += 1
            n_iter += 1
            upd_b = active.unsqueeze(-1) & mb
            upd_a = active.unsqueeze(-1) & ma
            u_prev = u
            v = torch.where(upd_b, b_ / KTu.clamp_min(tiny), v)
            Kv = matvec(K, v)                                             # [B, n]
            u = torch.where(upd_a, a_ / Kv.clamp_min(tiny), u)
            lu = torch.where(ma, torch.log(torch.where(ma, u, one)), zero)
            lv = torch.where(mb, torch.log(torch.where(mb, v, one)), zero)
            bad = active & ((lu.abs().amax(-1) > bound) | (lv.abs().amax(-1) > bound))
            if bool(bad.any()):
                idx = bad.nonzero().squeeze(-1)
                c_i, ma_i, mb_i = cost[idx], ma[idx], mb[idx]
                f_i = torch.where(ma_i, f[idx] + eps * torch.log(torch.where(ma_i, u_prev[idx], one)), zero)
                g_i = torch.where(mb_i, eps * (p.log_b[idx] - _col_lse(c_i, f_i, bias_a[idx], eps)), zero)
                f_i = torch.where(ma_i, eps * (p.log_a[idx] - _row_lse(c_i, g_i, bias_b[idx], eps)), zero)
                f[idx], g[idx] = f_i, g_i
                K[idx] = build_kernel(f_i, g_i, c_i, valid[idx])
                u[idx] = torch.where(ma_i, one, zero)
                v[idx] = torch.where(mb_i, one, zero)
            KTu = matvec_t(K, u)
            err_now = (v * KTu - b_).abs().sum(-1)
            err = torch.where(active, err_now, err)
            active = active & ~(err_now <= tol)
            if not bool(active.any()):
                break
    f = torch.where(ma, f + eps * torch.log(torch.where(ma, u, one)), zero)
    g = torch.where(mb, g + eps * torch.log(torch.where(mb, v, one)), zero)
    plan = K.mul_(u.unsqueeze(-1)).mul_(v.unsqueeze(-2))
    return f, g, n_iter, ~active, err, plan


# --------------------------------------------------------------------------------------------------
# Outputs and gradients


def _plan(cost: Tensor, f: Tensor, g: Tensor, ma: Tensor, mb: Tensor, eps: float) -> Tensor:
    """``P = exp((f_i + g_j - C_ij) / eps)``, exactly 0 on padded rows/columns."""
    valid = ma.unsqueeze(-1) & mb.unsqueeze(-2)
    z = (f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps
    return torch.where(valid, torch.exp(z), torch.zeros((), dtype=cost.dtype, device=cost.device))


def _entropy(x: Tensor, mask: Tensor) -> Tensor:
    """H(x) = -sum x log x over the unmasked entries -> [B]."""
    safe = torch.where(mask, x, torch.ones((), dtype=x.dtype, device=x.device))
    return -(torch.where(mask, safe * torch.log(safe), torch.zeros((), dtype=x.dtype, device=x.device))).sum(-1)


class _EnvelopeValues(torch.autograd.Function):
    """(cost, a, b) -> (cost_value, reg_value) with envelope-theorem gradients from a solved plan."""

    @staticmethod
    def forward(ctx, cost, a, b, plan, f, g, log_a, log_b, mask_a, mask_b, eps):
        ctx.save_for_backward(plan, f, g, log_a, log_b, mask_a, mask_b)
        ctx.eps = eps
        B = plan.shape[0]
        cost_value = torch.bmm(plan.reshape(B, 1, -1), cost.reshape(B, -1, 1)).reshape(B)
        reg_value = (f * a).sum(-1) + (g * b).sum(-1) + eps * (_entropy(a, mask_a) + _entropy(b, mask_b))
        return cost_value, reg_value

    @staticmethod
    def backward(ctx, go_cost, go_reg):
        plan, f, g, log_a, log_b, mask_a, mask_b = ctx.saved_tensors
        eps = ctx.eps
        grad_cost = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_cost = plan * (go_cost + go_reg).view(-1, 1, 1)
        zero = torch.zeros((), dtype=f.dtype, device=f.device)
        if ctx.needs_input_grad[1]:
            grad_a = torch.where(mask_a, (f - eps * (log_a + 1.0)), zero) * go_reg.view(-1, 1)
        if ctx.needs_input_grad[2]:
            grad_b = torch.where(mask_b, (g - eps * (log_b + 1.0)), zero) * go_reg.view(-1, 1)
        return grad_cost, grad_a, grad_b, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public entry point


def sinkhorn(cost: Tensor, a: Tensor | None = None, b: Tensor | None = None, eps: float = 0.05,
             max_iter: int = 200, tol: float = 1e-6, eps_schedule: str | Sequence[float] | None = None,
             grad: str = "envelope", backend: str = "auto", mask_a: Tensor | None = None,
             mask_b: Tensor | None = None) -> SinkhornResult:
    """Solve B entropic OT problems ``min <P, C> - eps H(P)`` s.t. ``P 1 = a``, ``P^T 1 = b``.

    Log-domain Sinkhorn (see the module docstring for the updates, stopping rule and gradients).

    Args:
        cost: [B, n, m] (or [n, m] = one problem; the result keeps B = 1). Any float dtype;
            float16/bfloat16 are solved in float32.
        a, b: marginals [B, n] / [B, m] (or 1-D, broadcast over B); uniform over the unmasked
            entries when None. Each problem's a and b must have equal total mass.
        eps: entropic regularisation (same convention as POT's ``reg``).
        max_iter: iterations (one f and one g update each) after the eps-scaling phase.
        tol: stop a problem once its L1 column-marginal error is <= tol (<= 0: run exactly max_iter
            iterations; ``converged`` then reports err == 0).
        eps_schedule: None, ``"auto"`` or a decreasing sequence of eps values (eps-scaling).
        grad: ``"envelope"`` (default) or ``"unrolled"``.
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"``, ``"torch_log"``
            (the pure log-domain torch solver) or ``"triton"``.
        mask_a, mask_b: bool [B, n] / [B, m]; False marks padding.

    Returns:
        :class:`SinkhornResult` with plan [B, n, m], f [B, n], g [B, m], cost_value [B], n_iter,
        converged [B], reg_value [B], err [B].
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if grad not in ("envelope", "unrolled"):
        raise ValueError(f"grad must be 'envelope' or 'unrolled', got {grad!r}")
    if backend not in ("auto", "torch", "torch_log", "triton"):
        raise ValueError(f"backend must be auto|torch|torch_log|triton, got {backend!r}")
    p = _prepare(cost, a, b, mask_a, mask_b)
    if not bool(torch.isfinite(p.cost).all()):
        raise ValueError("cost contains NaN or Inf")
    levels = _eps_levels(eps, eps_schedule, p.cost.detach())
    eps = float(eps)
    fixed = tol <= 0          # run exactly max_iter iterations
    tol_run = -math.inf if fixed else float(tol)

    if grad == "unrolled":
        f, g, n_iter, converged, err = _solve_log(p, eps, max_iter, tol_run, levels)
        if fixed:
            converged = err <= 0
        plan = _plan(p.cost, f, g, p.mask_a, p.mask_b, eps)
        cost_value = (plan * p.cost).sum((-1, -2))
        reg_value = ((f * p.a).sum(-1) + (g * p.b).sum(-1)
                     + eps * (_entropy(p.a, p.mask_a) + _entropy(p.b, p.mask_b)))
        return SinkhornResult(plan, f, g, cost_value, n_iter, converged, reg_value, err)

    with torch.no_grad():
        pd = _Prepared(p.cost.detach(), p.a.detach(), p.b.detach(), p.log_a.detach(), p.log_b.detach(),
                       p.mask_a, p.mask_b, p.squeeze)
        use = backend
        if use == "auto":
            use = "triton" if pd.cost.is_cuda else "torch"
        plan = None
        if use == "triton":
            from goat_dist.ot.sinkhorn_triton import solve_triton

            f, g, n_iter, converged, err = solve_triton(pd, eps, max_iter, tol_run, levels)
        elif use == "torch_log":
            f, g, n_iter, converged, err = _solve_log(pd, eps, max_iter, tol_run, levels)
        else:
            f, g, n_iter, converged, err, plan = _solve_stabilized(pd, eps, max_iter, tol_run, levels)
        if fixed:
            converged = err <= 0
        if plan is None:
            plan = _plan(pd.cost, f, g, pd.mask_a, pd.mask_b, eps)
    cost_value, reg_value = _EnvelopeValues.apply(p.cost, p.a, p.b, plan, f, g, pd.log_a, pd.log_b,
                                                  p.mask_a, p.mask_b, eps)
    if not bool(converged.all()):
        log.debug("sinkhorn: %d of %d problems did not reach tol=%g in %d iterations",
                  int((~converged).sum()), converged.numel(), tol, n_iter)
    return SinkhornResult(plan, f, g, cost_value, n_iter, converged, reg_value, err)
