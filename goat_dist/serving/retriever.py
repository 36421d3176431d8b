"""``Retriever``: top-K recommendation from a serving bundle (``goat export``).

    retriever = Retriever.load("exports/run1")
    item_ids, scores = retriever.recommend(["u17", "u3"], k=20)          # original ids in and out
    item_ids, scores = retriever.recommend(["u17"], k=20, exact=False)   # through the FAISS index
    reps = retriever.embed_items({"image": img [n, 64], "text": txt [n, 48]})   # cold-start items

Design choices:
- Exact retrieval is the evaluation's own ranking: ``user_reps[u] @ item_reps.T`` in float32 torch,
  the user's training items set to -inf with ``eval.metrics.csr_rows_coo``, then ``torch.topk`` —
  the same operations as ``Trainer._scorer`` + ``metric_sums``, so the top-K lists are identical
  (tested against the trainer).
- Approximate retrieval searches the FAISS inner-product index for ``k + (the batch's largest number
  of training items)`` candidates, so that k remain after the exclusion whatever the index returns
  (IndexFlatIP is exact; IVF trades recall for speed through ``nprobe``).
- A row with fewer than k recommendable items (a user who trained on nearly the whole catalogue, or
  an IVF search that found too few) is padded with score -inf and item id -1 (integer ids) or None
  (string ids).
- Unknown user ids are errors naming them; nothing is silently skipped.

**Shapes:** recommend(user_ids [n], k) -> (item_ids [n, k], scores [n, k] float32).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from goat_dist.data.table import read_id_map
from goat_dist.eval.metrics import csr_rows_coo
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger
from goat_dist.serving import cold_start
from goat_dist.serving.bundle import (COLD_START, EMBEDDINGS, FAISS_INDEX, IDENTITY, TRAIN_ITEMS, BundleError,
                                      load_tensors, read_file, read_manifest)

log = get_logger(__name__)


class _IdMap:
    """Original id <-> contiguous index for one side (users or items)."""

    def __init__(self, what: str, n: int, ids: list[str] | None):
        self.what, self.n = what, n
        self.ids = None if ids is None else np.asarray(ids, dtype=object)
        self.index = None if ids is None else {v: k for k, v in enumerate(ids)}

    def to_index(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Contiguous indices [n] of original ids; KeyError naming every unknown one (up to 5)."""
        arr = np.asarray(values)
        if self.index is None and arr.dtype.kind in "iu":  # integer ids: vectorised
            out = arr.reshape(-1).astype(np.int64)
            bad = (out < 0) | (out >= self.n)
            if bad.any():
                self._unknown(out[bad].tolist())
            return out
        values = list(arr.astype(object).reshape(-1))
        out = np.empty(len(values), dtype=np.int64)
        unknown = []
        for k, v in enumerate(values):
            if self.index is not None:
                idx = self.index.get(str(v))
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                idx = int(v)
            elif isinstance(v, str) and v.strip().isdigit():  # integer ids given as text
                idx = int(v)
            else:
                idx = None
            if idx is None or not 0 <= idx < self.n:
                unknown.append(v)
            else:
                out[k] = idx
        if unknown:
            self._unknown(unknown)
        return out

    def _unknown(self, unknown: list) -> None:
        shown = ", ".join(repr(v) for v in unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise KeyError(f"unknown {self.what} id(s): {shown}; the export knows {self.n} {self.what}s"
                       + (f" (ids 0..{self.n - 1})" if self.index is None else ""))

    def to_original(self, index: np.ndarray) -> np.ndarray:
        """Original ids of ``index`` (any shape); -1 marks padding and maps to -1 / None."""
        if self.ids is None:
            return index.astype(np.int64, copy=True)
        out = np.full(index.shape, None, dtype=object)
        valid = index >= 0
        out[valid] = self.ids[index[valid]]
        return out


class Retriever:
    """Top-K retrieval and cold-start item embedding over one verified serving bundle."""

    def __init__(self, manifest: dict[str, Any], user_reps: np.ndarray, item_reps: np.ndarray, train: CSR,
                 users: _IdMap, items: _IdMap, cold: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None,
                 index: Any = None):
        self.manifest = manifest
        self.user_reps = torch.from_numpy(user_reps)
        self.item_reps = torch.from_numpy(item_reps)
        self._item_t = self.item_reps.t().contiguous()
        self.train = train
        self._train_deg = train.degrees()
        self._users, self._items = users, items
        self._cold = cold
        self.index = index

    # ------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, url: str, *, load_index: bool = True) -> "Retriever":
        """Read and verify the bundle at ``url`` (local path or fsspec URL). Every file's sha256 is
        checked against the manifest and every tensor's shape against the manifest's dimensions;
        any mismatch raises ``BundleError`` naming the file."""
        manifest = read_manifest(url)
        dims = manifest["model"]
        try:
            n_users, n_items, d = int(dims["n_users"]), int(dims["n_items"]), int(dims["dim"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{url}/manifest.json: model needs integer n_users, n_items, dim ({exc})") from None
        emb = load_tensors(url, EMBEDDINGS, manifest, {"user": ((n_users, d), ("float32",)),
                                                       "item": ((n_items, d), ("float32",))})
        tr = load_tensors(url, TRAIN_ITEMS, manifest, {"indptr": ((n_users + 1,), ("int64",)),
                                                       "indices": ((None,), ("int32", "int64"))})
        indptr, indices = tr["indptr"], tr["indices"]
        if (indptr[0] != 0 or indptr[-1] != indices.shape[0] or (np.diff(indptr) < 0).any()
                or (indices.size and (indices.min() < 0 or indices.max() >= n_items))):
            raise BundleError(f"{url}/{TRAIN_ITEMS}: not a valid CSR over {n_users} users x {n_items} items")
        train = CSR(torch.from_numpy(indptr), torch.from_numpy(indices), n_items)

        id_maps = {}
        for side, n in (("user", n_users), ("item", n_items)):
            spec = manifest["ids"].get(side)
            if spec == IDENTITY:
                id_maps[side] = _IdMap(side, n, None)
                continue
            if not isinstance(spec, str):
                raise BundleError(f"{url}/manifest.json: ids.{side} must be {IDENTITY!r} or a file name, got {spec!r}")
            read_file(url, spec, manifest)  # verify the checksum before trusting the parser
            ids = read_id_map(f"{url.rstrip('/')}/{spec}")
            if len(ids) != n:
                raise BundleError(f"{url}/{spec}: {len(ids)} ids, the manifest says {n} {side}s")
            id_maps[side] = _IdMap(side, n, ids)

        cold = None
        meta = manifest.get("cold_start")
        if meta:
            cold_start.check_meta(meta, f"{url}/manifest.json")
            cold = (load_tensors(url, COLD_START, manifest, cold_start.expected_tensors(meta)), meta)

        index = None
        faiss_meta = manifest.get("faiss")
        if faiss_meta and load_index:
            import faiss

            raw = read_file(url, FAISS_INDEX, manifest)
            index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            if index.ntotal != n_items or index.d != d:
                raise BundleError(f"{url}/{FAISS_INDEX}: index over {index.ntotal} x {index.d}, expected {n_items} x {d}")
            if hasattr(index, "nprobe") and "nprobe" in faiss_meta:
                index.nprobe = int(faiss_meta["nprobe"])
        log.info("serving bundle %s: %d users, %d items, d=%d%s%s", url, n_users, n_items, d,
                 ", cold-start" if cold else "", f", faiss {faiss_meta['kind']}" if index is not None else "")
        return cls(manifest, emb["user"], emb["item"], train, id_maps["user"], id_maps["item"], cold, index)

    # ------------------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.user_reps.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_reps.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_reps.shape[1])

    def user_index(self, user_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Contiguous indices [n] of original user ids; KeyError naming any unknown id."""
        return self._users.to_index(user_ids)

    def item_index(self, item_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Contiguous indices [n] of original item ids; KeyError naming any unknown id."""
        return self._items.to_index(item_ids)

    def item_ids(self, index: np.ndarray) -> np.ndarray:
        """Original item ids of contiguous indices (any shape; -1 -> -1 / None)."""
        return self._items.to_original(np.asarray(index))

    # ------------------------------------------------------------------------------------------
    def recommend(self, user_ids: Sequence[Any] | np.ndarray, k: int, exact: bool = True,
                  batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per user, the user's training items excluded.

        Args:
            user_ids: original user ids (ints for integer-id datasets, strings otherwise).
            k: list length, 1 <= k <= n_items.
            exact: matmul + topk over all items (True) or the FAISS index (False; needs an index).
            batch_size: users scored per matrix product.

        Returns ``(item_ids [n, k], scores [n, k] float32)``, best first, original item ids.
        """
        if not 1 <= int(k) <= self.n_items:
            raise ValueError(f"k must be in [1, {self.n_items}], got {k}")
        k = int(k)
        users = torch.from_numpy(self.user_index(user_ids))
        if not exact and self.index is None:
            raise ValueError("exact=False needs a FAISS index: export with --faiss")
        top = np.empty((users.numel(), k), dtype=np.int64)
        scores = np.empty((users.numel(), k), dtype=np.float32)
        for s in range(0, users.numel(), batch_size):
            ub = users[s:s + batch_size]
            t, v = self._exact(ub, k) if exact else self._approximate(ub, k)
            top[s:s + ub.numel()], scores[s:s + ub.numel()] = t, v
        return self._items.to_original(top), scores

    def _exact(self, ub: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = (self.user_reps[ub] @ self._item_t).float()
        pos, cols = csr_rows_coo(self.train, ub)
        scores[pos, cols] = -torch.inf
        val, idx = torch.topk(scores, k, dim=1)
        idx = idx.numpy().copy()
        val = val.numpy()
        idx[~np.isfinite(val)] = -1
        return idx, val

    def _approximate(self, ub: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        fetch = min(self.n_items, k + int(self._train_deg[ub].max()) if ub.numel() else k)
        dist, cand = self.index.search(np.ascontiguousarray(self.user_reps[ub].numpy()), fetch)
        # drop the user's training items (and FAISS's -1 "no result"): membership via sorted pair keys
        pos, cols = csr_rows_coo(self.train, ub)
        train_keys = np.sort(pos.numpy() * self.n_items + cols.numpy())
        keys = np.arange(ub.numel())[:, None] * self.n_items + cand
        hit = np.searchsorted(train_keys, keys)
        is_train = (hit < train_keys.size) & (train_keys[np.minimum(hit, max(train_keys.size - 1, 0))] == keys) \
            if train_keys.size else np.zeros_like(keys, dtype=bool)
        keep = (cand >= 0) & ~is_train
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept candidates first, in FAISS order
        idx = np.take_along_axis(cand, order, 1)
        val = np.take_along_axis(dist, order, 1).astype(np.float32)
        kept = np.take_along_axis(keep, order, 1)
        idx[~kept], val[~kept] = -1, -np.inf
        return idx, val

    # ------------------------------------------------------------------------------------------
    def embed_items(self, features: Mapping[str, Any], calibrated: bool = False) -> np.ndarray:
        """Representations [n, d] of NEW items from their modality features {m: [n, f_m]} alone
        (see ``serving.cold_start``); score them against ``user_reps`` like any item.

        ``calibrated=False``: the model's own computation for an item without interactions or graph
        neighbours. ``calibrated=True``: that times the export's least-squares scale onto the trained
        items (manifest ``cold_start.calibration_scale``), so new items sit on the catalogue's
        scale instead of the modality views' (the trade-off is measured in
        ``benchmarks/results/cold_start.json``)."""
        if self._cold is None:
            raise BundleError(cold_start.NO_PARAMS)
        params, meta = self._cold
        out = cold_start.embed_items(params, meta, features)
        if calibrated:
            out = out * np.float32(meta["calibration_scale"])
        return out

    def user_vectors(self, user_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Scoring representations [n, d] of original user ids."""
        return self.user_reps[torch.from_numpy(self.user_index(user_ids))].numpy()
