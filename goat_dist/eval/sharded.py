"""Distributed full-ranking evaluation over user-sharded representations.

Each rank holds the representations of the eval users in its user block (``RowShard``, from
``RecGOAT.compute_all_representations(..., user_ids=users, shard=...)``) and the full item table.
The metrics must be bit-identical to single-process ``metric_sums`` over the same users, so:

- the eval batches are the single-process batches ``users[s:s + batch_size]`` (a per-batch metric sum
  depends on the batch's composition: the [b, n_items] GEMM and the float sums);
- batch i is scored by the rank owning its first user; the few rows of a batch that straddles a
  block boundary are sent to that rank (at most ``batch_size - 1`` rows per boundary);
- the per-batch sums are gathered and accumulated in the single-process batch order.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from goat_dist.eval.metrics import METRICS, finalize, metric_sums
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger
from goat_dist.model.lightgcn import RowShard

log = get_logger(__name__)


def process_group_shard(group=None) -> RowShard:
    """The ``RowShard`` of this process in ``group`` (default group), gathering with
    ``all_gather_into_tensor``."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return RowShard(rank, world, lambda out, block: dist.all_gather_into_tensor(out, block, group=group))


def sharded_metrics(user_reps: Tensor, users: Tensor, item_reps: Tensor, heldout: CSR, exclude: Iterable[CSR],
                    ks: list[int], batch_size: int, shard: RowShard, n_users: int, chunk_size: int,
                    group=None) -> dict[str, float]:
    """Averaged metrics of ``users`` (sorted, each with >= 1 held-out item), equal bit for bit to
    ``finalize(metric_sums(score, users, ...))`` on one process. Collective.

    Args:
        user_reps: representations of ``users`` that lie in this rank's user block, in order.
        users: ALL eval users (the same on every rank), sorted ascending.
        item_reps: the full item table.
        shard, n_users, chunk_size: the user partition ``user_reps`` was computed with.

    **Shapes:** user_reps [n_own, d], users [U], item_reps [n_items, d].
    """
    users = users.to(torch.int64)
    if users.numel() > 1 and not bool((users[1:] > users[:-1]).all()):
        raise ValueError("sharded_metrics: eval users must be sorted and unique")
    exclude = list(exclude)
    rank, W = shard.rank, shard.world_size
    owner = shard.owner(users, n_users, chunk_size)
    mine = owner == rank
    if int(mine.sum()) != user_reps.shape[0]:
        raise ValueError(f"sharded_metrics: rank {rank} holds {user_reps.shape[0]} user rows, "
                         f"its block has {int(mine.sum())} eval users")
    starts = list(range(0, users.numel(), batch_size))
    batch_owner = owner[::batch_size] if users.numel() else owner
    pos_owner = batch_owner.repeat_interleave(batch_size)[:users.numel()]  # scorer of each position
    own_ids, own_rows = users[mine], user_reps
    if W > 1:
        lend = mine & (pos_owner != rank)
        k = lend[mine]
        parcel = (users[lend], pos_owner[lend], own_rows[k].cpu())
        parcels: list = [None] * W
        dist.all_gather_object(parcels, parcel, group=group)
        got = [(ids[to == rank], rows[to == rank]) for ids, to, rows in parcels if ids.numel()]
        if got:
            own_ids = torch.cat([own_ids] + [g[0] for g in got])
            own_rows = torch.cat([own_rows] + [g[1].to(own_rows.device, own_rows.dtype) for g in got])
            order = torch.argsort(own_ids)
            own_ids, own_rows = own_ids[order], own_rows[order]
    item_t = item_reps.t().contiguous()

    def score(ub: Tensor) -> Tensor:
        return own_rows[torch.searchsorted(own_ids, ub.to(own_ids.device))] @ item_t

    done = [(i, metric_sums(score, users[s:s + batch_size], heldout, exclude, ks, batch_size))
            for i, s in enumerate(starts) if int(batch_owner[i]) == rank]
    log.debug("sharded eval rank %d/%d: %d user rows held, %d of %d batches scored", rank, W, own_ids.numel(),
              len(done), len(starts))
    if W > 1:
        gathered: list = [None] * W
        dist.all_gather_object(gathered, done, group=group)
        done = [x for part in gathered for x in part]
    per_batch = dict(done)
    sums = {f"{m}@{k}": 0.0 for m in METRICS for k in ks}
    for i in range(len(starts)):  # the single-process accumulation order
        for key, v in per_batch[i].items():
            if key != "n_users":
                sums[key] += v
    sums["n_users"] = float(users.numel())
    return finalize(sums)
