"""InfoNCE between two aligned views, with negatives from the GLOBAL (all-gathered) batch.

For L2-normalised rows ``a_i``, ``b_i`` (row i of one view matches row i of the other) over the
global batch of N rows (all ranks' rows concatenated in rank order) and temperature tau:

    l_{a->b}(i) = -s_ii / tau + log sum_{j in N(i)} exp(s_ij / tau),       s_ij = <a_i, b_j>
    L = 1/N sum_i l_{a->b}(i)                                   (symmetric=False)
    L = 1/(2N) sum_i (l_{a->b}(i) + l_{b->a}(i))                (symmetric=True, CLIP-style)

``N(i)`` is every column j except FALSE NEGATIVES: columns j != i whose id equals the id of i's
positive column (``ids_b[j] == ids_b[i]`` for a->b, ``ids_a[j] == ids_a[i]`` for b->a), e.g. the same
item appearing twice in the global batch. This is what a single process computes on the
concatenated batch; the distributed path must equal it (value and gradients).

Design choices:
- ``rank``/``world_size``/``group`` are constructor arguments (OpenCLIP style); nothing reads global
  state. World size 1 never touches torch.distributed.
- The all-gather is a custom autograd Function (forward all_gather, backward all_reduce(SUM) then the
  own slice), so it works on gloo (no reduce_scatter there) as well as NCCL. Uneven per-rank sizes
  are handled by gathering the sizes first, padding to the largest and stripping the padding.
- Gradient convention ("shares"): each rank's returned loss has the VALUE of the global loss L (the
  same number on every rank, convenient for logging and parity tests) but the GRADIENT of this rank's
  share L_r, with sum_r L_r = L. Because the gather's backward sums over ranks, the gradient that
  reaches rank r's inputs is exactly dL/dx_r, and summing parameter gradients over ranks gives dL/dθ.
  (An averaging reducer such as DDP/DeepSpeed must therefore be compensated by multiplying the loss by
  world_size.) ``local_loss=True``: L_r = the rows owned by rank r (local rows against global
  columns, O(n_r N) work); ``local_loss=False``: every rank computes all N rows and L_r = L / W.
- Chunked log-sum-exp: with ``chunk_size`` the rows are processed in chunks under activation
  checkpointing, so peak memory is O(chunk_size * N) instead of O(n * N) — linear in the global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class _AllGatherPadded(torch.autograd.Function):
    """[n_max, ...] on every rank -> [W, n_max, ...]; backward sums the gradient over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int, group) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(out, x, group=group)
        ctx.rank, ctx.group = rank, group
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None, None, None


def gather_sizes(n: int, world_size: int, device: torch.device, group=None) -> list[int]:
    """Every rank's row count (one all_gather of a scalar)."""
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(out, t, group=group)
    return [int(v.item()) for v in out]


def all_gather_rows(x: Tensor, sizes: list[int], rank: int, world_size: int, group=None) -> Tensor:
    """Concatenate every rank's [n_r, ...] rows in rank order -> [sum n_r, ...].

    Differentiable when ``x`` requires grad: the gradient of the gathered rows flows back to the rank
    that owns them (summed over every rank's use of them).
    """
    n_max = max(sizes)
    pad = torch.zeros((n_max - x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded = torch.cat([x, pad]) if pad.shape[0] else x
    if x.requires_grad:
        stacked = _AllGatherPadded.apply(padded, rank, world_size, group)
    else:
        out = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(out, padded.contiguous(), group=group)
        stacked = torch.stack(out)
    return torch.cat([stacked[r, :sizes[r]] for r in range(world_size)])


def global_value_local_grad(share: Tensor, world_size: int, group=None) -> Tensor:
    """A tensor whose value is ``sum_r share_r`` (all-reduced) and whose gradient is ``share``'s."""
    if world_size == 1:
        return share
    total = share.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return share + (total - share.detach())


def _rows_loss(anchors: Tensor, cols: Tensor, pos_idx: Tensor, col_ids: Tensor | None, inv_tau: float) -> Tensor:
    """Per-row ``-s_ii/tau + LSE_{j in N(i)} s_ij/tau`` for a block of anchor rows.

    **Shapes:** anchors [r, d], cols [N, d], pos_idx [r] (column of each row's positive),
    col_ids [N] or None -> [r].
    """
    logits = anchors @ cols.t() * inv_tau                                   # [r, N]
    if col_ids is not None:
        pos_ids = col_ids[pos_idx]
        false_neg = col_ids.unsqueeze(0) == pos_ids.unsqueeze(1)           # [r, N]
        false_neg[torch.arange(pos_idx.numel(), device=pos_idx.device), pos_idx] = False
        logits = logits.masked_fill(false_neg, float("-inf"))
    pos = logits.gather(1, pos_idx.unsqueeze(1)).squeeze(1)
    return torch.logsumexp(logits, dim=1) - pos


class InfoNCE(nn.Module):
    """Distributed InfoNCE (see the module docstring for the maths and the gradient convention).

    ``forward(a, b, ids_a=None, ids_b=None)``: ``a``, ``b`` [n, d] this rank's rows (any norm; they
    are L2-normalised here), ``ids_a``/``ids_b`` [n] int64 optional ids for false-negative masking.
    Returns a scalar: the global-batch loss (value), with this rank's share as gradient.

    **Shapes:** a [n, d], b [n, d], ids [n] -> scalar. ``n`` may differ between ranks (even 0).
    """

    def __init__(self, temperature: float = 0.2, rank: int = 0, world_size: int = 1, local_loss: bool = True,
                 chunk_size: int | None = None, symmetric: bool = True, group=None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.temperature, self.rank, self.world_size = float(temperature), int(rank), int(world_size)
        self.local_loss, self.symmetric, self.group = bool(local_loss), bool(symmetric), group
        self.chunk_size = int(chunk_size) if chunk_size else None

    def _direction(self, anchors: Tensor, cols: Tensor, pos_idx: Tensor, col_ids: Tensor | None) -> Tensor:
        """Sum over anchor rows of the per-row loss, chunked (and checkpointed) when asked."""
        inv_tau = 1.0 / self.temperature
        n = anchors.shape[0]
        c = self.chunk_size or n
        if n == 0:
            return anchors.sum() * 0.0 + cols.sum() * 0.0
        if c >= n:
            return _rows_loss(anchors, cols, pos_idx, col_ids, inv_tau).sum()
        total = anchors.new_zeros(())
        for s in range(0, n, c):
            part = slice(s, min(s + c, n))
            if torch.is_grad_enabled() and (anchors.requires_grad or cols.requires_grad):
                rows = checkpoint(_rows_loss, anchors[part], cols, pos_idx[part], col_ids, inv_tau,
                                  use_reentrant=False)
            else:
                rows = _rows_loss(anchors[part], cols, pos_idx[part], col_ids, inv_tau)
            total = total + rows.sum()
        return total

    def forward(self, a: Tensor, b: Tensor, ids_a: Tensor | None = None, ids_b: Tensor | None = None) -> Tensor:
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"views must both be [n, d], got {tuple(a.shape)} and {tuple(b.shape)}")
        for name, ids in (("ids_a", ids_a), ("ids_b", ids_b)):
            if ids is not None and ids.shape != (a.shape[0],):
                raise ValueError(f"{name} must be [{a.shape[0]}], got {tuple(ids.shape)}")
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        n = a.shape[0]
        if self.world_size == 1:
            sizes, offset = [n], 0
            ga, gb, gia, gib = a, b, ids_a, ids_b
        else:
            sizes = gather_sizes(n, self.world_size, a.device, self.group)
            offset = sum(sizes[:self.rank])
            gather = lambda t: None if t is None else all_gather_rows(  # noqa: E731
                t, sizes, self.rank, self.world_size, self.group)
            ga, gb, gia, gib = gather(a), gather(b), gather(ids_a), gather(ids_b)
        n_global = sum(sizes)
        if n_global == 0:
            return a.sum() * 0.0 + b.sum() * 0.0
        if self.local_loss:
            rows_a, rows_b = a, b
            pos_idx = torch.arange(offset, offset + n, device=a.device)
        else:
            rows_a, rows_b = ga, gb
            pos_idx = torch.arange(n_global, device=a.device)
        share = self._direction(rows_a, gb, pos_idx, gib)
        if self.symmetric:
            share = 0.5 * (share + self._direction(rows_b, ga, pos_idx, gia))
        share = share / n_global
        if not self.local_loss:
            share = share / self.world_size
        return global_value_local_grad(share, self.world_size, self.group)
