"""Compiled CPU Sinkhorn: the stabilised kernel-space iterations of a whole batch in one numba call.

Why: on the CPU the OAT training shape (B = 2..4 problems of d x d, d <= 256) is bound by per-op
overhead in torch (~5 us per op; two products, two divisions per iteration plus periodic tests), not by
arithmetic (a 64 x 64 matrix-vector product is 4k multiply-adds). Here the iteration loop of every
problem -- both updates, the convergence test after EVERY iteration and the scaling range check -- runs
inside one compiled call; torch does the vectorised parts around it (the c-transform and ``exp`` that
build K, the potentials and the plan at the end), a fixed number of ops independent of the iterations.

Algorithm: the updates of :func:`goat_dist.ot.sinkhorn._solve_stabilized` (same start, same order):
``K = exp((f_i + g0_j - C_ij) / eps)`` with ``g0`` the c-transform of f (every column's largest entry
is 1); ``v = b / K^T u``, ``u = a / K v``; after each iteration the L1 column-marginal error
``sum_j |v_j (K^T u)_j - b_j|``; a problem stops at the first iteration with ``err <= tol``. Every
sum is accumulated in float64, also for float32 kernels (no separate refinement iteration needed). Both
products stream over contiguous rows (``K`` for ``K^T u``, a transposed copy for ``K v``) so that the
loops vectorise without reassociating any sum (no fastmath: results are deterministic); divisions
follow IEEE rules (x / 0 = inf, caught by the range check) rather than raising.

A problem whose scalings leave ``[lo, hi]`` (the stabilised solver's absorption bound; an underflowed
``K v`` gives inf, caught the same way) stops with status ``NEEDS_LOG``; the caller re-solves it with
the torch stabilised solver, which absorbs the scalings into the potentials in the log domain. Masked
rows/columns (padding, zero mass) keep zero scalings and are excluded from the range check and the error.

numba is optional: :func:`available` says whether it imports; ``sinkhorn(backend="auto")`` uses this
path on CPU tensors when it does (``backend="numba"`` requires it).
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:     # optional dependency: the torch solvers remain
    numba = None

CONVERGED, NOT_CONVERGED, NEEDS_LOG = 0, 1, 2
# Iterate past tol down to tol * TARGET, then one iteration more (or stop at max_iter): a solver that
# stops exactly at tol leaves a plan several times less accurate than one that tests every 10
# iterations (POT), which usually overshoots; the torch stabilised solver aims at the same margin
# (``_CHECK_AIM``) and adds a float64 refinement iteration. ``converged`` still means err <= tol.
TARGET = 0.25


# Problems up to this many kernel entries take the compiled path under backend="auto": above it the
# BLAS matrix-vector products of the torch solver win (measured, 1 thread, float32, B = 4: d = 64
# 0.44 vs 0.72 ms, d = 256 2.3 vs 2.6 ms, d = 1,024 86 vs 43 ms).
MAX_AUTO_ENTRIES = 256 * 256


def available() -> bool:
    """True when numba imports (the compiled path can run)."""
    return numba is not None


def preferred(shape) -> bool:
    """Whether ``backend="auto"`` should solve CPU problems of ``shape`` [B, n, m] here."""
    return numba is not None and shape[-1] * shape[-2] <= MAX_AUTO_ENTRIES


def _vec_mat_py(x, M, out):
    """``out = x @ M`` for a row-major 2-D ``M``, streaming over its rows (vectorises without
    reassociating any sum); float64 ``out``."""
    out[:] = 0.0
    for r in range(M.shape[0]):
        xr = x[r]
        for c in range(M.shape[1]):
            out[c] += xr * M[r, c]


_vec_mat = numba.njit(cache=True)(_vec_mat_py) if numba is not None else None


def _iterate_batch_py(K, a, b, ma, mb, f, g, eps, max_iter, tol, target, lo, hi, n_iter, err, status):
    """Sinkhorn iterations of every problem of a batch (compiled by numba; see the module docstring).

    In: K [B, n, m] the kernels (overwritten with the plans ``u_i K_ij v_j``); a, ma [B, n]; b, mb
    [B, m]; f [B, n], g [B, m] (K's dtype) the potentials K was built from (overwritten with
    ``f + eps log u``, ``g + eps log v``; 0 where masked). Out: n_iter [B] int64, err [B] float64,
    status [B] int64 (CONVERGED: err <= tol; NEEDS_LOG: K, f, g left as they came in). A problem
    iterates until one iteration after ``err <= target`` (<= tol) or ``max_iter``.
    """
    B, n, m = K.shape
    ktu = np.empty(m, np.float64)
    kv = np.empty(n, np.float64)
    u = np.empty(n, np.float64)
    v = np.empty(m, np.float64)
    KT = np.empty((m, n), K.dtype)
    for p in range(B):
        for i in range(n):
            for j in range(m):
                KT[j, i] = K[p, i, j]
        for i in range(n):
            u[i] = 1.0 if ma[p, i] else 0.0
        for j in range(m):
            v[j] = 1.0 if mb[p, j] else 0.0
        _vec_mat(u, K[p], ktu)
        it = 0
        e = np.inf
        st = NOT_CONVERGED
        extra = False
        while it < max_iter:
            for j in range(m):
                v[j] = b[p, j] / ktu[j] if mb[p, j] else 0.0
            _vec_mat(v, KT, kv)             # K v
            for i in range(n):
                u[i] = a[p, i] / kv[i] if ma[p, i] else 0.0
            _vec_mat(u, K[p], ktu)          # K^T u
            it += 1
            ok = True
            for i in range(n):
                if ma[p, i] and not (lo <= u[i] <= hi):    # False for NaN
                    ok = False
            for j in range(m):
                if mb[p, j] and not (lo <= v[j] <= hi):
                    ok = False
            if not ok:
                st = NEEDS_LOG
                break
            e = 0.0
            for j in range(m):
                if mb[p, j]:
                    e += abs(v[j] * ktu[j] - b[p, j])
            if e <= target:
                if extra:
                    break
                extra = True    # one more iteration past the target (see TARGET)
        n_iter[p] = it
        err[p] = e
        if st == NEEDS_LOG:
            status[p] = st
            continue
        status[p] = CONVERGED if e <= tol else NOT_CONVERGED
        for i in range(n):
            f[p, i] = f[p, i] + eps * math.log(u[i]) if ma[p, i] else 0.0
            ui = u[i]
            for j in range(m):
                K[p, i, j] = ui * K[p, i, j] * v[j]
        for j in range(m):
            g[p, j] = g[p, j] + eps * math.log(v[j]) if mb[p, j] else 0.0


_iterate_batch = numba.njit(cache=True, error_model="numpy")(_iterate_batch_py) if numba is not None else None


def solve_numba(p, eps: float, max_iter: int, tol: float, levels: list[float]
                ) -> tuple[Tensor, Tensor, int, Tensor, Tensor, Tensor]:
    """The compiled solve of a prepared batch ``p`` (``goat_dist.ot.sinkhorn._Prepared``, CPU, no
    autograd); same contract as ``_solve_stabilized``: returns f, g, n_iter, converged, err, plan."""
    sk = importlib.import_module("goat_dist.ot.sinkhorn")   # the module (the package exports the function)

    if numba is None:
        raise RuntimeError("backend='numba' needs the numba package (pip install numba); "
                           "use backend='torch' without it")
    cost, ma, mb = p.cost, p.mask_a, p.mask_b
    if cost.device.type != "cpu":
        raise ValueError(f"backend='numba' runs on CPU tensors, got a cost on {cost.device}")
    B, n, m = cost.shape
    dt = cost.dtype
    f = sk._eps_scaling_phase(p, levels)      # the same start as the torch stabilised solver
    valid = ma.unsqueeze(-1) & mb.unsqueeze(-2) if p.padded else None
    K = torch.empty(B, n, m, dtype=dt)
    g = sk._c_transform_kernel(cost, f, bool(levels), mb, valid, 1.0 / eps, K)
    n_it = np.empty(B, np.int64)
    err = np.empty(B, np.float64)
    status = np.empty(B, np.int64)
    bound = sk._scaling_bound(dt)
    f, g = f.contiguous(), g.contiguous()   # our own tensors (fresh zeros / amin results): overwritten
    arr = lambda t: np.ascontiguousarray(t.numpy())  # noqa: E731  (one compiled signature per dtype)
    _iterate_batch(K.numpy(), arr(p.a), arr(p.b), arr(ma), arr(mb), f.numpy(), g.numpy(), float(eps),
                   int(max_iter), float(tol), float(tol) * TARGET, math.exp(-bound), math.exp(bound), n_it, err,
                   status)
    plan = K
    converged = torch.from_numpy(status == CONVERGED)
    err_t = torch.from_numpy(err).to(dt)
    n_iter = int(n_it.max()) if B else 0
    if (status == NEEDS_LOG).any():    # scalings out of range: the torch stabilised solver absorbs them
        redo = torch.from_numpy(np.flatnonzero(status == NEEDS_LOG))
        sub = sk._Prepared(cost[redo], p.a[redo], p.b[redo], p.log_a[redo], p.log_b[redo], ma[redo], mb[redo],
                           p.squeeze, p.padded)
        f_r, g_r, it_r, conv_r, err_r, plan_r = sk._solve_stabilized(sub, eps, max_iter, tol, levels)
        f[redo], g[redo], converged[redo], err_t[redo], plan[redo] = f_r, g_r, conv_r, err_r, plan_r
        n_iter = max(n_iter, it_r - len(levels))
    return f, g, len(levels) + n_iter, converged, err_t, plan
