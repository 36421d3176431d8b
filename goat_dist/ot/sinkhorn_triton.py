"""Triton kernels for batched log-domain Sinkhorn (the CUDA path of :func:`goat_dist.ot.sinkhorn`).

Same problem, order of updates, stopping rule and outputs as the torch solvers::

    g_j = eps * log b_j - eps * LSE_i((f_i - C_ij) / eps)        (column half-iteration)
    f_i = eps * log a_i - eps * LSE_j((g_j - C_ij) / eps)        (row half-iteration)
    err = sum_j |exp(g_j / eps + LSE_i((f_i - C_ij) / eps)) - b_j|   (column marginal of (f, g))

Two kernels:

- ``_half_step_kernel``: one half-iteration for all problems in one launch, grid
  (problem, row-tile). Each program owns BLOCK_R output entries and streams over the other axis in
  BLOCK_K tiles with an online (running max, rescaled sum) log-sum-exp, so the cost is read exactly
  once per half-iteration and nothing of size [n, m] is written. The column half-iteration uses the
  same kernel on the transposed strides. It also writes the marginal residual of the entries it
  updates (the convergence test comes for free). Problems that met ``tol`` are skipped.
- ``_fused_kernel``: for small problems (n, m <= 256) all iterations in ONE launch, one program per
  problem (problems spread over the multiprocessors); the potentials live in global scratch (L1/L2
  resident at this size) with barriers between half-iterations, and the loop exits per problem when
  its error is <= tol.

Accumulation is float32 (float64 for float64 input). ``TRITON_INTERPRET=1`` runs both on CPU tensors
(the tests do); ``backend="auto"`` only picks Triton for CUDA tensors.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # triton is a declared dependency, but keep the torch path importable without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["solve_triton", "FUSED_MAX_SIZE"]

FUSED_MAX_SIZE = 256

if triton is not None:

    @triton.jit
    def _lse_update_tile(c_base, pin_base, lwo_base, lw_base, pold_base, r0, R, K, s_r, s_k, eps, inv_eps,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
        """For rows r0..r0+BLOCK_R: new = eps * (lw - LSE_k((pin_k - C_rk) / eps)) over unmasked k,
        and the residual |exp(pold / eps + LSE) - exp(lw)| (the marginal error of the old potential)."""
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < R
        m_run = tl.full([BLOCK_R], float("-inf"), ACC)
        s_run = tl.zeros([BLOCK_R], ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            pin = tl.load(pin_base + ks, mask=kmask, other=0.0).to(ACC)
            lwo = tl.load(lwo_base + ks, mask=kmask, other=float("-inf")).to(ACC)
            bias = tl.where(lwo == float("-inf"), float("-inf"), 0.0).to(ACC)
            c = tl.load(c_base + rows[:, None] * s_r + ks[None, :] * s_k, mask=rmask[:, None] & kmask[None, :],
                        other=0.0).to(ACC)
            z = (pin[None, :] - c) * inv_eps + bias[None, :]
            m_new = tl.maximum(m_run, tl.max(z, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
            s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), 1)
            m_run = m_new
        m_fin = tl.where(m_run == float("-inf"), 0.0, m_run).to(ACC)
        lse = m_fin + tl.log(s_run)
        lw = tl.load(lw_base + rows, mask=rmask, other=float("-inf")).to(ACC)
        valid = rmask & (lw != float("-inf")) & (s_run > 0)
        new = tl.where(valid, eps * (lw - lse), 0.0).to(ACC)
        pold = tl.load(pold_base + rows, mask=rmask, other=0.0).to(ACC)
        marg = tl.exp(tl.where(valid, pold * inv_eps + lse, float("-inf")))
        res = tl.where(rmask, tl.abs(marg - tl.exp(lw)), 0.0).to(ACC)
        return rows, rmask, new, res

    @triton.jit
    def _half_step_kernel(c_ptr, pin_ptr, lwo_ptr, lw_ptr, pold_ptr, out_ptr, res_ptr, active_ptr,
                          R, K, s_b, s_r, s_k, eps, inv_eps,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
        """Grid (B, cdiv(R, BLOCK_R)): one half-iteration over the R 'rows' (rows of C for the f update,
        columns of C via swapped strides for the g update)."""
        b = tl.program_id(0)
        t = tl.program_id(1)
        act = tl.load(active_ptr + b)
        if act != 0:
            rows, rmask, new, res = _lse_update_tile(
                c_ptr + b * s_b, pin_ptr + b * K, lwo_ptr + b * K, lw_ptr + b * R, pold_ptr + b * R,
                t * BLOCK_R, R, K, s_r, s_k, eps, inv_eps, BLOCK_R, BLOCK_K, ACC)
            tl.store(out_ptr + b * R + rows, new, mask=rmask)
            tl.store(res_ptr + b * R + rows, res, mask=rmask)

    @triton.jit
    def _fused_kernel(c_ptr, f_ptr, g_ptr, gnew_ptr, la_ptr, lb_ptr, err_ptr, iter_ptr,
                      n, m, s_b, s_n, s_m, max_iter, tol, eps, inv_eps,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
        """Grid (B,): all Sinkhorn iterations of one problem in one program."""
        b = tl.program_id(0)
        c_base = c_ptr + b * s_b
        f_base = f_ptr + b * n
        g_base = g_ptr + b * m
        gn_base = gnew_ptr + b * m
        la_base = la_ptr + b * n
        lb_base = lb_ptr + b * m
        it = 0
        done = 0
        err = tl.sum(tl.zeros([BLOCK_R], ACC), 0)
        while done == 0:
            # column half-iteration: g_new = G(f), residual of (f, g_old)
            err_acc = tl.zeros([BLOCK_R], ACC)
            for r0 in range(0, m, BLOCK_R):
                rows, rmask, new, res = _lse_update_tile(c_base, f_base, la_base, lb_base, g_base, r0, m, n,
                                                         s_m, s_n, eps, inv_eps, BLOCK_R, BLOCK_K, ACC)
                tl.store(gn_base + rows, new, mask=rmask)
                err_acc += res
            err = tl.sum(err_acc, 0)
            tl.debug_barrier()
            if ((it > 0) & (err <= tol)) | (it >= max_iter):
                done = 1
            else:
                for r0 in range(0, m, BLOCK_R):
                    rows = r0 + tl.arange(0, BLOCK_R)
                    rmask = rows < m
                    tl.store(g_base + rows, tl.load(gn_base + rows, mask=rmask), mask=rmask)
                tl.debug_barrier()
                # row half-iteration: f = F(g)
                for r0 in range(0, n, BLOCK_R):
                    rows, rmask, new, res = _lse_update_tile(c_base, g_base, lb_base, la_base, f_base, r0, n, m,
                                                             s_n, s_m, eps, inv_eps, BLOCK_R, BLOCK_K, ACC)
                    tl.debug_barrier()
                    tl.store(f_base + rows, new, mask=rmask)
                tl.debug_barrier()
                it += 1
        tl.store(err_ptr + b, err)
        tl.store(iter_ptr + b, it)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _half_step(cost: Tensor, pin: Tensor, lw_other: Tensor, lw: Tensor, pold: Tensor, active: Tensor, eps: float,
               rows_are_columns: bool, block_r: int = 32, block_k: int = 64) -> tuple[Tensor, Tensor]:
    """One half-iteration for all problems: returns (new potential [B, R], marginal residual [B, R])."""
    B, n, m = cost.shape
    if rows_are_columns:
        R, K, s_r, s_k = m, n, cost.stride(2), cost.stride(1)
    else:
        R, K, s_r, s_k = n, m, cost.stride(1), cost.stride(2)
    out = pold.clone()
    res = torch.zeros_like(pold)
    grid = (B, triton.cdiv(R, block_r))
    _half_step_kernel[grid](cost, pin, lw_other, lw, pold, out, res, active, R, K, cost.stride(0), s_r, s_k,
                            eps, 1.0 / eps, BLOCK_R=block_r, BLOCK_K=block_k, ACC=_acc(cost.dtype))
    return out, res


def solve_triton(p, eps: float, max_iter: int, tol: float, levels: list[float], fused: bool | None = None
                 ) -> tuple[Tensor, Tensor, int, Tensor, Tensor]:
    """Triton solver on a prepared problem (see ``sinkhorn._prepare``); returns f, g, n_iter, converged, err.

    ``fused``: None = single-launch kernel when n, m <= FUSED_MAX_SIZE, else one launch per
    half-iteration; True/False force the choice (tests exercise both).
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("backend='triton' needs the triton package")
    import os

    cost = p.cost
    if not cost.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing)")
    cost = cost.contiguous()
    B, n, m = cost.shape
    dt = cost.dtype
    la, lb = p.log_a.contiguous(), p.log_b.contiguous()
    f = torch.zeros(B, n, dtype=dt, device=cost.device)
    g = torch.zeros(B, m, dtype=dt, device=cost.device)
    all_on = torch.ones(B, dtype=torch.int32, device=cost.device)
    for e in levels:
        g, _ = _half_step(cost, f, la, lb, g, all_on, e, rows_are_columns=True)
        f, _ = _half_step(cost, g, lb, la, f, all_on, e, rows_are_columns=False)
    n_levels = len(levels)
    if fused is None:
        fused = max(n, m) <= FUSED_MAX_SIZE
    tol_k = tol if math.isfinite(tol) else -1.0
    if fused:
        gnew = torch.empty_like(g)
        err = torch.empty(B, dtype=dt, device=cost.device)
        iters = torch.empty(B, dtype=torch.int32, device=cost.device)
        block_r = 16
        block_k = max(16, triton.next_power_of_2(max(n, m)))
        _fused_kernel[(B,)](cost, f, g, gnew, la, lb, err, iters, n, m, cost.stride(0), cost.stride(1),
                            cost.stride(2), max_iter, tol_k, eps, 1.0 / eps, BLOCK_R=block_r, BLOCK_K=block_k,
                            ACC=_acc(dt), num_warps=4)
        return f, g, n_levels + int(iters.max()), err <= tol, err
    active = torch.ones(B, dtype=torch.int32, device=cost.device)
    err = torch.full((B,), math.inf, dtype=dt, device=cost.device)
    n_iter = 0
    while True:
        g_new, res = _half_step(cost, f, la, lb, g, active, eps, rows_are_columns=True)
        err = torch.where(active.bool(), res.sum(-1), err)
        if n_iter > 0:
            active = active & ~(err <= tol).to(torch.int32)
        if n_iter >= max_iter or not bool(active.any()):
            break
        g = torch.where(active.bool().unsqueeze(-1), g_new, g)
        f, _ = _half_step(cost, g, lb, la, f, active, eps, rows_are_columns=False)
        n_iter += 1
    return f, g, n_levels + n_iter, err <= tol, err
