"""user,item,split tables: string ids mapped through saved maps that stay stable across reads."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import mem_url  # noqa: F401 (pytest fixtures)
from goat_dist.data.errors import DataError
from goat_dist.data.table import ITEM_MAP, USER_MAP, read_id_map, read_table

ROWS = [("alice", "B00X", "train"), ("bob", "B00Y", "train"), ("alice", "B00Z", "test"),
        ("carol", "B00X", "valid"), ("bob", "B00X", "test"), ("carol", "B00Y", "train")]


def _csv(rows) -> str:
    return "user,item,split\n" + "".join(f"{u},{i},{s}\n" for u, i, s in rows)


def test_csv_string_ids_and_saved_maps(tmp_path):
    (tmp_path / "log.csv").write_text(_csv(ROWS))
    splits, user_ids, item_ids = read_table(str(tmp_path / "log.csv"))
    assert user_ids.tolist() == ["alice", "bob", "carol"] and item_ids.tolist() == ["B00X", "B00Y", "B00Z"]
    assert splits["train"].users.tolist() == [0, 1, 2] and splits["train"].items.tolist() == [0, 1, 1]
    assert splits["test"].items.tolist() == [2, 0]
    assert read_id_map(str(tmp_path / USER_MAP)) == ["alice", "bob", "carol"]


def test_maps_are_stable_across_reads_and_extended(tmp_path):
    (tmp_path / "log.csv").write_text(_csv(ROWS))
    first, users1, items1 = read_table(str(tmp_path / "log.csv"))
    # same data in another order plus a new user and item: old ids keep their index
    (tmp_path / "log.csv").write_text(_csv([("dave", "B01A", "train")] + ROWS[::-1]))
    second, users2, items2 = read_table(str(tmp_path / "log.csv"))
    assert users2.tolist() == ["alice", "bob", "carol", "dave"]
    assert items2.tolist() == ["B00X", "B00Y", "B00Z", "B01A"]
    assert second["train"].users[0] == 3 and second["train"].items[0] == 3
    assert read_id_map(str(tmp_path / ITEM_MAP))[3] == "B01A"


def test_parquet_memory_url(mem_url):
    import fsspec

    table = pa.table({"user": [u for u, _, _ in ROWS], "item": [i for _, i, _ in ROWS],
                      "split": [s for _, _, s in ROWS]})
    with fsspec.open(f"{mem_url}/log.parquet", "wb") as f:
        pq.write_table(table, f)
    splits, users, items = read_table(f"{mem_url}/log.parquet")
    again, users2, _ = read_table(f"{mem_url}/log.parquet")
    assert users.tolist() == users2.tolist() == ["alice", "bob", "carol"]
    assert np.array_equal(splits["test"].users, again["test"].users)
    assert fsspec.filesystem("memory").exists(f"{mem_url}/{USER_MAP}")


def test_read_only_folder_falls_back_to_cache(tmp_path, monkeypatch):
    """The data folder refuses writes (simulated, so the test also holds when run as root)."""
    import goat_dist.data.table as table

    data = tmp_path / "ro"
    data.mkdir()
    (data / "log.csv").write_text(_csv(ROWS))
    real_write = table.write_id_map

    def refuse_in_data(url, ids):
        if str(url).startswith(str(data)):
            raise PermissionError(13, "Permission denied", str(url))
        real_write(url, ids)

    monkeypatch.setattr(table, "write_id_map", refuse_in_data)
    monkeypatch.setenv("GOAT_CACHE_DIR", str(tmp_path / "cache"))
    _, users, _ = read_table(str(data / "log.csv"))
    (data / "log.csv").write_text(_csv(ROWS[::-1]))  # different first-appearance order
    _, users2, _ = read_table(str(data / "log.csv"))
    assert users.tolist() == users2.tolist() == ["alice", "bob", "carol"]
    assert not (data / USER_MAP).exists() and len(list((tmp_path / "cache").rglob(USER_MAP))) == 1


def test_explicit_map_dir(tmp_path):
    (tmp_path / "log.csv").write_text(_csv(ROWS))
    read_table(str(tmp_path / "log.csv"), map_dir=str(tmp_path / "maps"))
    assert (tmp_path / "maps" / USER_MAP).exists() and not (tmp_path / USER_MAP).exists()


@pytest.mark.parametrize("text, line, expect", [
    ("user,item\nalice,B00X\n", 1, "missing column(s) split"),
    ("user,item,split\nalice,B00X,train\nbob,B00Y,holdout\n", 3, "invalid split 'holdout'"),
    ("user,item,split\nalice,B00X,train\nbob,B00Y\n", 3, "wrong field count"),
    ("user,item,split\nalice,B00X,train\n,B00Y,test\n", 3, "empty user id"),
])
def test_csv_defects_name_file_and_line(tmp_path, text, line, expect):
    (tmp_path / "log.csv").write_text(text)
    with pytest.raises(DataError) as err:
        read_table(str(tmp_path / "log.csv"), map_dir=str(tmp_path / "maps"))
    assert str(err.value).startswith(f"log.csv:{line}: ")
    assert expect in str(err.value)


def test_csv_undecodable_bytes(tmp_path):
    (tmp_path / "log.csv").write_bytes(b"user,item,split\nalice,B00X,train\nb\xffb,B00Y,test\n")
    with pytest.raises(DataError, match=r"^log\.csv:3: undecodable bytes"):
        read_table(str(tmp_path / "log.csv"))


def test_parquet_null_id_names_row(tmp_path):
    pq.write_table(pa.table({"user": ["a", None], "item": ["x", "y"], "split": ["train", "test"]}),
                   tmp_path / "log.parquet")
    with pytest.raises(DataError, match=r"^log\.parquet: row 1: missing user id"):
        read_table(str(tmp_path / "log.parquet"))
