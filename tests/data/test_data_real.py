"""The real datasets in ../shared/data (skipped when absent): exact published statistics."""
from __future__ import annotations

import numpy as np

from conftest import shared_dataset  # tests/conftest.py
from goat_dist.config import DataConfig
from goat_dist.data import load_dataset, validate_dataset


def test_amazon_baby_statistics():
    report = validate_dataset(str(shared_dataset("amazon_baby")))
    assert report.ok, report.errors
    s = report.stats
    assert (s["users"], s["items"]) == (19_445, 7_050)
    assert s["interactions"] == {"train": 118_551, "valid": 20_559, "test": 21_682}
    assert s["duplicates"] == {"train": 0, "valid": 0, "test": 0}
    text = report.format()
    assert "users: 19,445" in text and "train 118,551 / valid 20,559 / test 21,682" in text


def test_amazon_baby_alt_split_inter_same_graph():
    path = shared_dataset("amazon_baby")
    goat = load_dataset(DataConfig(path=str(path)))
    inter = load_dataset(DataConfig(path=str(path), format="inter", inter_file="alt_split.inter"))
    assert (inter.n_users, inter.n_items) == (goat.n_users, goat.n_items)

    def pairs(ds):
        return np.sort(np.concatenate([v.users.astype(np.int64) * ds.n_items + v.items for v in ds.splits.values()]))

    assert np.array_equal(pairs(goat), pairs(inter))


def test_tiktok_with_feat_npy_features():
    report = validate_dataset(str(shared_dataset("tiktok")))
    assert report.ok, report.errors
    s = report.stats
    assert (s["users"], s["items"]) == (9_308, 6_710)
    assert s["interactions"] == {"train": 59_541, "valid": 3_051, "test": 6_130}
    assert s["item_features"] == {m: {"shape": [6_710, 128], "dtype": "float16", "mmap": True}
                                  for m in ("audio", "image")}
