"""Compressed sparse rows: the one graph layout every sampler and propagation step reads.

Row r's neighbours are ``indices[indptr[r]:indptr[r+1]]`` (sorted ascending, unique).
``indptr`` is int64; ``indices`` is int32 when the column count fits (halves memory at 200M edges).
``values`` optionally carries a float32 weight per edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

INT32_MAX = 2**31 - 1


def index_dtype(n: int) -> torch.dtype:
    """Smallest index dtype that holds ids ``0..n-1``."""
    return torch.int32 if n <= INT32_MAX else torch.int64


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

    @classmethod
    def from_edges(cls, rows: torch.Tensor | np.ndarray, cols: torch.Tensor | np.ndarray, n_rows: int,
                   n_cols: int, values: torch.Tensor | np.ndarray | None = None) -> "CSR":
        """Build from an edge list; duplicate (row, col) pairs are merged (first value kept).

        Raises ValueError on ids outside ``[0, n_rows)`` / ``[0, n_cols)``."""
        rows = torch.as_tensor(rows).to(torch.int64)
        cols = torch.as_tensor(cols).to(torch.int64)
        if rows.shape != cols.shape or rows.dim() != 1:
            raise ValueError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must be equal 1-D shapes")
        if rows.numel():
            if int(rows.min()) < 0 or int(rows.max()) >= n_rows:
                raise ValueError(f"row ids must lie in [0, {n_rows}), got [{int(rows.min())}, {int(rows.max())}]")
            if int(cols.min()) < 0 or int(cols.max()) >= n_cols:
                raise ValueError(f"col ids must lie in [0, {n_cols}), got [{int(cols.min())}, {int(cols.max())}]")
        key = rows * n_cols + cols
        key, order = torch.sort(key, stable=True)
        del rows, cols
        keep = torch.ones_like(key, dtype=torch.bool)
        keep[1:] = key[1:] != key[:-1]
        key = key[keep]
        r = key // n_cols
        indices = (key - r * n_cols).to(index_dtype(n_cols))
        counts = torch.bincount(r, minlength=n_rows)
        indptr = torch.zeros(n_rows + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=indptr[1:])
        vals = None
        if values is not None:
            vals = torch.as_tensor(values).to(torch.float32)[order[keep]]
        return cls(indptr, indices, n_cols, vals)

    def transpose(self) -> "CSR":
        """The CSR of the transposed graph (columns become rows)."""
        rows = torch.repeat_interleave(torch.arange(self.n_rows, dtype=torch.int64), self.degrees())
        return CSR.from_edges(self.indices, rows, self.n_cols, self.n_rows, self.values)
