"""k-nearest-neighbour graphs: item-item per modality (cosine), user-user from preference embeddings
(cosine) or from co-interaction counts.

Design choices:
- Never an N x N matrix. Cosine kNN computes ``R x N`` similarities for a block of ``R`` rows at a
  time (``R = min(block_size, max_block_bytes / (4 N))``), on CUDA when available.
- Top-k per block without a full ``topk`` over every row: columns are cut into groups of ``GROUP``;
  the ``k`` nearest neighbours lie inside the ``k`` groups with the largest maxima, so only those
  ``k * GROUP`` candidates are ranked. A row whose choice could depend on ties outside its
  candidates (checked exactly: the (k+1)-th group maximum must be below the k-th candidate) is
  redone over its full similarity row. The result is exact.
- Deterministic ties: among equal similarities the smaller column index wins, on every device and
  for every block size. A node is never its own kNN neighbour.
- All-zero feature rows: cosine with a zero vector is 0 (no NaN), so a zero row's neighbours are the
  k smallest other indices (all similarities tie at 0); a warning counts such rows.
- The graph is symmetrised (edge set = union of i->j and j->i) and gets self-loops, as GAT over an
  undirected kNN graph expects. CSR rows are destination nodes, columns their neighbours;
  ``values`` = cosine similarity (self-loops: 1) or co-interaction counts (self-loops: own degree).
- Cost: exact kNN is N^2 d multiply-adds (1M x 64: 6.4e13), GEMM-bound; measured on the shared
  2-core dev CPU at roughly 0.66-1 ms per row of 100k and 6.5 ms per row of 1M (the full 1M x 64,
  k = 20 graph: 6,627 s, 6.4 GB peak RSS, 2 threads beside another job) -- use ``device="cuda"`` (or
  ``auto`` on a GPU machine) at that scale, or the ``ivf`` backend.
- Backends (``knn_graph(..., backend=)``): ``exact`` is the blockwise torch path above (the
  reference; deterministic ties); ``faiss_flat`` is exact too (faiss ``IndexFlatIP``: BLAS inner
  products and a heap top-k; ties may break differently; measured only ~1.3-2x faster than
  ``exact`` on the shared CPU, so 1M rows is still hours); ``ivf`` is approximate (faiss
  ``IndexIVF``, inner product on unit rows: k-means coarse quantiser with ``nlist`` lists trained
  on a seeded row sample, ``nprobe`` lists scanned per query; an ``hnsw`` quantiser when a flat
  assignment over ``nlist`` centroids costs too much (tens of millions of rows); ``SQfp16``
  storage halves the index). ``auto`` = ``exact`` up to ``exact_max_rows`` rows, ``ivf`` above.
  The faiss paths read the features ``READ_ROWS`` rows at a time (no full float32 copy besides
  the index itself) and build the CSR from a stream of edge chunks (no concatenated edge arrays).
- Edge values: ``exact`` recomputes every edge from the unit rows in one fixed order (exactly
  symmetric); the faiss paths keep the search similarity (float32 inner product of unit rows,
  fp16-rounded with ``SQfp16``) and stay exactly symmetric by stream order: an unordered pair
  carries the value found by its smaller endpoint when it found the other (``_edge_stream``).
- Co-interaction user graph: for each user the k users sharing the most train items (ties: smaller
  user id), from sparse products A[block] @ A^T expanded as (user, item, other user) pairs for a
  block of users at a time (``pair_budget`` pairs), never a dense U x U.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from goat_dist.graph.csr import CSR, index_dtype
from goat_dist.graph.ui import UserItemGraph
from goat_dist.log import get_logger, progress

log = get_logger(__name__)

GROUP = 64
"""Columns per group in the pruned top-k (a group maximum is one cheap reduction pass)."""

READ_ROWS = 1 << 16
"""Feature rows read (and converted to float32) at a time from a possibly memory-mapped matrix."""

BACKENDS = ("auto", "exact", "faiss_flat", "ivf")


@dataclass(kw_only=True, slots=True)
class IVFParams:
    """Parameters of the ``ivf`` backend (faiss ``IndexIVF``, inner product on unit rows).

    ``nlist`` lists (0 = ``round(4 sqrt(N))``, at most N / 8), ``nprobe`` lists scanned per query,
    k-means on ``train_per_list * nlist`` sampled rows (seed ``seed``) for ``niter`` iterations,
    ``quantizer`` ``flat`` (exact coarse assignment: N * nlist * d work) or ``hnsw`` (HNSW32 graph
    over the centroids: for N in the tens of millions), ``codec`` ``Flat`` (float32 rows) or
    ``SQfp16`` (half the memory; candidate order from fp16 rows, final values recomputed exactly)."""

    nlist: int = 0
    nprobe: int = 8
    train_per_list: int = 32
    niter: int = 10
    quantizer: str = "flat"
    codec: str = "Flat"
    seed: int = 0

    def resolved_nlist(self, n: int) -> int:
        nlist = self.nlist or int(round(4 * math.sqrt(max(n, 1))))
        return max(1, min(nlist, n // 8 if n >= 8 else 1))

    def key(self, n: int) -> dict:
        """The parameters that change the graph (for the cache key)."""
        return {"nlist": self.resolved_nlist(n), "nprobe": self.nprobe, "train_per_list": self.train_per_list,
                "niter": self.niter, "quantizer": self.quantizer, "codec": self.codec, "seed": self.seed}


def resolve_backend(backend: str, n: int, exact_max_rows: int = 100_000) -> str:
    """``auto`` -> ``exact`` for ``n <= exact_max_rows`` else ``ivf``; other names as given."""
    if backend not in BACKENDS:
        raise ValueError(f"graph.knn_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "exact" if n <= exact_max_rows else "ivf"
    return backend


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``/``cuda``/``cuda:1`` as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"graph device {device!r} requested but CUDA is not available")
    return dev


def normalized_rows(features: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
                    pad_to: int = 1, row_offset: int = 0) -> torch.Tensor:
    """Rows scaled to unit L2 norm, float32 on ``device``; all-zero rows stay zero.

    ``features`` [N, d] (float16/float32, numpy, memmap or tensor) is read ``READ_ROWS`` rows at a
    time (``row_offset``: index of its first row in a larger matrix, for error messages). The
    result has ``ceil(N / pad_to) * pad_to`` rows: the padding rows are zero.

    **Shape:** [N_padded, d] float32.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [N, d], got shape {tuple(features.shape)}")
    n, d = int(features.shape[0]), int(features.shape[1])
    n_pad = -(-n // pad_to) * pad_to if n else 0
    out = torch.zeros(n_pad, d, dtype=torch.float32, device=device)
    for s in range(0, n, READ_ROWS):
        block = features[s:s + READ_ROWS]
        block = torch.as_tensor(np.asarray(block, dtype=np.float32)) if not isinstance(block, torch.Tensor) \
            else block.to(torch.float32)
        block = block.to(device)
        if not torch.isfinite(block).all():
            bad = s + int((~torch.isfinite(block)).any(1).nonzero()[0, 0])
            raise ValueError(f"features row {row_offset + bad}: NaN or Inf")
        norm = block.norm(dim=1, keepdim=True)
        out[s:s + block.shape[0]] = torch.where(norm > 0, block / norm.clamp(min=torch.finfo(torch.float32).tiny),
                                                torch.zeros_like(block))
    return out


def _select_topk(vals: torch.Tensor, cols: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic top-k of each row of ``vals`` [R, C] whose columns ``cols`` [R, C] (or [C])
    ascend along every row: all values above the k-th largest, then the tied ones with the smallest
    columns. Returns ``(cols [R, k], vals [R, k])``, ascending by column."""
    r = vals.shape[0]
    if cols.dim() == 1:
        cols = cols.expand(r, -1)
    top = torch.topk(vals, k, dim=1)
    kth = top.values[:, -1:]
    if bool(((vals >= kth).sum(1) == k).all()):  # no tie at the k-th value anywhere: topk's set is it
        idx = torch.sort(top.indices, dim=1).values
        return cols.gather(1, idx), vals.gather(1, idx)
    above = vals > kth
    need = k - above.sum(1, keepdim=True)
    tied = vals == kth
    sel = above | (tied & (torch.cumsum(tied, 1) <= need))
    return cols[sel].view(r, k), vals[sel].view(r, k)


def _block_topk(sim: torch.Tensor, k: int, skip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact deterministic top-k of similarity rows ``sim`` [R, N_padded] (padding columns and the
    diagonal set to -inf by the caller). Rows where ``skip`` [R] is true get an arbitrary answer
    (the caller overwrites them). Returns ``(cols [R, k] int64, vals [R, k])``."""
    r, n_pad = sim.shape
    device = sim.device
    groups = n_pad // GROUP
    if groups <= k + 1:  # small graphs: rank the whole rows
        return _select_topk(sim, torch.arange(n_pad, device=device), k)
    gmax = torch.amax(sim.view(r, groups, GROUP), dim=2)
    gtop = torch.topk(gmax, k + 1, dim=1)
    chosen = torch.sort(gtop.indices[:, :k], dim=1).values  # ascending groups -> ascending columns
    cand_cols = (chosen.unsqueeze(2) * GROUP + torch.arange(GROUP, device=device)).view(r, k * GROUP)
    cand_vals = sim.gather(1, cand_cols)
    cols, vals = _select_topk(cand_vals, cand_cols, k)
    # Exact unless a value outside the chosen groups could equal the k-th: the best such value is
    # at most the (k+1)-th group maximum.
    unsafe = gtop.values[:, k] >= vals.amin(1)
    if skip is not None:
        unsafe &= ~skip
    unsafe = unsafe.nonzero().flatten()
    if unsafe.numel():
        step = max(1, (1 << 24) // n_pad)  # bound the int64 cumsum of the full-row path
        for s in range(0, unsafe.numel(), step):
            rows = unsafe[s:s + step]
            c, v = _select_topk(sim[rows], torch.arange(n_pad, device=device), k)
            cols[rows], vals[rows] = c, v
    return cols, vals


def topk_neighbours(x: torch.Tensor, n: int, k: int, *, block_size: int = 8192, row_start: int = 0,
                    row_end: int | None = None, max_block_bytes: int | None = None,
                    show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k (excluding self) for rows ``[row_start, row_end)`` of ``x``.

    ``x`` [N_padded, d] float32 unit rows (from ``normalized_rows(..., pad_to=GROUP)``), ``n`` the
    real row count, ``k <= n - 1``. Similarities are formed ``R x N_padded`` at a time on ``x``'s
    device. Returns ``(cols [rows, k] int64 on CPU, sims [rows, k] float32 on CPU)``; each row's
    columns ascend."""
    row_end = n if row_end is None else row_end
    n_pad, _ = x.shape
    device = x.device
    if max_block_bytes is None:
        max_block_bytes = (1 << 32) if device.type == "cuda" else (1 << 29)
    rows_per_block = max(1, min(block_size, max_block_bytes // (4 * n_pad)))
    zero = x[:n].abs().amax(1) == 0 if n else torch.zeros(0, dtype=torch.bool, device=device)
    buf = torch.empty(rows_per_block, n_pad, dtype=torch.float32, device=device)
    out_cols = torch.empty(row_end - row_start, k, dtype=torch.int64)
    out_vals = torch.empty(row_end - row_start, k, dtype=torch.float32)
    starts = range(row_start, row_end, rows_per_block)
    for s in progress(starts, desc="kNN blocks", disable=None if show_progress else True):
        e = min(s + rows_per_block, row_end)
        r = e - s
        sim = torch.mm(x[s:e], x.T, out=buf[:r])
        ar = torch.arange(r, device=device)
        sim[ar, s + ar] = -math.inf
        sim[:, n:] = -math.inf
        cols, vals = _block_topk(sim, k, zero[s:e])
        zr = zero[s:e].nonzero().flatten()
        if zr.numel():  # every similarity of a zero row is exactly 0: the k smallest other ids
            base = torch.arange(k, device=device).expand(zr.numel(), k)
            cols[zr] = base + (base >= (s + zr).unsqueeze(1)).long()
            vals[zr] = 0.0
        out_cols[s - row_start:e - row_start] = cols.cpu()
        out_vals[s - row_start:e - row_start] = vals.cpu()
    return out_cols, out_vals


def _drop_self(ids: np.ndarray, sims: np.ndarray, first: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From ``k + 1`` results per query row (rows ``first, first+1, ...``), drop the row itself (or,
    when it is absent, the last result) and keep the other ``k`` in their order."""
    q = ids.shape[0]
    drop = ids == (np.arange(first, first + q, dtype=np.int64)[:, None])
    missing = ~drop.any(1)
    drop[missing, -1] = True
    first_drop = drop.argmax(1)  # duplicates of the query id (cannot happen) would keep only one dropped
    keep = np.ones_like(drop)
    keep[np.arange(q), first_drop] = False
    return ids[keep].reshape(q, k), sims[keep].reshape(q, k)


def _faiss_module(threads: int):
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a pinned dependency
        raise ImportError("graph.knn_backend faiss_flat/ivf needs faiss (pip install faiss-cpu)") from exc
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    return faiss


def _unit_rows_np(features: np.ndarray | torch.Tensor, s: int, e: int) -> np.ndarray:
    """Rows ``[s, e)`` of ``features`` as contiguous float32 unit rows (zero rows stay zero)."""
    return np.ascontiguousarray(normalized_rows(features[s:e], "cpu", row_offset=s).numpy())


def faiss_topk(features: np.ndarray | torch.Tensor, k: int, *, backend: str = "faiss_flat",
               ivf: IVFParams | None = None, query_rows: int = 1 << 14, threads: int = 1,
               show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k (excluding self) of every row of ``features`` with faiss.

    ``backend`` ``faiss_flat``: exact (``IndexFlatIP`` over unit rows). ``ivf``: approximate
    (``IndexIVF`` per ``ivf``). Rows are normalised ``READ_ROWS`` at a time and streamed into the
    index; queries run ``query_rows`` at a time with ``k + 1`` results, the row itself dropped.
    An ``ivf`` query whose probed lists hold fewer than ``k`` other rows gets fewer neighbours:
    its missing slots are -1 (counted and logged by ``knn_graph``).

    **Returns:** ``(cols [N, k] int32/int64 (``index_dtype(N)``; -1 = none), sims [N, k] float32)``,
    each row by decreasing similarity.
    """
    faiss = _faiss_module(threads)
    n, d = int(features.shape[0]), int(features.shape[1])
    ivf = ivf or IVFParams()
    t0 = time.perf_counter()
    if backend == "faiss_flat":
        index = faiss.IndexFlatIP(d)
    elif backend == "ivf":
        if ivf.quantizer not in ("flat", "hnsw") or ivf.codec not in ("Flat", "SQfp16"):
            raise ValueError(f"ivf quantizer must be flat|hnsw and codec Flat|SQfp16, got "
                             f"{ivf.quantizer!r} / {ivf.codec!r}")
        nlist = ivf.resolved_nlist(n)
        q = f"IVF{nlist}" + ("_HNSW32" if ivf.quantizer == "hnsw" else "")
        index = faiss.index_factory(d, f"{q},{ivf.codec}", faiss.METRIC_INNER_PRODUCT)
        ivf_index = faiss.extract_index_ivf(index)
        ivf_index.cp.niter = ivf.niter
        ivf_index.cp.seed = ivf.seed
        n_train = min(n, max(ivf.train_per_list * nlist, nlist))
        ivf_index.cp.max_points_per_centroid = max(1, -(-n_train // nlist))  # no further subsampling
        rng = np.random.default_rng(ivf.seed)
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
        train = np.concatenate([_unit_rows_np(features[sample[s:s + READ_ROWS]], 0, len(sample[s:s + READ_ROWS]))
                                for s in range(0, n_train, READ_ROWS)]) if n_train else np.zeros((0, d), np.float32)
        index.train(train)
        del train
        ivf_index.nprobe = min(ivf.nprobe, nlist)
        if ivf.quantizer == "hnsw":
            faiss.downcast_index(ivf_index.quantizer).hnsw.efSearch = max(16, 2 * ivf.nprobe)
        log.info("kNN ivf: %d lists, nprobe %d, trained on %d rows in %.1fs", nlist, ivf_index.nprobe, n_train,
                 time.perf_counter() - t0)
    else:
        raise ValueError(f"faiss_topk backend must be faiss_flat or ivf, got {backend!r}")
    for s in range(0, n, READ_ROWS):
        index.add(_unit_rows_np(features, s, min(n, s + READ_ROWS)))
    t_add = time.perf_counter()
    kq = min(k + 1, n)
    cols = torch.empty(n, k, dtype=index_dtype(n))
    sims = torch.empty(n, k, dtype=torch.float32)
    starts = range(0, n, query_rows)
    for s in progress(starts, desc=f"kNN {backend}", disable=None if show_progress else True):
        e = min(n, s + query_rows)
        dist, ids = index.search(_unit_rows_np(features, s, e), kq)
        ids, dist = _drop_self(ids, dist, s, kq - 1)
        if kq - 1 < k:  # k >= n: pad (knn_graph caps k, direct callers get -1 slots)
            ids = np.concatenate([ids, np.full((e - s, k - kq + 1), -1, ids.dtype)], 1)
            dist = np.concatenate([dist, np.zeros((e - s, k - kq + 1), dist.dtype)], 1)
        cols[s:e] = torch.from_numpy(ids)
        sims[s:e] = torch.from_numpy(dist)
    del index
    log.info("kNN %s: %d rows, k=%d: index %.1fs, search %.1fs", backend, n, k, t_add - t0,
             time.perf_counter() - t_add)
    return cols, sims


def _edge_stream(cols: torch.Tensor, vals: torch.Tensor, n: int, *, symmetrize: bool, self_loops: bool,
                 self_values: torch.Tensor | None, with_values: bool, rows_per_chunk: int):
    """``chunks()`` for ``CSR.from_edge_chunks``: the kNN edges ``i -> cols[i, j]`` (slots < 0
    skipped), their reverses, then self-loops; int32/int64 ids per ``index_dtype(n)``.

    Symmetrised with values, the stream makes the merged graph exactly symmetric without
    recomputing anything: the CSR keeps the FIRST value of a repeated (row, col), so the edges
    found by their smaller endpoint (query i < neighbour j) come first, both ways, then the rest:
    an unordered pair found from both sides carries i's value in both rows, one found from one
    side only carries that side's value in both."""
    idx = index_dtype(n)
    k = cols.shape[1]
    passes = (("lt", False), ("lt", True), ("ge", False), ("ge", True)) if symmetrize else (("all", False),)

    def chunks():
        for which, reverse in passes:
            for s in range(0, n, rows_per_chunk):
                e = min(n, s + rows_per_chunk)
                c = cols[s:e].reshape(-1)
                r = torch.arange(s, e, dtype=idx).repeat_interleave(k)
                v = vals[s:e].reshape(-1) if with_values else None
                ok = c >= 0
                if which == "lt":
                    ok &= r < c
                elif which == "ge":
                    ok &= r >= c
                if not bool(ok.all()):
                    r, c = r[ok], c[ok]
                    v = None if v is None else v[ok]
                c = c.to(idx)
                yield (c, r, v) if reverse else (r, c, v)
        if self_loops:
            for s in range(0, n, rows_per_chunk * max(k, 1)):
                e = min(n, s + rows_per_chunk * max(k, 1))
                ids = torch.arange(s, e, dtype=idx)
                v = None
                if with_values:
                    v = self_values[s:e] if self_values is not None else torch.ones(e - s, dtype=torch.float32)
                yield ids, ids, v

    return chunks


def _symmetric_graph(src: torch.Tensor, dst: torch.Tensor, vals: torch.Tensor, n: int, *, symmetrize: bool,
                     self_loops: bool, self_values: torch.Tensor | None, with_values: bool) -> CSR:
    """CSR (rows = dst) of the edges ``src -> dst`` (plus reverses and self-loops when asked)."""
    idx = index_dtype(n)
    rows, cols, values = [src.to(idx)], [dst.to(idx)], [vals]
    if symmetrize:
        rows.append(dst.to(idx))
        cols.append(src.to(idx))
        values.append(vals)
    if self_loops:
        ids = torch.arange(n, dtype=idx)
        rows.append(ids)
        cols.append(ids)
        values.append(self_values if self_values is not None else torch.ones(n, dtype=torch.float32))
    return CSR.from_edges(torch.cat(rows), torch.cat(cols), n, n,
                          torch.cat(values).to(torch.float32) if with_values else None)


def _recompute_cosines(graph: CSR, x: torch.Tensor, dev: torch.device) -> None:
    """Overwrite ``graph.values`` with ``sum(x_i * x_j)`` per edge from the unit rows ``x``, summed in
    one fixed order (exactly symmetric: i->j and j->i get the same bits), self-loops 1."""
    d = int(x.shape[1])
    pos = 0
    for r, c, _ in graph.edge_chunks(max(1, (1 << 24) // max(1, d))):
        r, c = r.to(dev), c.to(dev, torch.int64)
        v = (x[r] * x[c]).sum(1)
        graph.values[pos:pos + r.numel()] = torch.where(r == c, torch.ones_like(v), v).cpu()
        pos += r.numel()


def _self_loop_positions(graph: CSR) -> torch.Tensor:
    """Positions in ``graph.indices`` of the edges r -> r, int64."""
    out = []
    pos = 0
    for r, c, _ in graph.edge_chunks():
        out.append(pos + (r == c.to(torch.int64)).nonzero().flatten())
        pos += r.numel()
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _count_zero_rows(features: np.ndarray | torch.Tensor) -> int:
    """All-zero rows of ``features``; raises ValueError naming the first row with NaN/Inf. Reads
    ``READ_ROWS`` rows at a time."""
    n, zero = int(features.shape[0]), 0
    for s in range(0, n, READ_ROWS):
        block = features[s:s + READ_ROWS]
        block = block.to("cpu", torch.float32) if isinstance(block, torch.Tensor) else \
            torch.from_numpy(np.asarray(block, dtype=np.float32))
        finite = torch.isfinite(block).all(1)
        if not bool(finite.all()):
            raise ValueError(f"features row {s + int((~finite).nonzero()[0, 0])}: NaN or Inf")
        zero += int((block.abs().amax(1) == 0).sum()) if block.shape[1] else block.shape[0]
    return zero


def knn_graph(features: np.ndarray | torch.Tensor, k: int, *, block_size: int = 8192,
              device: str | torch.device = "auto", symmetrize: bool = True, self_loops: bool = True,
              with_values: bool = True, max_block_bytes: int | None = None, backend: str = "exact",
              ivf: IVFParams | None = None, exact_max_rows: int = 100_000, threads: int = 1,
              timings: dict | None = None) -> CSR:
    """Cosine kNN graph over the rows of ``features``.

    ``features`` [N, d] float16/float32 (numpy array, memmap read block by block, or tensor). For
    every row i the k rows j != i with the largest ``cos(x_i, x_j)`` (``exact``: ties -> smaller
    j; ``faiss_flat``: exact up to ties; ``ivf``: approximate, see ``IVFParams``; ``auto``: exact
    up to ``exact_max_rows`` rows, else ivf), then edges i->j, their reverses (``symmetrize``) and
    i->i (``self_loops``), duplicates merged. ``k`` is capped at N - 1. ``threads``: faiss OpenMP
    threads (faiss backends; 0 = faiss's default). ``timings``: if given, receives ``search_s`` and
    ``graph_s`` (seconds of the top-k search and of the CSR build).

    **Returns:** CSR [N, N], rows = destination node, columns = neighbours (ascending), ``values``
    [nnz] float32 cosine similarity (self-loops 1.0) when ``with_values``.
    """
    n = int(features.shape[0])
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [N, d], got shape {tuple(features.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, max(n - 1, 0))
    backend = resolve_backend(backend, n, exact_max_rows)
    dev = resolve_device(device)
    t0 = time.perf_counter()
    x = None
    if backend == "exact":
        x = normalized_rows(features, dev, pad_to=GROUP)
        n_zero = int((x[:n].abs().amax(1) == 0).sum()) if n else 0
        if k > 0:
            cols, vals = topk_neighbours(x, n, k, block_size=block_size, max_block_bytes=max_block_bytes)
        else:
            cols, vals = torch.zeros(n, 0, dtype=torch.int64), torch.zeros(n, 0)
    else:
        n_zero = _count_zero_rows(features)
        if k > 0:
            cols, vals = faiss_topk(features, k, backend=backend, ivf=ivf, threads=threads)
        else:
            cols, vals = torch.zeros(n, 0, dtype=index_dtype(n)), torch.zeros(n, 0)
        short = int((cols < 0).any(1).sum())
        if short:
            log.warning("kNN %s: %d of %d rows found fewer than k=%d neighbours in their probed lists "
                        "(%d empty slots); raise graph.knn_nprobe", backend, short, n, k, int((cols < 0).sum()))
    if n_zero:
        log.warning("kNN: %d of %d feature rows are all zero; their cosine similarities are 0 and their "
                    "neighbours are %s", n_zero, n,
                    "the lowest other ids" if backend == "exact" else "arbitrary (ties)")
    t_search = time.perf_counter()
    n_edges = int((cols >= 0).sum())
    nnz_in = n_edges * (2 if symmetrize else 1) + (n if self_loops else 0)
    stream = _edge_stream(cols, vals, n, symmetrize=symmetrize, self_loops=self_loops, self_values=None,
                          with_values=with_values, rows_per_chunk=max(1, (1 << 22) // max(k, 1)))
    graph = CSR.from_edge_chunks(stream, n, n, nnz_in, with_values)
    del cols, vals
    if with_values and graph.nnz and x is not None:
        # exact path: i->j and j->i were possibly computed in different blocks (last-bit differences);
        # recompute every edge from the unit rows in one fixed order, which is exactly symmetric
        _recompute_cosines(graph, x, dev)
    elif with_values and graph.nnz:
        # faiss paths: the search similarities (symmetric by the stream order); exact to float32
        # rounding for Flat storage, to fp16 rounding for SQfp16. Self-loops 1.
        graph.values[_self_loop_positions(graph)] = 1.0
    del x
    if timings is not None:
        timings.update(search_s=t_search - t0, graph_s=time.perf_counter() - t_search)
    log.info("kNN graph: %d nodes, k=%d, %d edges (backend %s, device %s): search %.1fs, graph %.1fs", n, k,
             graph.nnz, backend, dev, t_search - t0, time.perf_counter() - t_search)
    return graph


def user_knn_from_embeddings(features: np.ndarray | torch.Tensor, k: int, **kwargs) -> CSR:
    """User-user graph from user preference embeddings [n_users, d]: ``knn_graph`` over them."""
    return knn_graph(features, k, **kwargs)


def _topk_by_count(u: torch.Tensor, v: torch.Tensor, c: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over pairs (sorted by (u, v)) keeping, per u, the k largest counts (ties: smaller v)."""
    order = torch.sort(-c, stable=True).indices  # count desc, (u, v) order kept within equal counts
    order = order[torch.sort(u[order], stable=True).indices]  # then u asc
    us = u[order]
    first = torch.ones_like(us, dtype=torch.bool)
    first[1:] = us[1:] != us[:-1]
    pos = torch.arange(us.numel())
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    keep = torch.zeros_like(us, dtype=torch.bool)
    keep[order] = (pos - start) < k
    return keep


def user_graph_from_interactions(graph: UserItemGraph, k: int, *, pair_budget: int = 1 << 24,
                                 symmetrize: bool = True, self_loops: bool = True,
                                 with_values: bool = True) -> CSR:
    """Co-interaction user-user graph: for each user u the k users v != u with the largest
    ``|N(u) ∩ N(v)|`` (shared train items; only v with at least one; ties: smaller v), symmetrised,
    with self-loops.

    Computed as the sparse product ``A[block] @ A^T`` (A = user x item incidence) for blocks of
    users whose expanded (user, item, other user) triples fit ``pair_budget``; a single user over
    the budget is counted into a dense [n_users] vector chunk by chunk.

    **Returns:** CSR [n_users, n_users], rows = destination user, ``values`` = shared-item counts
    float32 (self-loops: the user's own degree).
    """
    ui, iu = graph.user_items, graph.item_users
    n_users = graph.n_users
    item_deg = graph.item_degree
    # number of (item, other user) pairs each user expands to
    work = torch.zeros(n_users, dtype=torch.int64)
    for rows, cols, _ in ui.edge_chunks():
        work.index_add_(0, rows, item_deg[cols.long()])
    work_ptr = torch.zeros(n_users + 1, dtype=torch.int64)
    torch.cumsum(work, 0, out=work_ptr[1:])
    srcs, dsts, cnts = [], [], []
    u0 = 0
    bar = progress(total=n_users, desc="co-interaction kNN")
    while u0 < n_users:
        u1 = int(torch.searchsorted(work_ptr, int(work_ptr[u0]) + pair_budget, right=True)) - 1
        u1 = min(max(u1, u0 + 1), n_users)
        if u1 == u0 + 1 and int(work[u0]) > pair_budget:
            v, c = _dense_co_counts(ui, iu, u0, n_users, k)
            u = torch.full_like(v, u0)
        else:
            u, v, c = _block_co_counts(ui, iu, item_deg, u0, u1, n_users, k)
        srcs.append(u)
        dsts.append(v)
        cnts.append(c)
        bar.update(u1 - u0)
        u0 = u1
    bar.close()
    src = torch.cat(srcs) if srcs else torch.zeros(0, dtype=torch.int64)
    dst = torch.cat(dsts) if dsts else torch.zeros(0, dtype=torch.int64)
    cnt = torch.cat(cnts).to(torch.float32) if cnts else torch.zeros(0)
    out = _symmetric_graph(src, dst, cnt, n_users, symmetrize=symmetrize, self_loops=self_loops,
                           self_values=graph.user_degree.to(torch.float32), with_values=with_values)
    log.info("co-interaction user graph: %d users, k=%d, %d edges", n_users, k, out.nnz)
    return out


def _block_co_counts(ui: CSR, iu: CSR, item_deg: torch.Tensor, u0: int, u1: int, n_users: int,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k co-interaction partners of users ``[u0, u1)`` as (user, other, count) int64 arrays."""
    s, e = int(ui.indptr[u0]), int(ui.indptr[u1])
    users = ui.row_ids(u0, u1)
    items = ui.indices[s:e].long()
    cnt = item_deg[items]
    total = int(cnt.sum())
    if total == 0:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z, z
    first = torch.cumsum(cnt, 0) - cnt
    offs = torch.arange(total, dtype=torch.int64) + torch.repeat_interleave(iu.indptr[items] - first, cnt)
    other = iu.indices[offs].long()
    user = torch.repeat_interleave(users, cnt)
    not_self = other != user
    key = (user[not_self] - u0) * n_users + other[not_self]
    del offs, other, user, not_self
    key, count = torch.unique(key, sorted=True, return_counts=True)
    u = key // n_users + u0
    v = key % n_users
    keep = _topk_by_count(u, v, count, k)
    return u[keep], v[keep], count[keep]


def _dense_co_counts(ui: CSR, iu: CSR, u: int, n_users: int, k: int,
                     chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k partners (ids, counts) of one heavy user, counted into a dense [n_users] vector."""
    counts = torch.zeros(n_users, dtype=torch.int64)
    for i in ui.indices[int(ui.indptr[u]):int(ui.indptr[u + 1])].long().tolist():
        a, b = int(iu.indptr[i]), int(iu.indptr[i + 1])
        for s in range(a, b, chunk):
            counts.index_add_(0, iu.indices[s:min(b, s + chunk)].long(), torch.ones(min(b, s + chunk) - s,
                                                                                   dtype=torch.int64))
    counts[u] = 0
    v = counts.nonzero().flatten()
    c = counts[v]
    keep = _topk_by_count(torch.zeros_like(v), v, c, k)
    return v[keep], c[keep]
