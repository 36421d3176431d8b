"""Adjacency-list reader/writer: round trips on every URL kind, a slow reference parser, and one test
per defect, each checking the message names the file and the line."""
from __future__ import annotations

import numpy as np
import pytest

from data_fixtures import mem_url  # noqa: F401 (pytest fixtures)
from goat_dist.data.adjacency import format_adjacency, read_adjacency, write_adjacency
from goat_dist.data.errors import DataError


def _reference_parse(text: str):
    users, items = [], []
    for line in text.splitlines():
        toks = line.split()
        if toks:
            users += [int(toks[0])] * (len(toks) - 1)
            items += [int(t) for t in toks[1:]]
    return np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)


def _random_pairs(seed=0, n_users=300, n_items=5000):
    rng = np.random.default_rng(seed)
    deg = rng.integers(1, 30, size=n_users)
    users = np.repeat(np.arange(n_users), deg)
    items = rng.integers(0, n_items, size=users.shape[0])
    items[:4] = [0, 9, 10, 4999]  # digit-count boundaries
    return users, items


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_round_trip_every_url_kind(kind, tmp_path, mem_url):
    users, items = _random_pairs()
    url = {"local": str(tmp_path / "train.txt"), "file": f"file://{tmp_path}/train.txt",
           "memory": f"{mem_url}/train.txt"}[kind]
    write_adjacency(url, users, items)
    got = read_adjacency(url)
    assert np.array_equal(got.interactions.users, users)
    assert np.array_equal(got.interactions.items, items)
    assert got.interactions.users.dtype == np.int32
    assert got.lines == 300 and got.max_user == 299


def test_matches_reference_parser_across_small_blocks(tmp_path):
    """Tiny blocks force lines to straddle block reads; tabs, CRLF, blank lines and repeated users."""
    text = "0 5 6\t7\r\n\n1\n2 3 3\n 0 8 \n10 11" + "".join(f"\n{u} {u + 1} {u + 2}" for u in range(3, 200))
    path = tmp_path / "t.txt"
    path.write_text(text)
    ref_u, ref_i = _reference_parse(text)
    for block in (7, 64, 1 << 20):
        got = read_adjacency(str(path), block_bytes=block)
        assert np.array_equal(got.interactions.users, ref_u)
        assert np.array_equal(got.interactions.items, ref_i)
    assert got.users_without_items == 1  # the line "1"
    assert got.max_user == 199


def test_format_adjacency_text():
    assert format_adjacency(np.array([0, 0, 12, 3]), np.array([7, 100, 0, 5])) == b"0 7 100\n12 0\n3 5\n"


def test_ids_beyond_int32_are_int64(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("0 3000000000\n")
    got = read_adjacency(str(path))
    assert got.interactions.items.dtype == np.int64 and got.interactions.items[0] == 3_000_000_000


def test_long_id_within_int64_is_exact(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(f"0 {2**62 + 7}\n")
    assert read_adjacency(str(path)).interactions.items[0] == 2**62 + 7


@pytest.mark.parametrize("bad_line, expect", [
    ("4 1.5 2", "float token '1.5'"),
    ("4 2e3", "float token '2e3'"),
    ("4 -3", "negative id -3"),
    ("-4 3", "negative id -4"),
    ("4 abc", "non-integer token 'abc'"),
    ("4 99999999999999999999", "overflows int64"),
    ("4 7\x0c8", "control character 0x0c"),
])
def test_bad_token_names_file_and_line(tmp_path, bad_line, expect):
    path = tmp_path / "train.txt"
    path.write_text("0 1 2\n1 2\n2 3\n3 1\n" + bad_line + "\n5 1\n")
    for block in (5, 1 << 20):  # the line is found whether or not it straddles blocks
        with pytest.raises(DataError) as err:
            read_adjacency(str(path), block_bytes=block)
        assert str(err.value).startswith("train.txt:5: ")
        assert expect in str(err.value)


def test_undecodable_bytes(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_bytes(b"0 1\n1 2\n2 \xff\xfe3\n")
    with pytest.raises(DataError, match=r"^valid\.txt:3: undecodable bytes \(not UTF-8\)"):
        read_adjacency(str(path))


def test_bad_line_deep_in_a_large_file(tmp_path):
    lines = [f"{u} {u % 97} {u % 89}" for u in range(50_000)]
    lines[41_234] = "41234 12 x7"
    path = tmp_path / "test.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"^test\.txt:41235: non-integer token 'x7' in field 3"):
        read_adjacency(str(path), block_bytes=4096)
