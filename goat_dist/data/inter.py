"""Reader and writer of MMRec ``.inter`` files: a tab-separated table with a header line
``userID itemID [rating timestamp] x_label`` where ``x_label`` 0/1/2 = train/valid/test.

Design choices:
- Same block-wise numpy parsing as the adjacency reader: fields are cut at tabs, every line must have
  exactly as many fields as the header, and the ``userID``/``itemID``/``x_label`` fields must be
  unsigned decimal integers. Other columns (``rating``, ``timestamp``, anything else) are carried by
  the format but not used; they are not parsed, which the log says once.
- Errors are ``FILE:LINE: ...`` with the header as line 1; blank lines are skipped (they hold nothing).
"""
from __future__ import annotations

import numpy as np

from goat_dist.data.adjacency import (BLOCK_BYTES, _DIGIT, _MAX_FAST_DIGITS, describe_bad_token,
                                      digits_to_int, iter_blocks, smallest_int_dtype)
from goat_dist.data.dataset import SPLITS, Interactions
from goat_dist.data.errors import DataError
from goat_dist.data.fsio import basename, open_url
from goat_dist.log import get_logger

log = get_logger(__name__)

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")


def parse_header(name: str, line: bytes) -> list[str]:
    """Column names of an ``.inter`` header line; DataError ``FILE:1: bad header ...`` when it lacks a
    required column, repeats one, or is not text."""
    try:
        text = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(name, "bad header: undecodable bytes (not UTF-8)", line=1) from None
    cols = text.split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing or len(set(cols)) != len(cols):
        problem = (f"missing column(s) {', '.join(missing)}" if missing else "a column name is repeated")
        raise DataError(name, f"bad header {text!r}: {problem} (expected tab-separated "
                              "'userID itemID [rating timestamp] x_label')", line=1)
    return cols


def _field_error(name: str, block: bytes, line_start: int, start: int, end: int, line_no: int, field: int,
                 column: str) -> DataError:
    token = block[start:end]
    if column == "x_label" and token.isdigit():
        return DataError(name, f"invalid x_label {token.decode()} (expected 0, 1 or 2 for train/valid/test)",
                         line=line_no)
    what = "label" if column == "x_label" else "id"
    return DataError(name, describe_bad_token(token, field, what) + f" (column {column})", line=line_no)


def _parse_block(name: str, block: bytes, first_line: int, cols: list[str]):
    a = np.frombuffer(block, dtype=np.uint8)
    if (a >= 128).any():
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as exc:
            line_no = first_line + block.count(b"\n", 0, exc.start)
            raise DataError(name, f"undecodable bytes (not UTF-8): {block[exc.start:exc.start + 4]!r}",
                            line=line_no) from None
    newlines = np.flatnonzero(a == 10)
    line_starts = np.concatenate(([0], newlines[:-1] + 1))
    line_ends = newlines.copy()
    has_cr = (line_ends > line_starts) & (a[np.maximum(line_ends - 1, 0)] == 13)
    line_ends[has_cr] -= 1
    nonblank = line_ends > line_starts
    tabs = np.flatnonzero(a == 9)
    tabs_per_line = np.diff(np.searchsorted(tabs, newlines), prepend=0)
    k = len(cols)
    wrong = np.flatnonzero(nonblank & (tabs_per_line != k - 1) | ~nonblank & (tabs_per_line > 0))
    if wrong.shape[0]:
        i = int(wrong[0])
        raise DataError(name, f"wrong field count: {int(tabs_per_line[i]) + 1} fields, the header has {k}",
                        line=first_line + i)
    rows = np.flatnonzero(nonblank)
    n = rows.shape[0]
    # field j of row r spans [starts[r, j], ends[r, j])
    ends = np.empty((n, k), dtype=np.int64)
    ends[:, :k - 1] = tabs.reshape(n, k - 1) if k > 1 else ends[:, :0]
    ends[:, k - 1] = line_ends[rows]
    starts = np.empty_like(ends)
    starts[:, 0] = line_starts[rows]
    starts[:, 1:] = ends[:, :-1] + 1
    nondigit_before = np.concatenate(([0], np.cumsum(~_DIGIT[a], dtype=np.int64)))
    out = {}
    for col in REQUIRED_COLUMNS:
        j = cols.index(col)
        s, e = starts[:, j], ends[:, j]
        length = e - s
        bad = (nondigit_before[e] != nondigit_before[s]) | (length == 0) | (length > _MAX_FAST_DIGITS)
        if bad.any():
            r = int(np.argmax(bad))
            raise _field_error(name, block, int(line_starts[rows[r]]), int(s[r]), int(e[r]),
                               first_line + int(rows[r]), j + 1, col)
        out[col] = digits_to_int(a, s, length)
    labels = out["x_label"]
    bad = labels > 2
    if bad.any():
        r = int(np.argmax(bad))
        raise DataError(name, f"invalid x_label {int(labels[r])} (expected 0, 1 or 2 for train/valid/test)",
                        line=first_line + int(rows[r]))
    return out["userID"], out["itemID"], labels, first_line + rows


def read_inter(url: str, *, block_bytes: int = BLOCK_BYTES, name: str | None = None) -> dict[str, Interactions]:
    """Read an MMRec ``.inter`` file into {"train", "valid", "test"} splits (rows in file order).

    Splits with no row are present and empty (the loader decides which are required)."""
    name = name or basename(url)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {0: [], 1: [], 2: []}
    max_id = 0
    with open_url(url, "rb") as f:
        header = f.readline()
        if not header.strip():
            raise DataError(name, "bad header: the file is empty (expected 'userID itemID [rating timestamp] "
                                  "x_label')", line=1)
        cols = parse_header(name, header)
        extra = [c for c in cols if c not in REQUIRED_COLUMNS]
        if extra:
            log.debug("%s: columns %s are not used", name, extra)
        blocks = iter_blocks(f, block_bytes)
        for first_line, block in blocks:
            users, items, labels, _ = _parse_block(name, block, first_line + 1, cols)
            if users.shape[0]:
                max_id = max(max_id, int(users.max()), int(items.max()))
            dt = smallest_int_dtype(max_id)
            for lab in range(3):
                sel = labels == lab
                parts[lab].append((users[sel].astype(dt), items[sel].astype(dt)))
    dtype = smallest_int_dtype(max_id)
    out = {}
    for lab, split in enumerate(SPLITS):
        us = [p[0] for p in parts[lab]]
        it = [p[1] for p in parts[lab]]
        out[split] = Interactions(np.concatenate(us).astype(dtype, copy=False) if us else np.zeros(0, dtype),
                                  np.concatenate(it).astype(dtype, copy=False) if it else np.zeros(0, dtype))
    return out


def find_inter_line(url: str, *, user_limit: int | None = None, item_limit: int | None = None) -> tuple[int, str, int] | None:
    """First (line, "user"|"item", id) of an ``.inter`` file whose id is >= the given limit, or None."""
    name = basename(url)
    with open_url(url, "rb") as f:
        cols = parse_header(name, f.readline())
        for first_line, block in iter_blocks(f):
            users, items, _, line_numbers = _parse_block(name, block, first_line + 1, cols)
            hits = []
            for kind, ids, limit in (("user", users, user_limit), ("item", items, item_limit)):
                if limit is not None and ids.shape[0]:
                    bad = np.flatnonzero(ids >= limit)
                    if bad.shape[0]:
                        hits.append((int(line_numbers[bad[0]]), kind, int(ids[bad[0]])))
            if hits:
                return min(hits)
    return None


def write_inter(url: str, splits: dict[str, Interactions]) -> None:
    """Write splits as an ``.inter`` TSV (``userID itemID x_label``), train then valid then test."""
    from goat_dist.data.adjacency import format_tokens

    with open_url(url, "wb") as f:
        f.write(b"userID\titemID\tx_label\n")
        for lab, split in enumerate(SPLITS):
            inter = splits.get(split)
            if inter is None or len(inter) == 0:
                continue
            n = len(inter)
            tokens = np.empty(3 * n, dtype=np.int64)
            tokens[0::3] = inter.users
            tokens[1::3] = inter.items
            tokens[2::3] = lab
            seps = np.full(3 * n, ord("\t"), dtype=np.uint8)
            seps[2::3] = ord("\n")
            f.write(format_tokens(tokens, seps))
