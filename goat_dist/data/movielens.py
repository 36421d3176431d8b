"""MovieLens-100K -> goat format with item texts (titles + genres).

Split (documented in the README): ratings >= ``min_rating`` (default 4) are the positive
interactions; for each user they are ordered by timestamp and split at random 8:1:1 per user
(``floor(0.1 n)`` valid, ``floor(0.1 n)`` test, the rest train, so every user with a positive keeps
at least one training item). Ids are the 1-based MovieLens ids minus one (users 0..942, items
0..1681); train.txt lists each user's items in timestamp order, so the profile text's "recently
liked" items are the most recent ones. ``u.item`` has no row for item 267: its text is missing and
it is encoded as "unknown item". The goat format infers the item count from the largest id, so
items above the largest positively rated id (ids 1674..1681 with the default threshold) cannot
exist in the dataset: they get no text line, and the returned statistics count them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from goat_dist.data.errors import DataError

GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western")
N_USERS, N_ITEMS = 943, 1682


def make_ml100k(src: str | Path, out: str | Path, seed: int = 0, min_rating: int = 4) -> dict[str, int]:
    src, out = Path(src), Path(out)
    data_path = src / "u.data"
    try:
        ratings = np.loadtxt(data_path, dtype=np.int64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise DataError(str(data_path), message=f"cannot read MovieLens ratings: {exc}") from None
    if ratings.shape[1] != 4:
        raise DataError(str(data_path), message=f"expected 4 columns (user item rating timestamp), got {ratings.shape[1]}")
    pos = ratings[ratings[:, 2] >= min_rating]
    rng = np.random.default_rng(seed)
    splits: dict[str, list[list[int]]] = {s: [[] for _ in range(N_USERS)] for s in ("train", "valid", "test")}
    order = np.lexsort((pos[:, 3], pos[:, 0]))
    pos = pos[order]
    bounds = np.searchsorted(pos[:, 0], np.arange(1, N_USERS + 2))
    for u in range(N_USERS):
        rows = pos[bounds[u]:bounds[u + 1]]
        n = len(rows)
        if n == 0:
            continue
        n_hold = n // 10
        perm = rng.permutation(n)
        valid_idx, test_idx = set(perm[:n_hold].tolist()), set(perm[n_hold:2 * n_hold].tolist())
        for j, (_, item, _, _) in enumerate(rows):
            split = "valid" if j in valid_idx else "test" if j in test_idx else "train"
            splits[split][u].append(int(item) - 1)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_user in splits.items():
        with (out / f"{split}.txt").open("w") as fh:
            for u, items in enumerate(per_user):
                if items:
                    fh.write(" ".join(map(str, [u, *items])) + "\n")
    n_items = int(pos[:, 1].max())  # largest 1-based id with a positive = the dataset's item count
    item_path = src / "u.item"
    with (out / "item_text.tsv").open("w", encoding="utf-8") as fh:
        for lineno, line in enumerate(item_path.read_bytes().decode("latin-1").splitlines(), start=1):
            fields = line.split("|")
            if len(fields) != 5 + len(GENRES):
                raise DataError(str(item_path), line=lineno, message=f"expected {5 + len(GENRES)} '|'-separated fields, got {len(fields)}")
            if int(fields[0]) > n_items:
                continue
            genres = [g for g, flag in zip(GENRES, fields[5:]) if flag.strip() == "1"]
            fh.write(f"{int(fields[0]) - 1}\t{fields[1].strip()}\t{'|'.join(genres)}\n")
    stats = {s: sum(len(x) for x in v) for s, v in splits.items()}
    stats["items"] = n_items
    stats["items_outside_dataset"] = N_ITEMS - n_items
    return stats
