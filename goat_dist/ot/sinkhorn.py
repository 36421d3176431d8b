"""Batched entropic optimal transport (Sinkhorn) in the log domain.

Problem (per batch element, Cuturi 2013; entropy form, the same as POT's ``ot.sinkhorn``)::

    P* = argmin_{P >= 0, P 1 = a, P^T 1 = b}  <P, C> - eps * H(P),    H(P) = -sum_ij P_ij (log P_ij - 1)

with the solution ``P_ij = exp((f_i + g_j - C_ij) / eps)`` for dual potentials f, g. The log-domain
Sinkhorn updates alternate exact column and row projections (starting from f = g = 0, column first,
the same order as POT's ``sinkhorn_log``, so a fixed number of iterations gives the same plan)::

    g_j = eps * log b_j - eps * LSE_i((f_i - C_ij) / eps)
    f_i = eps * log a_i - eps * LSE_j((g_j - C_ij) / eps)

(LSE = log-sum-exp). After an f update the row marginals are exact; the stopping criterion is the
L1 error of the column marginals, ``err = sum_j |sum_i P_ij - b_j| <= tol``, evaluated per problem: every
iteration in the log-domain solver and for large problems; small problems in the stabilised solver
are tested at intervals predicted from the observed linear convergence rate (they may run a few
iterations past tol: more accurate, never less). A ``tol <= 0`` runs exactly ``max_iter`` iterations.

Design choices:
- Everything is batched: ``cost`` [B, n, m]; a 2-D cost is treated as B = 1 and the result keeps the
  batch axis (shapes [1, n, m], [1, n], ...). Problems of different sizes share one batch through
  padding plus ``mask_a`` [B, n] / ``mask_b`` [B, m]: padded rows/columns get zero mass, zero plan and
  zero potentials. Entries of ``a``/``b`` equal to 0 are treated as masked.
- float16/bfloat16 inputs are solved in float32; results are float32 (float64 stays float64).
- Two interchangeable torch solvers: ``_solve_log`` (pure log-domain, the simple one) and
  ``_solve_stabilized`` (kernel-space updates ``u = a / (K v)``, ``v = b / (K^T u)`` on
  ``K = exp((f + g - C) / eps)``, with the scalings absorbed into f, g whenever they leave
  [1e-15, 1e15] (float64: 1e-100) — the stabilised scheme of Schmitzer 2019). The stabilised solver is
  the CPU fast path: one matrix-vector product per half-iteration instead of five passes over an
  [n, m] temporary, problems solved in cache-sized groups, and a float64 refinement iteration for
  float32 inputs (see :func:`_solve_stabilized`). K is rebuilt in the log domain after every absorption, so it cannot underflow to
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

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from goat_dist.log import get_logger

log = get_logger(__name__)

__all__ = ["SinkhornResult", "resolve_backend", "sinkhorn", "sinkhorn_log_reference_step"]


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
    padded: bool = True   # False: every row and column is unmasked with positive mass (no masking work)


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
    if mask_a is None and mask_b is None:
        fast = _prepare_unmasked(cost, a, b, dt)
        if fast is not None:
            fast.squeeze = squeeze
            return fast
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
    padded = not bool(torch.cat([ma, mb], -1).all())
    ninf = torch.full((), -math.inf, dtype=dt, device=dev)
    if padded:
        valid = ma.unsqueeze(-1) & mb.unsqueeze(-2)
        c = torch.where(valid, c, torch.zeros((), dtype=dt, device=dev))
        log_a = torch.where(ma, torch.log(a_.clamp_min(torch.finfo(dt).tiny)), ninf)
        log_b = torch.where(mb, torch.log(b_.clamp_min(torch.finfo(dt).tiny)), ninf)
    else:       # nothing to mask: skip a full pass over the cost
        log_a, log_b = torch.log(a_), torch.log(b_)
    return _Prepared(c, a_, b_, log_a, log_b, ma, mb, squeeze, padded)


def _prepare_unmasked(cost: Tensor, a: Tensor | None, b: Tensor | None, dt: torch.dtype) -> _Prepared | None:
    """No masks and strictly positive marginals (the common case): no masking work at all.

    Returns None (the caller takes the general path) when ``a`` or ``b`` has a zero entry, which then
    means a masked row/column.
    """
    B, n, m = cost.shape
    dev = cost.device

    def marginal(x: Tensor | None, size: int, name: str) -> Tensor:
        if x is None:
            return torch.full((B, size), 1.0 / size, dtype=dt, device=dev)
        if x.dim() == 1:
            x = x.unsqueeze(0).expand(B, -1)
        if x.shape != (B, size):
            raise ValueError(f"{name} must be [B, {size}] = {(B, size)}, got {tuple(x.shape)}")
        return x if x.dtype == dt else x.to(dt)

    a_, b_ = marginal(a, n, "a"), marginal(b, m, "b")
    if (a is not None or b is not None) and not bool(torch.cat([a_, b_], -1).amin() > 0):
        return None
    ones_a = torch.ones(B, n, dtype=torch.bool, device=dev)
    ones_b = torch.ones(B, m, dtype=torch.bool, device=dev)
    c = cost if cost.dtype == dt else cost.to(dt)
    return _Prepared(c, a_, b_, torch.log(a_), torch.log(b_), ones_a, ones_b, False, False)


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


def _eps_scaling_phase(p: _Prepared, levels: list[float]) -> Tensor:
    """The potential f [B, n] the kernel-space solvers start from: 0, or after the eps-scaling phase
    (one log-domain iteration per level of ``levels``, warm-started)."""
    cost, ma, mb = p.cost, p.mask_a, p.mask_b
    B, n, _ = cost.shape
    dt, dev = cost.dtype, cost.device
    f = torch.zeros(B, n, dtype=dt, device=dev)
    if levels:
        zero = torch.zeros((), dtype=dt, device=dev)
        bias_a = torch.where(ma, zero, torch.full((), -math.inf, dtype=dt, device=dev))
        bias_b = torch.where(mb, zero, torch.full((), -math.inf, dtype=dt, device=dev))
        for e in levels:
            g = torch.where(mb, e * (p.log_b - _col_lse(cost, f, bias_a, e)), zero)
            f = torch.where(ma, e * (p.log_a - _row_lse(cost, g, bias_b, e)), zero)
    return f


def _c_transform_kernel(c: Tensor, f: Tensor, f_nonzero: bool, mb: Tensor, valid: Tensor | None, inv_eps: float,
                        K: Tensor) -> Tensor:
    """g0 = the c-transform of f (``min_i C_ij - f_i``; 0 on masked columns) and, into ``K``, the kernel
    ``exp((f_i + g0_j - C_ij) / eps)`` (0 off ``valid``): the largest entry of every column is exactly 1
    and every exponent is <= 0 (computed as (g0 - C) first: exact near the column minima, where the
    plan is large). Returns g0 [B, m]."""
    shifted = c - f.unsqueeze(-1) if f_nonzero else c
    if valid is not None:
        shifted = shifted.masked_fill(~valid, math.inf)
    g = shifted.amin(-2)
    if valid is not None:
        g = torch.where(mb, g, 0.0)
    del shifted
    if f_nonzero:
        _build_kernel_full(f, g, c, valid, inv_eps, K)
    else:       # f = 0: skip one pass
        torch.sub(g.unsqueeze(-2), c, out=K).mul_(inv_eps).exp_()
        if valid is not None:
            K.masked_fill_(~valid, 0.0)
    return g


def _solve_stabilized(p: _Prepared, eps: float, max_iter: int, tol: float, levels: list[float]
                      ) -> tuple[Tensor, Tensor, int, Tensor, Tensor, Tensor]:
    """Kernel-space Sinkhorn with log-domain absorption (no autograd); the CPU fast path.

    With potentials (f, g) and ``K_ij = exp((f_i + g_j - C_ij) / eps)`` the plan is
    ``P = diag(u) K diag(v)``; the updates::

        v = b / (K^T u)        (= g <- G(f) for the potentials g + eps log v)
        u = a / (K v)          (= f <- F(g) for f + eps log u)

    are the log-domain updates of :func:`_solve_log` (same order, same start f = 0), one
    matrix-vector product over K per half-iteration instead of ~5 passes over an [n, m] temporary.

    Memory and overhead (the CPU is the target): the batch is solved in groups of problems whose
    kernels fit in cache (:data:`_GROUP_BYTES`), so the matrix-vector products after the first read K
    from cache, not DRAM (B = 64 problems of 256 x 256: 3x faster than one batched solve); each group
    stops on its own. Small kernels (<=
    :data:`_SMALL_KERNEL_BYTES`) also keep ``K^T`` and compute both products as row-vector x matrix
    ``bmm`` (much cheaper than ``bmm(K, v)`` there); large ones use one BLAS gemv per problem.

    Log-domain guarantee: K starts as ``exp((f_i + g0_j - C_ij) / eps)`` with ``g0_j = min_i (C_ij -
    f_i)`` (the c-transform), so every column's largest entry is exactly 1 and the exponent is <= 0
    (small, accurately rounded exponents where the plan is large). Whenever a problem's ``|log u|`` or
    ``|log v|`` exceeds :func:`_scaling_bound` (also what an underflowed ``K v`` produces), its
    iteration is redone exactly in the log domain from the previous potentials, the scalings are
    absorbed (u = v = 1) and its K is rebuilt: K is never the all-zero ``exp(-C / eps)`` of the
    reference code, and no precision is silently lost.

    float32 refinement: float32 matrix-vector products leave a relative error ~1e-6 in u, v for
    n ~ 1,000 (rounding of the sums), which caps the plan's accuracy above what log-domain float32
    solvers reach. When stopping on ``tol`` (> 0), float32 problems with n or m >= 128 therefore get
    one more Sinkhorn iteration with float64 products over the same K (not counted in ``n_iter``;
    ``err`` is the last checked error, before it): the plan error then drops to ~1e-7 of its maximum
    (measured at d = 256 and 1,024 against a float64 reference).

    Returns f, g, n_iter, converged, err and the plan (built in place of K).
    """
    cost, ma, mb = p.cost, p.mask_a, p.mask_b
    B, n, m = cost.shape
    dt = cost.dtype
    dev = cost.device
    f = _eps_scaling_phase(p, levels)
    g = None            # the solver starts from the c-transform of f
    kernel_bytes = n * m * cost.element_size()
    small = dev.type != "cpu" or kernel_bytes <= _SMALL_KERNEL_BYTES
    group = max(1, _GROUP_BYTES // (kernel_bytes * (2 if small else 1))) if dev.type == "cpu" else B
    polish = dt == torch.float32 and tol > -math.inf and max(n, m) >= _POLISH_MIN_LEN
    plan = torch.empty(B, n, m, dtype=dt, device=dev)
    if group < B:
        converged = torch.empty(B, dtype=torch.bool, device=dev)
        err = torch.empty(B, dtype=dt, device=dev)
        g = torch.empty(B, m, dtype=dt, device=dev)
    if group >= B:
        f, g, it, converged, err = _solve_group(cost, p.a, p.b, p.log_a, p.log_b, ma, mb, p.padded, f, bool(levels),
                                                plan, eps, max_iter, tol, small, polish)
        return f, g, len(levels) + it, converged, err, plan
    n_iter = 0
    for s in range(0, B, group):
        sl = slice(s, min(B, s + group))
        f[sl], g[sl], it, converged[sl], err[sl] = _solve_group(
            cost[sl], p.a[sl], p.b[sl], p.log_a[sl], p.log_b[sl], ma[sl], mb[sl], p.padded, f[sl],
            bool(levels), plan[sl], eps, max_iter, tol, small, polish)
        n_iter = max(n_iter, it)
    return f, g, len(levels) + n_iter, converged, err, plan


# float32 refinement only for reductions at least this long: shorter float32 sums are accurate enough
# that the plan error is set by the rounding of u, v themselves.
_POLISH_MIN_LEN = 128
# Kernels up to this size keep K^T as well (row-vector bmm for both products); groups of problems are
# sized so that their kernels (and K^T) take ~2 MiB: one core's L2 is 1 MiB on the 2-core EPYC we
# measured, but 2 MiB groups were faster there (fewer ops per problem; the data still sits in L3).
_SMALL_KERNEL_BYTES = 256 * 256 * 4
_GROUP_BYTES = 2 << 20


def _solve_group(c: Tensor, a: Tensor, b: Tensor, log_a: Tensor, log_b: Tensor, ma: Tensor, mb: Tensor,
                 padded: bool, f: Tensor, f_nonzero: bool, K: Tensor, eps: float, max_iter: int, tol: float,
                 small: bool, polish: bool) -> tuple[Tensor, Tensor, int, Tensor, Tensor]:
    """Stabilised Sinkhorn on one group of problems (see :func:`_solve_stabilized`).

    Shapes: c, K (output: the plan) [G, n, m]; a, log_a, ma, f [G, n]; b, log_b, mb [G, m]. Scalings
    are kept as row vectors u [G, 1, n], v [G, 1, m] so each product is one ``bmm`` without reshapes.
    Returns f, g, n_iter, converged, err.
    """
    G, n, m = c.shape
    dt, dev = c.dtype, c.device
    zero, one = 0.0, 1.0
    tiny = torch.finfo(dt).tiny
    bound = _scaling_bound(dt)
    lo, hi = math.exp(-bound), math.exp(bound)
    inv_eps = 1.0 / eps
    valid = ma.unsqueeze(-1) & mb.unsqueeze(-2) if padded else None

    g = _c_transform_kernel(c, f, f_nonzero, mb, valid, inv_eps, K)
    KT = K.transpose(1, 2).contiguous() if small else None
    if small:
        def mv_t(u_: Tensor) -> Tensor:        # u^T K: [G, 1, m]
            return torch.bmm(u_, K)

        def mv(v_: Tensor) -> Tensor:          # (K v)^T: [G, 1, n]
            return torch.bmm(v_, KT)
    else:
        Ks = [K[i] for i in range(G)]
        KTs = [k.t() for k in Ks]

        def per_problem_mv(mats: list[Tensor], v_: Tensor, size: int) -> Tensor:  # one BLAS gemv each
            if G == 1:
                return torch.mv(mats[0], v_.reshape(-1)).view(1, 1, size)
            out = torch.empty(G, 1, size, dtype=dt, device=dev)
            for i in range(G):
                torch.mv(mats[i], v_[i, 0], out=out[i, 0])
            return out

        def mv_t(u_: Tensor) -> Tensor:
            return per_problem_mv(KTs, u_, m)

        def mv(v_: Tensor) -> Tensor:
            return per_problem_mv(Ks, v_, n)

    a3, b3 = a.unsqueeze(1), b.unsqueeze(1)
    if padded:
        ma3, mb3 = ma.unsqueeze(1), mb.unsqueeze(1)
        mab3 = torch.cat([ma3, mb3], -1)
        u, v = ma3.to(dt), mb3.to(dt)
    else:
        u, v = torch.ones(G, 1, n, dtype=dt, device=dev), torch.ones(G, 1, m, dtype=dt, device=dev)
    KTu = mv_t(u)
    err = active = None       # [G] float / bool, created at the first test
    n_active = G
    # Run `chunk` unchecked iterations (4 ops each), then test convergence and the scaling range with
    # one sync; a chunk whose scalings left [lo, hi] (or overflowed: inf/NaN fail the test) is rolled
    # back and redone one checked iteration at a time. Small problems are bound by per-op overhead, so
    # they are tested at intervals like POT does (extra iterations are more accurate, not less): the
    # first after _CHECK_EVERY iterations, then after as many as the observed linear rate of the error
    # predicts to reach tol (Sinkhorn converges linearly), capped to [1, _CHECK_MAX].
    chunk = 1 if G * n * m >= (1 << 20) else _CHECK_EVERY
    done = n_iter = 0
    prev_err = None
    while done < max_iter and n_active:
        k = min(chunk, max_iter - done)
        if k > 1:
            u0, v0, KTu0 = u, v, KTu
            for _ in range(k):
                v = b3 / KTu
                u = a3 / mv(v)
                KTu = mv_t(u)
            if n_active < G:    # problems are independent: restore the frozen ones once per chunk
                act3 = active.view(G, 1, 1)
                u, v, KTu = torch.where(act3, u, u0), torch.where(act3, v, v0), torch.where(act3, KTu, KTu0)
            uv = torch.cat([u, v], -1)
            prod = v * KTu
            if padded:
                uv = torch.where(mab3, uv, one)
                prod = torch.where(mb3, prod, zero)
            err_now = (prod - b3).abs().sum((-1, -2))
            stats = torch.cat([torch.stack(torch.aminmax(uv)), err_now]).tolist()     # the one sync
            if lo <= stats[0] and stats[1] <= hi:      # False for NaN
                done += k
                n_iter += k
                still = [e > tol for e in stats[2:]]   # False for NaN: cannot happen, the range holds
                if chunk > 1:
                    worst = max(stats[2:])
                    chunk = _next_chunk(prev_err, worst, k, tol)
                    prev_err = worst
                if n_active == G:
                    err = err_now
                    active = None
                else:
                    err = torch.where(active, err_now, err)
                    still = [s and act for s, act in zip(still, active.tolist())]
                n_active = sum(still)
                active = None if n_active == G else torch.tensor(still, dtype=torch.bool, device=dev)
                continue
            u, v, KTu = u0, v0, KTu0           # roll back; redo this stretch with checked iterations
        if err is None:
            err = torch.full((G,), math.inf, dtype=dt, device=dev)
        if active is None:                      # None: all active
            active = torch.ones(G, dtype=torch.bool, device=dev)
        for _ in range(k):
            done += 1
            n_iter += 1
            ma3_ = ma.unsqueeze(1)
            mb3_ = mb.unsqueeze(1)
            upd_b = active.view(G, 1, 1) & mb3_
            upd_a = active.view(G, 1, 1) & ma3_
            u_prev = u
            v = torch.where(upd_b, b3 / KTu.clamp_min(tiny), v)
            u = torch.where(upd_a, a3 / mv(v).clamp_min(tiny), u)
            lu = torch.where(ma3_, torch.log(torch.where(ma3_, u, one)), zero).view(G, n)
            lv = torch.where(mb3_, torch.log(torch.where(mb3_, v, one)), zero).view(G, m)
            bad = active & ((lu.abs().amax(-1) > bound) | (lv.abs().amax(-1) > bound))
            if bool(bad.any()):
                idx = bad.nonzero().squeeze(-1)
                c_i, ma_i, mb_i = c[idx], ma[idx], mb[idx]
                ba_i = torch.zeros(ma_i.shape, dtype=dt, device=dev).masked_fill_(~ma_i, -math.inf)
                bb_i = torch.zeros(mb_i.shape, dtype=dt, device=dev).masked_fill_(~mb_i, -math.inf)
                f_i = torch.where(ma_i, f[idx] + eps * torch.log(torch.where(ma_i, u_prev[idx, 0], one)), zero)
                g_i = torch.where(mb_i, eps * (log_b[idx] - _col_lse(c_i, f_i, ba_i, eps)), zero)
                f_i = torch.where(ma_i, eps * (log_a[idx] - _row_lse(c_i, g_i, bb_i, eps)), zero)
                f = f.clone() if not f_nonzero else f
                f_nonzero = True
                f[idx], g[idx] = f_i, g_i
                k_i = _build_kernel_full(f_i, g_i, c_i, None if valid is None else valid[idx], inv_eps,
                                         torch.empty_like(c_i))
                K[idx] = k_i
                if KT is not None:
                    KT[idx] = k_i.transpose(1, 2)
                u[idx] = ma_i.unsqueeze(1).to(dt)
                v[idx] = mb_i.unsqueeze(1).to(dt)
            KTu = mv_t(u)
            prod = v * KTu
            if padded:
                prod = torch.where(mb3_, prod, zero)
            err_now = (prod - b3).abs().sum((-1, -2))
            err = torch.where(active, err_now, err)
            active = active & (err_now > tol)
            n_active = int(active.sum())
            if not n_active:
                break
    if err is None:           # max_iter = 0
        err = torch.full((G,), math.inf, dtype=dt, device=dev)
    if active is None:
        active = torch.full((G,), n_active == G, dtype=torch.bool, device=dev)
    if not padded:
        ma3 = mb3 = None
    if polish:
        u, v = _polish_float64(K, KT, u, v, a3, b3, ma3, mb3, lo, hi)
    if padded:
        f = torch.where(ma, f.to(u.dtype) + eps * torch.log(torch.where(ma3, u, 1.0).squeeze(1)), 0.0)
        g = torch.where(mb, g.to(v.dtype) + eps * torch.log(torch.where(mb3, v, 1.0).squeeze(1)), 0.0)
    else:
        lu = torch.log(u.view(G, n)).mul_(eps)
        f = f.to(u.dtype).add_(lu) if f_nonzero else lu
        g = torch.log(v.view(G, m)).mul_(eps).add_(g)
    if u.dtype != dt:
        u, v = u.to(dt), v.to(dt)
    K.mul_(u.view(G, n, 1)).mul_(v)
    if f.dtype != dt:
        f, g = f.to(dt), g.to(dt)
    return f, g, n_iter, ~active, err


# Convergence (and scaling-range) test interval of small problems, in iterations: the first, and the
# most a rate prediction may ask for.
_CHECK_EVERY = 4
_CHECK_MAX = 32
# The predicted interval aims below tol (at tol * _CHECK_AIM): a prediction aimed at tol itself falls
# one iteration short about half the time, which costs a second test and chunk; the margin also keeps
# the plan error at or below that of solvers that test every 10 iterations (POT).
_CHECK_AIM = 0.25


def _next_chunk(prev_err: float | None, err: float, k: int, tol: float) -> int:
    """Iterations until the next test: the count the linear rate ``(err / prev_err)^(1/k)`` needs to
    bring ``err`` to ``tol * _CHECK_AIM``, within [1, _CHECK_MAX]; _CHECK_EVERY without a usable rate."""
    if prev_err is None or not (0.0 < err < prev_err) or tol <= 0 or not math.isfinite(tol):
        return _CHECK_EVERY
    rate = (err / prev_err) ** (1.0 / k)
    if rate <= 0.0 or rate >= 1.0:
        return _CHECK_EVERY
    target = tol * _CHECK_AIM
    need = math.ceil(math.log(target / err) / math.log(rate)) if err > target else 1
    return max(1, min(_CHECK_MAX, need))


def _build_kernel_full(f_: Tensor, g_: Tensor, c_: Tensor, valid_: Tensor | None, inv_eps: float, out: Tensor
                       ) -> Tensor:
    """``K = exp((f_i + g_j - C_ij) / eps)`` (0 off ``valid_``) into ``out``."""
    torch.sub(g_.unsqueeze(-2), c_, out=out).add_(f_.unsqueeze(-1)).mul_(inv_eps).exp_()
    return out.masked_fill_(~valid_, 0.0) if valid_ is not None else out


def _polish_float64(K: Tensor, KT: Tensor | None, u: Tensor, v: Tensor, a3: Tensor, b3: Tensor,
                    ma3: Tensor | None, mb3: Tensor | None, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """One Sinkhorn iteration with float64 products over the float32 kernel; returns float64 u, v.

    Shapes: K [G, n, m] (KT its transpose or None); u, a3, ma3 [G, 1, n]; v, b3, mb3 [G, 1, m]
    (masks None: nothing padded). A problem whose refined scalings would leave [lo, hi] keeps its
    float32 ones (K would need an absorption first; the refinement is only a rounding correction).
    """
    G, n, m = K.shape
    ud = u.double()
    ad, bd = a3.double(), b3.double()
    if KT is not None and n * m <= 128 * 128:     # tiny: batched, both float64 copies are small
        vd = bd / torch.bmm(ud, K.double())
        if mb3 is not None:
            vd = torch.where(mb3, vd, 0.0)
        ud = ad / torch.bmm(vd, KT.double())
    else:       # one problem at a time through one float64 buffer (stays in cache, no page faults)
        vd = torch.empty(G, 1, m, dtype=torch.float64, device=K.device)
        Kd = torch.empty(n, m, dtype=torch.float64, device=K.device)
        for i in range(G):
            Kd.copy_(K[i])
            torch.mv(Kd.t(), ud[i, 0], out=vd[i, 0])
            torch.div(bd[i, 0], vd[i, 0], out=vd[i, 0])
            if mb3 is not None:
                vd[i] = torch.where(mb3[i], vd[i], 0.0)
            torch.mv(Kd, vd[i, 0], out=ud[i, 0])
            torch.div(ad[i, 0], ud[i, 0], out=ud[i, 0])
    if ma3 is not None:
        ud = torch.where(ma3, ud, 0.0)
        chk = torch.cat([torch.where(ma3, ud, 1.0), torch.where(mb3, vd, 1.0)], -1)
    else:
        chk = torch.cat([ud, vd], -1)
    mn, mx = torch.stack(torch.aminmax(chk)).tolist()
    if lo <= mn and mx <= hi:
        return ud, vd
    mn, mx = torch.aminmax(chk.view(G, -1), dim=-1)
    ok = ((mn >= lo) & (mx <= hi)).view(G, 1, 1)
    return torch.where(ok, ud, u.double()), torch.where(ok, vd, v.double())


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
    def forward(ctx, cost, a, b, plan, f, g, log_a, log_b, mask_a, mask_b, eps, padded=True):
        if ctx is not None:
            ctx.save_for_backward(plan, f, g, log_a, log_b, mask_a, mask_b)
            ctx.eps = eps
        B = plan.shape[0]
        if plan.dtype == torch.float64:
            cost_value = torch.bmm(plan.reshape(B, 1, -1), cost.reshape(B, -1, 1)).reshape(B)
        else:   # a float32 dot of n*m terms drifts ~1e-5; torch's cascade sum stays ~1e-7
            cost_value = (plan * cost).sum((-1, -2))
        if padded:
            ent = _entropy(a, mask_a) + _entropy(b, mask_b)
            reg_value = (f * a).sum(-1) + (g * b).sum(-1) + eps * ent
        else:   # <f - eps log a, a> + <g - eps log b, b>
            reg_value = torch.cat([f, g], -1).sub_(torch.cat([log_a, log_b], -1), alpha=eps).mul_(
                torch.cat([a, b], -1)).sum(-1)
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
        return grad_cost, grad_a, grad_b, None, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public entry point


def resolve_backend(backend: str, cost: Tensor) -> str:
    """The solver ``backend`` names for ``cost`` [B, n, m]: ``"auto"`` is Triton for CUDA tensors, on
    CPU the compiled loop for small kernels when numba is installed
    (:func:`goat_dist.ot.sinkhorn_cpu.preferred`), else the stabilised torch solver."""
    if backend != "auto":
        return backend
    from goat_dist.ot import sinkhorn_cpu

    return "triton" if cost.is_cuda else ("numba" if sinkhorn_cpu.preferred(cost.shape) else "torch")


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
        backend: ``"auto"`` (Triton for CUDA tensors; on CPU the compiled ``"numba"`` loop when numba
            is installed and the problems are small (:func:`goat_dist.ot.sinkhorn_cpu.preferred`), else
            ``"torch"``), ``"torch"`` (the stabilised torch solver), ``"torch_log"``
            (the pure log-domain torch solver), ``"numba"`` (:mod:`goat_dist.ot.sinkhorn_cpu`) or
            ``"triton"``.
        mask_a, mask_b: bool [B, n] / [B, m]; False marks padding.

    Returns:
        :class:`SinkhornResult` with plan [B, n, m], f [B, n], g [B, m], cost_value [B], n_iter,
        converged [B], reg_value [B], err [B].
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if grad not in ("envelope", "unrolled"):
        raise ValueError(f"grad must be 'envelope' or 'unrolled', got {grad!r}")
    if backend not in ("auto", "torch", "torch_log", "triton", "numba"):
        raise ValueError(f"backend must be auto|torch|torch_log|triton|numba, got {backend!r}")
    p = _prepare(cost, a, b, mask_a, mask_b)
    c_chk = p.cost.detach() if p.cost.requires_grad else p.cost
    if c_chk.numel() and not all(math.isfinite(x) for x in torch.stack(torch.aminmax(c_chk)).tolist()):
        raise ValueError("cost contains NaN or Inf")     # one pass: aminmax propagates NaN
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
        needs_grad = p.cost.requires_grad or p.a.requires_grad or p.b.requires_grad
        pd = p if not needs_grad else _Prepared(p.cost.detach(), p.a.detach(), p.b.detach(), p.log_a.detach(),
                                                p.log_b.detach(), p.mask_a, p.mask_b, p.squeeze, p.padded)
        use = resolve_backend(backend, pd.cost)
        plan = None
        if use == "triton":
            from goat_dist.ot.sinkhorn_triton import solve_triton

            f, g, n_iter, converged, err = solve_triton(pd, eps, max_iter, tol_run, levels)
        elif use == "torch_log":
            f, g, n_iter, converged, err = _solve_log(pd, eps, max_iter, tol_run, levels)
        elif use == "numba":
            from goat_dist.ot.sinkhorn_cpu import solve_numba

            f, g, n_iter, converged, err, plan = solve_numba(pd, eps, max_iter, tol_run, levels)
        else:
            f, g, n_iter, converged, err, plan = _solve_stabilized(pd, eps, max_iter, tol_run, levels)
        if fixed:
            converged = err <= 0
        if plan is None:
            plan = _plan(pd.cost, f, g, pd.mask_a, pd.mask_b, eps)
    if needs_grad:
        cost_value, reg_value = _EnvelopeValues.apply(p.cost, p.a, p.b, plan, f, g, pd.log_a, pd.log_b,
                                                      p.mask_a, p.mask_b, eps, p.padded)
    else:       # same values without the autograd.Function overhead
        cost_value, reg_value = _EnvelopeValues.forward(None, p.cost, p.a, p.b, plan, f, g, pd.log_a, pd.log_b,
                                                        p.mask_a, p.mask_b, eps, p.padded)
    if log.isEnabledFor(logging.DEBUG) and not bool(converged.all()):
        log.debug("sinkhorn: %d of %d problems did not reach tol=%g in %d iterations",
                  int((~converged).sum()), converged.numel(), tol, n_iter)
    return SinkhornResult(plan, f, g, cost_value, n_iter, converged, reg_value, err)
