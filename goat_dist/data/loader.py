"""``load_dataset(cfg) -> RecDataset``: the one entry point that finds, reads and checks a dataset.

Formats (``cfg.format`` or auto-detected, in this order):
- ``goat``: a folder with ``train.txt`` / ``valid.txt`` / ``test.txt`` (adjacency lists). ``train`` and
  ``test`` are required; ``valid`` is optional (Gowalla has none), but when the file exists it must
  hold at least one interaction. A missing valid split is an empty ``Interactions`` (logged).
- ``inter``: one MMRec ``.inter`` TSV (``cfg.inter_file``, the path itself, or the only ``*.inter`` in
  the folder). Rows with ``x_label`` 0 and 2 are required, 1 optional.
- ``table``: a ``user,item,split`` parquet/CSV (string ids mapped through saved maps, see ``table.py``).
A folder with both ``train.txt`` and an ``.inter`` file is read as ``goat`` (say ``format: inter`` to
choose the other).

Counts: ``n_users``/``n_items`` = max id + 1 over all splits (or the id-map size for tables). Feature
matrices declare a count too: every id must have a feature row (an id beyond the rows is an error at
its line), all matrices of one side must agree, and rows beyond the largest id are items/users with no
interaction (kept; they raise the count). For tables the rows must equal the map size.

Nothing is dropped: duplicates are kept and counted per split in ``RecDataset.duplicates``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from goat_dist.config import DataConfig
from goat_dist.data.adjacency import AdjacencyFile, find_line, read_adjacency, smallest_int_dtype
from goat_dist.data.dataset import SPLITS, Interactions, RecDataset
from goat_dist.data.errors import DataError
from goat_dist.data.features import FEATURE_NORMS, check_finite, discover_features, load_matrix, normalize_features
from goat_dist.data.fsio import basename, exists, isdir, join, listdir
from goat_dist.data.inter import find_inter_line, read_inter
from goat_dist.data.stats import count_duplicates
from goat_dist.data.table import TABLE_SUFFIXES, read_table
from goat_dist.log import get_logger

log = get_logger(__name__)

FORMATS = ("goat", "inter", "table")
REQUIRED_SPLITS = ("train", "test")


def detect_format(path: str, inter_file: str = "") -> tuple[str, str]:
    """(format, location): location is the folder for ``goat``, the file URL otherwise.

    Raises DataError when ``path`` holds no recognisable dataset."""
    if inter_file:
        url = join(path, inter_file)
        return ("inter" if url.endswith(".inter") else "table"), url
    if not isdir(path):
        if path.endswith(".inter"):
            return "inter", path
        if path.lower().endswith(TABLE_SUFFIXES):
            return "table", path
        raise DataError(path, "not a dataset folder, .inter file or parquet/CSV table")
    names = listdir(path)
    if any(f"{s}.txt" in names for s in SPLITS):
        return "goat", path
    inters = [n for n in names if n.endswith(".inter")]
    if len(inters) == 1:
        return "inter", join(path, inters[0])
    if len(inters) > 1:
        raise DataError(path, f"several .inter files ({', '.join(inters)}); set data.inter_file")
    tables = [n for n in names if n.lower().endswith(TABLE_SUFFIXES)]
    if len(tables) == 1:
        return "table", join(path, tables[0])
    if len(tables) > 1:
        raise DataError(path, f"several tables ({', '.join(tables)}); set data.inter_file")
    raise DataError(path, "no dataset found (expected train.txt/valid.txt/test.txt, one *.inter file, "
                          "or one user,item,split parquet/CSV table)")


@dataclass
class _Collector:
    """Raise the first DataError (loading) or collect them all (validation)."""

    collect: bool
    errors: list[DataError] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        if not self.collect:
            raise err
        self.errors.append(err)


@dataclass
class _Splits:
    splits: dict[str, Interactions]
    files: dict[str, str]  # split -> URL it came from (for locating lines)
    fmt: str
    max_user: int = -1  # includes users named on lines without items
    user_ids: np.ndarray | None = None
    item_ids: np.ndarray | None = None


def _empty() -> Interactions:
    return Interactions(np.zeros(0, np.int32), np.zeros(0, np.int32))


def _read_goat(folder: str, out: _Collector) -> _Splits:
    splits, files, max_user = {}, {}, -1
    for split in SPLITS:
        url = join(folder, f"{split}.txt")
        if not exists(url):
            if split in REQUIRED_SPLITS:
                out.add(DataError(f"{split}.txt", f"required split '{split}' is missing (no {url})"))
            else:
                log.info("%s: no valid.txt; the valid split is empty", folder)
            splits[split] = _empty()
            continue
        files[split] = url
        try:
            parsed: AdjacencyFile = read_adjacency(url)
        except DataError as err:
            out.add(err)
            splits[split] = _empty()
            continue
        splits[split] = parsed.interactions
        max_user = max(max_user, parsed.max_user)
        if len(parsed.interactions) == 0:
            out.add(DataError(f"{split}.txt", f"split '{split}' is empty: 0 interactions in {parsed.lines} "
                                              "line(s)"))
        if parsed.users_without_items:
            log.info("%s.txt: %d line(s) name a user with no item", split, parsed.users_without_items)
    return _Splits(splits, files, "goat", max_user)


def _read_labelled(url: str, fmt: str, out: _Collector) -> _Splits:
    name = basename(url)
    user_ids = item_ids = None
    try:
        if fmt == "inter":
            splits = read_inter(url)
        else:
            splits, user_ids, item_ids = read_table(url)
    except DataError as err:
        out.add(err)
        return _Splits({s: _empty() for s in SPLITS}, {}, fmt)
    label = {"train": "x_label 0" if fmt == "inter" else "split 'train'",
             "valid": "x_label 1" if fmt == "inter" else "split 'valid'",
             "test": "x_label 2" if fmt == "inter" else "split 'test'"}
    for split in REQUIRED_SPLITS:
        if len(splits[split]) == 0:
            out.add(DataError(name, f"required split '{split}' is empty: no row with {label[split]}"))
    if len(splits["valid"]) == 0:
        log.info("%s: no %s rows; the valid split is empty", name, label["valid"])
    return _Splits(splits, {s: url for s in SPLITS}, fmt, user_ids=user_ids, item_ids=item_ids)


def _max_id(splits: dict[str, Interactions], side: str) -> int:
    m = -1
    for inter in splits.values():
        arr = getattr(inter, side)
        if arr.shape[0]:
            m = max(m, int(arr.max()))
    return m


def _locate(sp: _Splits, side: str, limit: int) -> tuple[str, int | None, int]:
    """(file name, line, id) of the first id >= limit on ``side`` ('users'/'items')."""
    kw = {"user_limit": limit} if side == "users" else {"item_limit": limit}
    for split in SPLITS:
        url = sp.files.get(split)
        if url is None:
            continue
        if sp.fmt == "goat":
            hit = find_line(url, **kw)
        elif sp.fmt == "inter":
            hit = find_inter_line(url, **kw)
        else:
            arr = getattr(sp.splits[split], side)
            bad = np.flatnonzero(arr >= limit)
            hit = None if not bad.shape[0] else (None, side[:-1], int(arr[bad[0]]))
        if hit is not None:
            return basename(url), hit[0], hit[2]
    return "?", None, limit  # pragma: no cover - callers only ask when such an id exists


def _load_side_features(sources: dict[str, str], out: _Collector) -> dict[str, np.ndarray]:
    feats = {}
    for name, url in sources.items():
        try:
            feats[name] = load_matrix(url)
        except DataError as err:
            out.add(err)
    return feats


def _reconcile(sp: _Splits, feats: dict[str, np.ndarray], sources: dict[str, str], side: str,
               n_from_ids: int, out: _Collector) -> int:
    """The id count of one side, checked against its feature matrices."""
    if not feats:
        return n_from_ids
    names = list(feats)
    first = names[0]
    rows = feats[first].shape[0]
    for name in names[1:]:
        if feats[name].shape[0] != rows:
            out.add(DataError(basename(sources[name]), f"{feats[name].shape[0]} rows, but "
                              f"{basename(sources[first])} has {rows}: feature row count != {side[:-1]} count"))
    if n_from_ids > rows:
        fname, line, ident = _locate(sp, side, rows)
        msg = f"{side[:-1]} id {ident} has no feature row ({basename(sources[first])} has {rows} rows)"
        out.add(DataError(fname, msg, line=line) if line is not None else DataError(fname, msg))
        return n_from_ids
    if rows > n_from_ids:
        if sp.fmt == "table":
            out.add(DataError(basename(sources[first]), f"{rows} rows, but the id map has {n_from_ids} "
                              f"{side}: feature row count != {side[:-1]} count"))
            return n_from_ids
        log.info("%s: %d rows > %d %s seen in interactions; the extra %s have no interaction",
                 basename(sources[first]), rows, n_from_ids, side, side)
    return rows


def _load(cfg: DataConfig, *, collect: bool, check_features: bool = True) -> tuple[RecDataset | None, list[DataError]]:
    out = _Collector(collect)
    path = str(cfg.path)
    if not exists(path):
        if cfg.generate_if_missing:
            from goat_dist.data.synth import generate

            s = cfg.synth
            log.info("%s does not exist: generating the synthetic dataset there", path)
            generate(path, users=s.users, items=s.items, interactions=s.interactions,
                     modalities=dict(s.modalities), user_profiles=s.user_profiles, seed=s.seed)
        else:
            out.add(DataError(path, "dataset not found (set data.generate_if_missing to create a synthetic one)"))
            return None, out.errors
    if cfg.format not in ("auto",) + FORMATS:
        out.add(DataError(path, f"unknown data.format {cfg.format!r} (auto, {', '.join(FORMATS)})"))
        return None, out.errors
    if cfg.feature_norm not in FEATURE_NORMS:
        out.add(DataError(path, f"unknown data.feature_norm {cfg.feature_norm!r} ({', '.join(FEATURE_NORMS)})"))
        return None, out.errors
    try:
        fmt, location = detect_format(path, cfg.inter_file)
    except DataError as err:
        out.add(err)
        return None, out.errors
    if cfg.format != "auto" and cfg.format != fmt:
        if cfg.format == "goat":
            fmt, location = "goat", path
        else:
            out.add(DataError(path, f"data.format is {cfg.format!r} but the folder holds {fmt} data"))
            return None, out.errors

    sp = _read_goat(location, out) if fmt == "goat" else _read_labelled(location, fmt, out)

    folder = location if fmt == "goat" else (path if isdir(path) else location.rsplit("/", 1)[0])
    try:
        found_items, found_users = discover_features(folder)
    except DataError as err:
        out.add(err)
        found_items, found_users = {}, {}
    item_src = {k: join(folder, v) for k, v in cfg.item_features.items()} or found_items
    user_src = {k: join(folder, v) for k, v in cfg.user_features.items()} or found_users
    item_feats = _load_side_features(item_src, out)
    user_feats = _load_side_features(user_src, out)

    if sp.user_ids is not None:
        n_users_ids, n_items_ids = len(sp.user_ids), len(sp.item_ids)
    else:
        n_users_ids = max(_max_id(sp.splits, "users"), sp.max_user) + 1
        n_items_ids = _max_id(sp.splits, "items") + 1
    n_users = _reconcile(sp, user_feats, user_src, "users", n_users_ids, out)
    n_items = _reconcile(sp, item_feats, item_src, "items", n_items_ids, out)

    if check_features:
        for feats, src in ((item_feats, item_src), (user_feats, user_src)):
            for name, arr in feats.items():
                try:
                    check_finite(basename(src[name]), arr)
                except DataError as err:
                    out.add(err)

    if cfg.feature_norm != "none":
        for feats in (item_feats, user_feats):
            for name in feats:
                feats[name] = normalize_features(feats[name], cfg.feature_norm)
        log.info("features normalised (%s) into memory: %s", cfg.feature_norm, ", ".join(
            f"{name} {tuple(a.shape)}" for feats in (item_feats, user_feats) for name, a in feats.items()) or "none")

    duplicates = {s: count_duplicates(v.users, v.items, max(n_items, 1)) for s, v in sp.splits.items()}
    for s, d in duplicates.items():
        if d:
            log.warning("%s split: %d duplicate (user, item) pairs kept", s, d)
    dtype = smallest_int_dtype(max(n_users, n_items))
    splits = {s: Interactions(v.users.astype(dtype, copy=False), v.items.astype(dtype, copy=False))
              for s, v in sp.splits.items()}
    ds = RecDataset(n_users=n_users, n_items=n_items, splits=splits, item_features=item_feats,
                    user_features=user_feats, user_ids=sp.user_ids, item_ids=sp.item_ids,
                    duplicates=duplicates, source=f"{fmt}:{location}")
    log.info("dataset %s: %d users, %d items, %s interactions%s", ds.source, n_users, n_items,
             " / ".join(f"{k} {len(v)}" for k, v in splits.items()),
             "".join(f", item '{k}' {tuple(v.shape)} {v.dtype}" for k, v in item_feats.items())
             + "".join(f", user '{k}' {tuple(v.shape)} {v.dtype}" for k, v in user_feats.items()))
    return ds, out.errors


def load_dataset(cfg: DataConfig, *, check_features: bool = True) -> RecDataset:
    """Read, check and return the dataset that ``cfg`` names (see the module docstring).

    ``check_features=False`` skips the NaN/Inf scan of feature matrices (it streams every row).
    Raises DataError (``FILE:LINE: what is wrong``) at the first defect."""
    ds, _ = _load(cfg, collect=False, check_features=check_features)
    assert ds is not None
    return ds


def check_dataset(cfg: DataConfig) -> tuple[RecDataset | None, list[DataError]]:
    """Like ``load_dataset`` but collects every defect it can reach instead of raising the first.
    The dataset is None when nothing could be read; otherwise it is returned even with errors."""
    return _load(cfg, collect=True)
