"""Compressed sparse rows: the one graph layout every sampler and propagation step reads.

Row r's neighbours are ``indices[indptr[r]:indptr[r+1]]`` (sorted ascending, unique).
``indptr`` is int64; ``indices`` is int32 when the column count fits (halves memory at 200M edges).
``values`` optionally carries a float32 weight per edge.

Construction is a chunked counting sort, so building from E edges needs only the outputs
(``indices`` [E] int32, ``values`` [E] float32, ``indptr``) plus O(n_rows) counters and O(chunk)
temporaries -- never an [E] int64 key or permutation:

1. count edges per row (bincount per chunk) -> ``indptr``;
2. scatter every chunk's columns to their row's next free slots (a per-chunk stable sort by row
   gives each edge its rank within its row), so rows come out grouped in input order;
3. sort within rows and drop duplicates, one span of whole rows at a time, compacting in place
   (the write cursor never passes the read cursor).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

INT32_MAX = 2**31 - 1

CHUNK = 1 << 22
"""Edges handled per step of the chunked builders (temporaries are a few times this, in int64)."""


def index_dtype(n: int) -> torch.dtype:
    """Smallest index dtype that holds ids ``0..n-1``."""
    return torch.int32 if n <= INT32_MAX else torch.int64


def _as_tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing memory with ``a`` where possible (read-only memmaps are viewed, not copied)."""
    if isinstance(a, torch.Tensor):
        return a.cpu()
    a = np.asarray(a)
    if not a.flags.writeable:  # torch.from_numpy warns on read-only arrays; we never write to inputs
        a = a.view()
        try:
            a.flags.writeable = True
        except ValueError:
            a = np.array(a)
    return torch.from_numpy(a)


EdgeChunks = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]
"""A re-iterable source of edge chunks ``(rows [c] int, cols [c] int, values [c] float32 | None)``."""


def _group_by_row(n_rows: int, n_cols: int, nnz: int, chunks: EdgeChunks,
                  has_values: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Counting sort of edges by row (stable: within a row, edges keep their input order).

    Returns ``indptr`` [n_rows + 1] int64, ``indices`` [nnz] (``index_dtype(n_cols)``) and
    ``values`` [nnz] float32 or None."""
    counts = torch.zeros(n_rows, dtype=torch.int64)
    ordered, last = True, -1  # already grouped by row (e.g. read from per-user adjacency lists)?
    for r, _, _ in chunks():
        if r.numel():
            counts += torch.bincount(r.to(index_dtype(n_rows)), minlength=n_rows)
            ordered = ordered and int(r[0]) >= last and bool((r[1:] >= r[:-1]).all())
            last = int(r[-1])
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    del counts
    indices = torch.empty(nnz, dtype=index_dtype(n_cols))
    values = torch.empty(nnz, dtype=torch.float32) if has_values else None
    if ordered:  # nothing to move: copy the columns through
        pos = 0
        for r, c, v in chunks():
            indices[pos:pos + r.numel()] = c
            if values is not None:
                values[pos:pos + r.numel()] = v
            pos += r.numel()
        return indptr, indices, values
    fill = indptr[:-1].clone()  # next free slot of every row
    for r, c, v in chunks():
        if not r.numel():
            continue
        # int32 keys sort about twice as fast as int64 ones
        sr, order = torch.sort(r.to(index_dtype(n_rows)), stable=True)
        uniq, cnt = torch.unique_consecutive(sr, return_counts=True)
        first = torch.cumsum(cnt, 0) - cnt  # position of each row's first edge in the sorted chunk
        rank = torch.arange(sr.numel(), dtype=torch.int64) - torch.repeat_interleave(first, cnt)
        pos = fill[sr.long()] + rank
        indices[pos] = c[order].to(indices.dtype)
        if values is not None:
            values[pos] = v[order]
        fill[uniq.long()] += cnt
    return indptr, indices, values


def _sort_dedup_rows(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None,
                     n_cols: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sort every row's columns ascending and drop repeated columns (the first value is kept).

    Works on spans of whole rows of about ``chunk`` edges and compacts in place; returns the new
    ``indptr`` and views of the (shrunk) ``indices``/``values``."""
    n_rows = indptr.numel() - 1
    nnz = int(indptr[-1])
    new_deg = torch.zeros(n_rows, dtype=torch.int64)
    write = 0
    r0 = 0
    while r0 < n_rows:
        start = int(indptr[r0])
        # last row whose end lies within start + chunk (at least one row)
        r1 = int(torch.searchsorted(indptr, start + chunk, right=True)) - 1
        r1 = min(max(r1, r0 + 1), n_rows)
        end = int(indptr[r1])
        if end == start:
            r0 = r1
            continue
        cols = indices[start:end].to(torch.int64, copy=True)  # a copy: the compaction below overlaps
        deg = indptr[r0 + 1:r1 + 1] - indptr[r0:r1]
        local = torch.repeat_interleave(torch.arange(r1 - r0, dtype=torch.int64), deg)
        key = local * n_cols + cols
        if bool((key[1:] > key[:-1]).all()):  # already sorted and unique: shift left only
            n_keep = end - start
            new_deg[r0:r1] = deg
            if write != start:
                indices[write:write + n_keep] = cols.to(indices.dtype)
                if values is not None:
                    values[write:write + n_keep] = values[start:end].clone()
            write += n_keep
            r0 = r1
            continue
        key, order = torch.sort(key, stable=True)
        keep = torch.ones(key.numel(), dtype=torch.bool)
        keep[1:] = key[1:] != key[:-1]
        kept_rows = local[order][keep]
        n_keep = int(kept_rows.numel())
        new_deg[r0:r1] = torch.bincount(kept_rows, minlength=r1 - r0)
        if values is not None:
            vals = values[start:end][order][keep]
            values[write:write + n_keep] = vals
        indices[write:write + n_keep] = cols[order][keep].to(indices.dtype)
        write += n_keep
        r0 = r1
    out_ptr = torch.zeros(n_rows + 1, dtype=torch.int64)
    torch.cumsum(new_deg, 0, out=out_ptr[1:])
    if 8 * (nnz - write) <= nnz:  # few duplicates: keep views rather than pay a second copy
        return out_ptr, indices[:write], None if values is None else values[:write]
    # many duplicates: copy the prefix so the tail memory is released
    return out_ptr, indices[:write].clone(), None if values is None else values[:write].clone()


@dataclass(slots=True)
class CSR:
    """**Shapes:** ``indptr`` [n_rows + 1] int64, ``indices`` [nnz] int32/int64, ``values`` [nnz] or None."""

    indptr: torch.Tensor
    indices: torch.Tensor
    n_cols: int
    values: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return int(self.indptr.numel() - 1)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def degrees(self) -> torch.Tensor:
        """Out-degree of every row, int64 [n_rows]."""
        return self.indptr[1:] - self.indptr[:-1]

    def to(self, device: torch.device | str) -> "CSR":
        return CSR(self.indptr.to(device), self.indices.to(device), self.n_cols,
                   None if self.values is None else self.values.to(device))

    def share_memory_(self) -> "CSR":
        """Move tensors to shared memory so DataLoader workers read them without copying."""
        self.indptr.share_memory_()
        self.indices.share_memory_()
        if self.values is not None:
            self.values.share_memory_()
        return self

    def row_ids(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Row id of every edge of rows ``[start, end)``, int64 [indptr[end] - indptr[start]]."""
        end = self.n_rows if end is None else end
        return torch.repeat_interleave(torch.arange(start, end, dtype=torch.int64),
                                       self.indptr[start + 1:end + 1] - self.indptr[start:end])

    def edge_chunks(self, chunk: int = CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield ``(rows, cols, values)`` for spans of whole rows of about ``chunk`` edges, in row order."""
        r0 = 0
        while r0 < self.n_rows:
            start = int(self.indptr[r0])
            r1 = int(torch.searchsorted(self.indptr, start + chunk, right=True)) - 1
            r1 = min(max(r1, r0 + 1), self.n_rows)
            end = int(self.indptr[r1])
            if end > start:
                yield (self.row_ids(r0, r1), self.indices[start:end],
                       None if self.values is None else self.values[start:end])
            r0 = r1

    @classmethod
    def from_edges(cls, rows: torch.Tensor | np.ndarray, cols: torch.Tensor | np.ndarray, n_rows: int,
                   n_cols: int, values: torch.Tensor | np.ndarray | None = None, *,
                   chunk: int = CHUNK) -> "CSR":
        """Build from an edge list; duplicate (row, col) pairs are merged (first value kept).

        **Shapes:** ``rows``, ``cols`` [E] any integer dtype (numpy arrays and memmaps are read in
        place, chunk by chunk); ``values`` [E] or None. Extra memory is the output plus
        O(n_rows) counters and O(``chunk``) temporaries.

        Raises ValueError on ids outside ``[0, n_rows)`` / ``[0, n_cols)``."""
        rows = _as_tensor(rows)
        cols = _as_tensor(cols)
        if rows.shape != cols.shape or rows.dim() != 1:
            raise ValueError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must be equal 1-D shapes")
        if rows.is_floating_point() or cols.is_floating_point():
            raise ValueError(f"row/col ids must be integers, got {rows.dtype} and {cols.dtype}")
        vals = None
        if values is not None:
            vals = _as_tensor(values)
            if vals.shape != rows.shape:
                raise ValueError(f"values {tuple(vals.shape)} must have the shape of rows {tuple(rows.shape)}")
        nnz = int(rows.numel())
        if nnz:
            for name, ids, n in (("row", rows, n_rows), ("col", cols, n_cols)):
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= n:
                    raise ValueError(f"{name} ids must lie in [0, {n}), got [{lo}, {hi}]")

        def chunks():
            for s in range(0, nnz, chunk):
                yield (rows[s:s + chunk], cols[s:s + chunk],
                       None if vals is None else vals[s:s + chunk].to(torch.float32))

        indptr, indices, out_vals = _group_by_row(n_rows, n_cols, nnz, chunks, vals is not None)
        indptr, indices, out_vals = _sort_dedup_rows(indptr, indices, out_vals, n_cols, chunk)
        return cls(indptr, indices, n_cols, out_vals)

    @classmethod
    def from_edge_chunks(cls, chunks: EdgeChunks, n_rows: int, n_cols: int, nnz: int, has_values: bool,
                         *, chunk: int = CHUNK) -> "CSR":
        """Build from an edge list given as a re-iterable stream of ``(rows, cols, values)`` chunks
        (``chunks()`` is called twice: counting, then scattering); ``nnz`` = total edges streamed.
        Duplicates are merged (first value kept), as in ``from_edges``; no [E] array is ever
        concatenated, so extra memory is the output plus O(n_rows + chunk).

        Raises ValueError on ids outside ``[0, n_rows)`` / ``[0, n_cols)`` or when the chunks
        hold a different number of edges than ``nnz``."""
        def checked():
            seen = 0
            for r, c, v in chunks():
                if r.numel():
                    for name, ids, n in (("row", r, n_rows), ("col", c, n_cols)):
                        lo, hi = int(ids.min()), int(ids.max())
                        if lo < 0 or hi >= n:
                            raise ValueError(f"{name} ids must lie in [0, {n}), got [{lo}, {hi}] "
                                             f"in the chunk starting at edge {seen}")
                seen += int(r.numel())
                if seen > nnz:
                    raise ValueError(f"edge chunks hold more than nnz={nnz} edges")
                yield r, c, (None if v is None else v.to(torch.float32))
            if seen != nnz:
                raise ValueError(f"edge chunks hold {seen} edges, expected nnz={nnz}")

        indptr, indices, out_vals = _group_by_row(n_rows, n_cols, nnz, checked, has_values)
        indptr, indices, out_vals = _sort_dedup_rows(indptr, indices, out_vals, n_cols, chunk)
        return cls(indptr, indices, n_cols, out_vals)

    def khop_subgraph(self, seeds: torch.Tensor, hops: int) -> tuple[torch.Tensor, "CSR"]:
        """The ``hops``-hop in-neighbourhood of ``seeds`` (square graph: rows and columns are one node
        set), relabelled to local ids, for computing ``hops`` layers of message passing at the seeds
        without the full graph.

        Returns ``(nodes, local)``: ``nodes`` [n_local] int64 global ids, the seeds first (in the
        given order, which must be duplicate-free), then each hop's new nodes ascending; ``local``
        [n_local, n_local] CSR over local ids holding the FULL rows (values dropped) of every node
        within ``hops - 1`` hops of the seeds and empty rows for the outermost hop -- exactly what
        ``hops`` layers at the seeds read."""
        if self.n_rows != self.n_cols:
            raise ValueError(f"khop_subgraph needs a square graph, got {self.n_rows} x {self.n_cols}")
        seeds = seeds.to(torch.int64)
        nodes = [seeds]
        known = torch.zeros(self.n_rows, dtype=torch.bool)
        known[seeds] = True
        if int(known.sum()) != seeds.numel():
            raise ValueError("khop_subgraph: seeds must be distinct")
        frontier, full_rows = seeds, []
        for _ in range(hops):
            full_rows.append(frontier)
            deg = self.indptr[frontier + 1] - self.indptr[frontier]
            pos = torch.repeat_interleave(self.indptr[frontier] - (torch.cumsum(deg, 0) - deg), deg) + \
                torch.arange(int(deg.sum()), dtype=torch.int64)
            nbr = torch.unique(self.indices[pos].to(torch.int64))
            frontier = nbr[~known[nbr]]
            known[frontier] = True
            nodes.append(frontier)
        nodes_t = torch.cat(nodes)
        local_of = torch.full((self.n_rows,), -1, dtype=torch.int64)
        local_of[nodes_t] = torch.arange(nodes_t.numel())
        rows_g = torch.cat(full_rows) if full_rows else torch.zeros(0, dtype=torch.int64)
        deg = self.indptr[rows_g + 1] - self.indptr[rows_g]
        pos = torch.repeat_interleave(self.indptr[rows_g] - (torch.cumsum(deg, 0) - deg), deg) + \
            torch.arange(int(deg.sum()), dtype=torch.int64)
        src = torch.repeat_interleave(local_of[rows_g], deg)
        dst = local_of[self.indices[pos].to(torch.int64)]
        return nodes_t, CSR.from_edges(src, dst, nodes_t.numel(), nodes_t.numel())

    def transpose(self, chunk: int = CHUNK) -> "CSR":
        """The CSR of the transposed graph (columns become rows), values carried along.

        Rows are visited in ascending order and the counting sort is stable, so the transposed rows
        come out sorted and (the input being duplicate-free) unique without a second sort."""
        def chunks():
            for r, c, v in self.edge_chunks(chunk):
                yield c, r, v

        indptr, indices, values = _group_by_row(self.n_cols, self.n_rows, self.nnz, chunks,
                                                self.values is not None)
        return CSR(indptr, indices, self.n_rows, values)
