"""Dataset statistics that the loader and ``goat data validate`` report: duplicates, cold users and
items, degrees. Pure functions of id arrays; memory stays bounded for 200M-interaction splits.
"""
from __future__ import annotations

import numpy as np

from goat_dist.data.dataset import RecDataset

_DUP_BLOCK = 1 << 24


def count_duplicates(users: np.ndarray, items: np.ndarray, n_items: int) -> int:
    """Number of (user, item) pairs that repeat an earlier pair (kept, not dropped).

    Keys ``user * n_items + item`` are sorted and equal neighbours counted. When ``users`` is already
    grouped (non-decreasing, as adjacency files are) the sort runs per block of whole users, so the
    extra memory is one block, not the split. **Shapes:** ``users``/``items`` [E]."""
    n = users.shape[0]
    if n < 2:
        return 0
    grouped = bool(np.all(users[1:] >= users[:-1]))
    if not grouped:
        keys = users.astype(np.int64) * n_items + items
        keys.sort()
        return int(np.count_nonzero(keys[1:] == keys[:-1]))
    total = 0
    lo = 0
    while lo < n:
        hi = min(n, lo + _DUP_BLOCK)
        if hi < n:  # extend to the end of the current user's run
            hi = int(np.searchsorted(users, users[hi - 1], side="right"))
        keys = users[lo:hi].astype(np.int64) * n_items + items[lo:hi]
        keys.sort()
        total += int(np.count_nonzero(keys[1:] == keys[:-1]))
        lo = hi
    return total


def degree_summary(counts: np.ndarray) -> dict:
    """min / median / mean / max of a degree vector (all entries, zeros included)."""
    if counts.shape[0] == 0:
        return {"min": 0, "median": 0.0, "mean": 0.0, "max": 0}
    return {"min": int(counts.min()), "median": float(np.median(counts)), "mean": round(float(counts.mean()), 3),
            "max": int(counts.max())}


def dataset_stats(ds: RecDataset) -> dict:
    """The statistics ``goat data validate`` prints.

    Cold users: no train interaction but at least one valid/test interaction (same for cold items).
    ``users_without_interactions``: ids in range that appear in no split (e.g. feature rows only)."""
    train_u = np.bincount(ds.train.users, minlength=ds.n_users) if len(ds.train) else np.zeros(ds.n_users, np.int64)
    train_i = np.bincount(ds.train.items, minlength=ds.n_items) if len(ds.train) else np.zeros(ds.n_items, np.int64)
    any_u = train_u > 0
    any_i = train_i > 0
    eval_u = np.zeros(ds.n_users, dtype=bool)
    eval_i = np.zeros(ds.n_items, dtype=bool)
    for split in ("valid", "test"):
        inter = ds.splits.get(split)
        if inter is not None and len(inter):
            eval_u[inter.users] = True
            eval_i[inter.items] = True
    stats = {
        "source": ds.source,
        "users": ds.n_users,
        "items": ds.n_items,
        "interactions": {s: len(v) for s, v in ds.splits.items()},
        "duplicates": dict(ds.duplicates),
        "cold_users": int((eval_u & ~any_u).sum()),
        "cold_items": int((eval_i & ~any_i).sum()),
        "users_without_interactions": int((~any_u & ~eval_u).sum()),
        "items_without_interactions": int((~any_i & ~eval_i).sum()),
        "train_user_degree": degree_summary(train_u),
        "train_item_degree": degree_summary(train_i),
        "density": float(len(ds.train)) / max(1, ds.n_users * ds.n_items),
        "item_features": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "mmap": isinstance(v, np.memmap)}
                          for k, v in ds.item_features.items()},
        "user_features": {k: {"shape": list(v.shape), "dtype": str(v.dtype), "mmap": isinstance(v, np.memmap)}
                          for k, v in ds.user_features.items()},
    }
    return stats
