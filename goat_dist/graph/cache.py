"""On-disk cache of built graphs, keyed by a content hash of their inputs and parameters.

Layout: ``<cache_dir>/<kind>/<hash>/{indptr,indices[,values]}.npy`` plus ``meta.json`` (written
last). A directory is first written under a temporary name next to its final place and then
renamed, so a reader never sees a half-written entry under the final name; an entry that is still
incomplete or inconsistent (missing/truncated file, wrong shapes, other format version) is logged,
removed and rebuilt. Hits are memory-mapped (copy-on-write: pages are shared and loaded lazily,
writes never reach the file). Entries are immutable once renamed into place: replacing one unlinks
its files, which leaves existing mappings valid; truncating a mapped file in place would not.

The key hashes (blake2b) every part of ``key_parts`` -- arrays by their dtype, shape and bytes,
streamed in chunks (a memmap is read from its file chunk by chunk, never loaded whole) -- together
with ``kind`` and ``GRAPH_CACHE_VERSION``. Bump the version when a builder's output changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger

log = get_logger(__name__)

GRAPH_CACHE_VERSION = "graph-cache-1"
"""Part of every key and of every entry's meta.json; bumping it invalidates all cached graphs."""

HASH_CHUNK_BYTES = 1 << 26


def _update_array(h: "hashlib._Hash", a: np.ndarray) -> None:
    h.update(f"ndarray|{a.dtype.str}|{a.shape}|".encode())
    if a.ndim == 0:
        h.update(np.ascontiguousarray(a).tobytes())
        return
    row_bytes = max(1, a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
    step = max(1, HASH_CHUNK_BYTES // row_bytes)
    for s in range(0, a.shape[0], step):
        h.update(memoryview(np.ascontiguousarray(a[s:s + step])).cast("B"))


def _update(h: "hashlib._Hash", part: Any) -> None:
    if isinstance(part, torch.Tensor):
        t = part.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
            t = t.view(torch.int16)
        h.update(f"tensor|{part.dtype}|".encode())
        _update_array(h, t.numpy())
    elif isinstance(part, np.ndarray):
        _update_array(h, part)
    elif isinstance(part, dict):
        h.update(b"dict{")
        for key in sorted(part, key=str):
            _update(h, str(key))
            _update(h, part[key])
        h.update(b"}")
    elif isinstance(part, (list, tuple)):
        h.update(f"{type(part).__name__}[{len(part)}]".encode())
        for p in part:
            _update(h, p)
    elif part is None or isinstance(part, (str, int, float, bool, np.generic)):
        h.update(f"{type(part).__name__}:{part!r};".encode())
    else:
        raise TypeError(f"cannot hash a cache key part of type {type(part).__name__}")


def content_hash(*parts: Any) -> str:
    """Hex blake2b digest of ``parts`` (arrays, tensors, memmaps, scalars, strings, lists, dicts).

    Equal content gives equal hashes regardless of container (a memmap and an in-memory copy of it
    hash alike); a different dtype, shape, value or parameter gives a different hash."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        _update(h, p)
    return h.hexdigest()


def save_csr(csr: CSR, directory: str | Path, meta: dict | None = None) -> None:
    """Write ``csr`` as .npy files plus ``meta.json`` into ``directory`` (created; not atomic --
    ``cached`` writes into a temporary directory and renames it)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "indptr.npy", csr.indptr.cpu().numpy())
    np.save(d / "indices.npy", csr.indices.cpu().numpy())
    if csr.values is not None:
        np.save(d / "values.npy", csr.values.cpu().numpy())
    info = dict(meta or {})
    info.update(version=GRAPH_CACHE_VERSION, n_rows=csr.n_rows, n_cols=csr.n_cols, nnz=csr.nnz,
                has_values=csr.values is not None)
    with open(d / "meta.json", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _load_npy(path: Path, shape: tuple[int, ...], dtypes: tuple[np.dtype, ...]) -> torch.Tensor:
    arr = np.load(path, mmap_mode="c") if shape[0] else np.load(path)
    if arr.shape != shape or arr.dtype not in dtypes:
        raise ValueError(f"{path.name}: expected shape {shape}, dtype in {[str(t) for t in dtypes]}, "
                         f"got {arr.shape} {arr.dtype}")
    return torch.from_numpy(arr)


def load_csr(directory: str | Path, expect: dict | None = None) -> CSR:
    """Load a CSR written by ``save_csr`` (memory-mapped). Raises ValueError/OSError when the entry
    is incomplete or inconsistent, or when a ``meta.json`` field differs from ``expect``."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    if meta.get("version") != GRAPH_CACHE_VERSION:
        raise ValueError(f"format version {meta.get('version')!r} != {GRAPH_CACHE_VERSION!r}")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise ValueError(f"meta.json {key}={meta.get(key)!r}, expected {value!r}")
    n_rows, nnz = int(meta["n_rows"]), int(meta["nnz"])
    indptr = _load_npy(d / "indptr.npy", (n_rows + 1,), (np.dtype(np.int64),))
    indices = _load_npy(d / "indices.npy", (nnz,), (np.dtype(np.int32), np.dtype(np.int64)))
    values = _load_npy(d / "values.npy", (nnz,), (np.dtype(np.float32),)) if meta["has_values"] else None
    if int(indptr[0]) != 0 or int(indptr[-1]) != nnz:
        raise ValueError(f"indptr spans [{int(indptr[0])}, {int(indptr[-1])}], expected [0, {nnz}]")
    return CSR(indptr, indices, int(meta["n_cols"]), values)


def cache_path(cache_dir: str | Path, kind: str, key_parts: Any) -> Path:
    """Directory of the entry for (``kind``, ``key_parts``)."""
    return Path(cache_dir) / kind / content_hash(GRAPH_CACHE_VERSION, kind, key_parts)


def cached(cache_dir: str | Path | None, kind: str, key_parts: Any, build_fn: Callable[[], CSR]) -> CSR:
    """Return the CSR cached for (``kind``, ``key_parts``), or build it with ``build_fn()``, store it
    atomically and return it (memory-mapped from the new entry). ``cache_dir`` None or empty
    disables caching. Concurrent builders of one key both succeed; the first rename wins."""
    if not cache_dir:
        return build_fn()
    final = cache_path(cache_dir, kind, key_parts)
    expect = {"kind": kind, "key": final.name}
    if final.exists():
        try:
            csr = load_csr(final, expect)
            log.info("graph cache hit: %s %s", kind, final)
            return csr
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            log.warning("graph cache entry %s is unusable (%s); rebuilding", final, exc)
            shutil.rmtree(final, ignore_errors=True)
    log.info("graph cache miss: %s %s; building", kind, final)
    csr = build_fn()
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        save_csr(csr, tmp, expect)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            log.info("graph cache: %s was written concurrently; using that entry", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_csr(final, expect)
