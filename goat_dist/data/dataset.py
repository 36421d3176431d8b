"""The in-memory view of a dataset that every later room reads: splits as id arrays, features as
(memory-mapped) matrices. Readers in this package build it; nothing here knows about models or ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclass(slots=True)
class Interactions:
    """One split: parallel arrays of user and item ids (0-based, int32 when they fit, else int64).

    **Shapes:** ``users`` [E], ``items`` [E]."""

    users: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])


@dataclass(slots=True)
class RecDataset:
    """A validated recommendation dataset.

    ``item_features[name]`` is [n_items, dim_name] and ``user_features[name]`` is [n_users, dim];
    both may be ``np.memmap`` (float16 or float32). ``user_ids``/``item_ids`` hold the original
    string ids when the source had non-contiguous or string ids (index = contiguous id).
    ``duplicates[split]`` counts repeated (user, item) pairs that were kept, not dropped.
    """

    n_users: int
    n_items: int
    splits: dict[str, Interactions]
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    user_features: dict[str, np.ndarray] = field(default_factory=dict)
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    duplicates: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @property
    def train(self) -> Interactions:
        return self.splits["train"]
