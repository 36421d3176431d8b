"""Reader of ``user,item,split`` tables (parquet or CSV) whose ids may be arbitrary strings.

Design choices:
- Ids are always mapped to contiguous 0-based ids through two map files, ``user_map.tsv`` and
  ``item_map.tsv`` (header ``index<TAB>id``, one id per line, index = contiguous id). Integer ids
  are mapped like strings (by their decimal text), so one rule holds for every table.
- Maps are reused: ids already in a map keep their index; new ids are appended in order of first
  appearance and the map is rewritten. So ids stay stable across reads, and features for a table
  dataset are indexed in map order.
- Maps live next to the table; when that folder is not writable they go to a cache folder keyed by
  the table's URL (``$GOAT_CACHE_DIR`` or ``~/.cache/goat_dist``, ``id_maps/<hash>/``).
- ``split`` holds ``train``/``valid``/``test`` (case-insensitive) or 0/1/2.
- Errors: ``FILE:LINE: ...`` for CSV (the header is line 1), ``FILE: row R: ...`` for parquet.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goat_dist.data.adjacency import smallest_int_dtype
from goat_dist.data.dataset import SPLITS, Interactions
from goat_dist.data.errors import DataError
from goat_dist.data.fsio import basename, exists, join, open_url
from goat_dist.log import get_logger

log = get_logger(__name__)

TABLE_COLUMNS = ("user", "item", "split")
TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv")
USER_MAP = "user_map.tsv"
ITEM_MAP = "item_map.tsv"
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2, "0": 0, "1": 1, "2": 2}


def _where(name: str, row: int, csv: bool) -> dict:
    return {"line": row + 2} if csv else {"row": row}


def _read_arrow(url: str, name: str) -> tuple[pa.Table, bool]:
    """The raw table and whether it came from a CSV/TSV (for line numbers)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    lower = name.lower()
    if lower.endswith((".parquet", ".pq")):
        with open_url(url, "rb") as f:
            head = f.read(4)
            f.seek(0)
            if head != b"PAR1":
                raise DataError(name, f"not a parquet file (starts with {head!r})")
            try:
                return pq.read_table(f), False
            except (pa.ArrowException, OSError) as exc:
                raise DataError(name, f"cannot read parquet: {exc}") from None
    delimiter = "\t" if lower.endswith(".tsv") else ","
    with open_url(url, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(name, f"undecodable bytes (not UTF-8): {data[exc.start:exc.start + 4]!r}",
                        line=data.count(b"\n", 0, exc.start) + 1) from None
    first = data.split(b"\n", 1)[0].decode().rstrip("\r")
    header = [c.strip().strip('"') for c in first.split(delimiter)]
    missing = [c for c in TABLE_COLUMNS if c not in header]
    if missing:
        raise DataError(name, f"bad header {first!r}: missing column(s) {', '.join(missing)} "
                              f"(expected {delimiter.join(TABLE_COLUMNS)})", line=1)
    invalid: list = []

    def on_invalid(row) -> str:
        invalid.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.py_buffer(data), read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 strings_can_be_null=False))
    except pa.ArrowException as exc:
        raise DataError(name, f"cannot parse: {exc}") from None
    if invalid:
        row = invalid[0]
        # pyarrow numbers rows without blank lines: find the line by its text (the first bad one)
        lines = data.decode("utf-8").split("\n")
        line = next((k + 1 for k, text in enumerate(lines) if text.rstrip("\r") == row.text.rstrip("\r")),
                    row.number)
        raise DataError(name, f"wrong field count: {row.actual_columns} fields, the header has "
                              f"{row.expected_columns}", line=line)
    return table, True


def _map_dir_for(url: str) -> str:
    base = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
    return base


def cache_map_dir(url: str) -> str:
    """Fallback folder for the id maps of a table at ``url`` whose own folder is read-only."""
    root = os.environ.get("GOAT_CACHE_DIR") or str(Path.home() / ".cache" / "goat_dist")
    key = hashlib.sha1(str(url).encode()).hexdigest()[:16]
    return str(Path(root) / "id_maps" / key)


def read_id_map(url: str) -> list[str]:
    """Ids of a map file, index = position. DataError names the line of a malformed entry."""
    name = basename(url)
    with open_url(url, "rb") as f:
        lines = f.read().decode("utf-8").split("\n")
    if not lines or lines[0].rstrip("\r") != "index\tid":
        raise DataError(name, "bad header (expected 'index<TAB>id')", line=1)
    ids = []
    for k, line in enumerate(lines[1:]):
        if not line:
            continue
        idx, sep, value = line.rstrip("\r").partition("\t")
        if not sep or idx != str(len(ids)):
            raise DataError(name, f"expected '{len(ids)}<TAB>id', got {line!r}", line=k + 2)
        ids.append(value)
    return ids


def write_id_map(url: str, ids: list[str]) -> None:
    body = "".join(f"{i}\t{v}\n" for i, v in enumerate(ids))
    with open_url(url, "wb") as f:
        f.write(("index\tid\n" + body).encode("utf-8"))


def _map_column(name: str, column: pa.ChunkedArray, known: list[str], what: str, csv: bool) -> tuple[np.ndarray, list[str]]:
    """Contiguous ids of ``column`` under map ``known`` (extended in first-appearance order)."""
    if column.null_count:
        row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
        raise DataError(name, f"missing {what} id", **_where(name, row, csv))
    strings = pc.cast(column, pa.string())
    bad = pc.or_(pc.match_substring(strings, "\t"), pc.match_substring(strings, "\n"))
    if pc.any(bad).as_py():
        row = int(np.argmax(bad.to_numpy(zero_copy_only=False)))
        raise DataError(name, f"{what} id contains a tab or newline", **_where(name, row, csv))
    if pc.any(pc.equal(strings, "")).as_py():
        row = int(np.argmax(pc.equal(strings, "").to_numpy(zero_copy_only=False)))
        raise DataError(name, f"empty {what} id", **_where(name, row, csv))
    known_arr = pa.array(known, type=pa.string())
    idx = pc.index_in(strings, value_set=known_arr)
    if idx.null_count:
        new = pc.unique(pc.filter(strings, pc.is_null(idx))).to_pylist()
        known = known + new
        idx = pc.index_in(strings, value_set=pa.array(known, type=pa.string()))
    return idx.to_numpy(zero_copy_only=False).astype(np.int64), known


def read_table(url: str, *, map_dir: str | None = None) -> tuple[dict[str, Interactions], np.ndarray, np.ndarray]:
    """Read a ``user,item,split`` parquet/CSV/TSV table.

    Returns (splits, user_ids, item_ids): ``user_ids[k]`` is the original id of contiguous user k.
    Maps are read from and saved to ``map_dir`` (default: next to the table, falling back to
    ``cache_map_dir(url)`` when that is not writable)."""
    name = basename(url)
    table, csv = _read_arrow(url, name)
    missing = [c for c in TABLE_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(name, f"missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)})",
                        **({"line": 1} if csv else {}))
    split_text = pc.utf8_lower(pc.cast(table["split"], pa.string()))
    codes = pc.index_in(split_text, value_set=pa.array(list(_SPLIT_CODES)))
    if codes.null_count:
        row = int(np.argmax(codes.is_null().to_numpy(zero_copy_only=False)))
        value = table["split"][row].as_py()
        raise DataError(name, f"invalid split {value!r} (expected train/valid/test or 0/1/2)",
                        **_where(name, row, csv))
    labels = np.asarray(list(_SPLIT_CODES.values()), dtype=np.int8)[codes.to_numpy(zero_copy_only=False)]

    candidates = [map_dir] if map_dir else [_map_dir_for(url), cache_map_dir(url)]
    found = next((d for d in candidates if exists(join(d, USER_MAP)) and exists(join(d, ITEM_MAP))), None)
    user_known = read_id_map(join(found, USER_MAP)) if found else []
    item_known = read_id_map(join(found, ITEM_MAP)) if found else []
    n_user_before, n_item_before = len(user_known), len(item_known)
    users, user_known = _map_column(name, table["user"], user_known, "user", csv)
    items, item_known = _map_column(name, table["item"], item_known, "item", csv)
    if found is None or len(user_known) != n_user_before or len(item_known) != n_item_before:
        _save_maps(candidates if found is None else [found] + [c for c in candidates if c != found],
                   user_known, item_known)

    dtype = smallest_int_dtype(max(len(user_known), len(item_known)))
    splits = {s: Interactions(users[labels == k].astype(dtype), items[labels == k].astype(dtype))
              for k, s in enumerate(SPLITS)}
    return splits, np.asarray(user_known, dtype=object), np.asarray(item_known, dtype=object)


def _save_maps(dirs: list[str], users: list[str], items: list[str]) -> None:
    errors = []
    for d in dirs:
        try:
            write_id_map(join(d, USER_MAP), users)
            write_id_map(join(d, ITEM_MAP), items)
            log.info("id maps saved to %s (%d users, %d items)", d, len(users), len(items))
            return
        except OSError as exc:
            errors.append(f"{d}: {exc}")
    raise OSError("cannot save id maps anywhere: " + "; ".join(errors))
