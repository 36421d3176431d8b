"""MMRec .inter reader: splits by x_label, round trip, and each defect named by file and line."""
from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import mem_url  # noqa: F401 (pytest fixtures)
from goat_dist.data.dataset import Interactions
from goat_dist.data.errors import DataError
from goat_dist.data.inter import read_inter, write_inter

GOOD = "userID\titemID\trating\ttimestamp\tx_label\n0\t1\t5.0\t978300760\t0\n0\t2\t3\t978300761\t2\n1\t0\t4.5\t1\t1\n"


def test_reads_splits_and_ignores_extra_columns(tmp_path):
    path = tmp_path / "x.inter"
    path.write_text(GOOD)
    s = read_inter(str(path))
    assert (s["train"].users.tolist(), s["train"].items.tolist()) == ([0], [1])
    assert (s["valid"].users.tolist(), s["valid"].items.tolist()) == ([1], [0])
    assert (s["test"].users.tolist(), s["test"].items.tolist()) == ([0], [2])


def test_round_trip_memory_url(mem_url):
    rng = np.random.default_rng(1)
    splits = {s: Interactions(rng.integers(0, 50, 200).astype(np.int32), rng.integers(0, 900, 200).astype(np.int32))
              for s in ("train", "valid", "test")}
    url = f"{mem_url}/data.inter"
    write_inter(url, splits)
    got = read_inter(url, block_bytes=100)
    for s in splits:
        assert np.array_equal(got[s].users, splits[s].users) and np.array_equal(got[s].items, splits[s].items)


@pytest.mark.parametrize("body, line, expect", [
    ("userID\titem\tx_label\n0\t1\t0\n", 1, "bad header"),
    ("userID\titemID\tx_label\n0\t1\t0\n0\t1\n", 3, "wrong field count: 2 fields, the header has 3"),
    ("userID\titemID\tx_label\n0\t1\t0\n0\t1\t0\t7\n", 3, "wrong field count: 4 fields"),
    ("userID\titemID\tx_label\n0\t1\t0\n1\t2\t0\n0\t1\t3\n", 4, "invalid x_label 3"),
    ("userID\titemID\tx_label\n0\t1\t0\n0\t1\ttrain\n", 3, "non-integer token 'train'"),
    ("userID\titemID\tx_label\n0\t1.0\t0\n", 2, "float token '1.0'"),
    ("userID\titemID\tx_label\n-1\t1\t0\n", 2, "negative id -1"),
    ("userID\titemID\tx_label\n0\t\t0\n", 2, "empty field 2"),
])
def test_defects_name_file_and_line(tmp_path, body, line, expect):
    path = tmp_path / "bad.inter"
    path.write_text(body)
    with pytest.raises(DataError) as err:
        read_inter(str(path))
    assert str(err.value).startswith(f"bad.inter:{line}: ")
    assert expect in str(err.value)


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "bad.inter"
    path.write_bytes(b"userID\titemID\tx_label\n0\t1\t0\n0\t\xc3\x28\t0\n")
    with pytest.raises(DataError, match=r"^bad\.inter:3: undecodable bytes"):
        read_inter(str(path))
