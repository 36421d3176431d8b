"""The user-item interaction graph, both directions, with LightGCN's symmetric normalisation.

LightGCN (He et al., 2020, eq. 3) propagates ``e_u^{l+1} = sum_{i in N(u)} e_i^l / sqrt(|N(u)| |N(i)|)``
and symmetrically for items. The per-edge weight ``1 / sqrt(deg_u * deg_i)`` uses FULL-graph degrees
of the TRAIN split (a repeated (u, i) pair counts once), so that a neighbour-sampled computation
with fanout "all" reproduces full-graph LightGCN exactly. The weight is stored as the CSR ``values``
of both directions.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from goat_dist.graph.csr import CHUNK, CSR
from goat_dist.log import get_logger

log = get_logger(__name__)


@dataclass(slots=True)
class UserItemGraph:
    """The train user-item graph.

    ``user_items``: rows = users [n_users], columns = items; relation ITEM_TO_USER (messages flow from
    a user's items to the user). ``item_users``: its transpose, rows = items; relation USER_TO_ITEM.
    Both carry ``values`` = 1 / sqrt(deg_u * deg_i) float32 per edge.

    **Shapes:** ``user_degree`` [n_users] int64, ``item_degree`` [n_items] int64 (distinct
    neighbours in the train split; 0 for cold nodes).
    """

    user_items: CSR
    item_users: CSR
    user_degree: torch.Tensor
    item_degree: torch.Tensor

    @property
    def n_users(self) -> int:
        return self.user_items.n_rows

    @property
    def n_items(self) -> int:
        return self.item_users.n_rows

    @property
    def nnz(self) -> int:
        """Number of distinct (user, item) train pairs."""
        return self.user_items.nnz

    @classmethod
    def from_csr(cls, user_items: CSR, item_users: CSR) -> "UserItemGraph":
        """Wrap two already built directions (e.g. loaded from the cache); degrees are recomputed."""
        return cls(user_items, item_users, user_items.degrees(), item_users.degrees())

    def full_propagation_matrix(self) -> torch.Tensor:
        """Symmetric normalised bipartite adjacency ``A_hat = D^-1/2 A D^-1/2`` as a torch sparse CSR.

        Node order: users ``0..n_users-1``, then items ``n_users..n_users+n_items-1``; so one LightGCN
        layer over all nodes is ``E^{l+1} = A_hat @ E^l`` with ``E`` [n_users + n_items, d].
        Meant for tests and small graphs (it copies both directions into int64 indices).

        **Shape:** [n_users + n_items, n_users + n_items], float32, 2 * nnz stored entries.
        """
        ui, iu = self.user_items, self.item_users
        n = self.n_users + self.n_items
        crow = torch.cat([ui.indptr, ui.nnz + iu.indptr[1:]])
        col = torch.cat([ui.indices.to(torch.int64) + self.n_users, iu.indices.to(torch.int64)])
        val = torch.cat([ui.values, iu.values])
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, not actionable here
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, val, size=(n, n))


def lightgcn_values(user_items: CSR, item_degree: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Per-edge ``1 / sqrt(deg_u * deg_i)`` for the edges of ``user_items`` (rows = users), float32 [nnz].

    Computed span by span of whole rows, so no [nnz] int64 row-id array is materialised."""
    d_u = user_items.degrees().to(torch.float64).clamp_(min=1).rsqrt_()
    d_i = item_degree.to(torch.float64).clamp_(min=1).rsqrt_()
    out = torch.empty(user_items.nnz, dtype=torch.float32)
    pos = 0
    for rows, cols, _ in user_items.edge_chunks(chunk):
        n = rows.numel()
        out[pos:pos + n] = (d_u[rows] * d_i[cols.long()]).to(torch.float32)
        pos += n
    return out


def build_user_items(n_users: int, n_items: int, users: np.ndarray | torch.Tensor,
                     items: np.ndarray | torch.Tensor) -> CSR:
    """The user -> items CSR (rows = users) of the train pairs, repeated pairs merged, ``values`` =
    1 / sqrt(deg_u * deg_i) float32. **Shapes:** ``users``, ``items`` [E] integer."""
    user_items = CSR.from_edges(users, items, n_users, n_items)
    n_in = int(len(users))
    if user_items.nnz < n_in:
        log.info("user-item graph: merged %d repeated (user, item) pairs", n_in - user_items.nnz)
    item_degree = torch.bincount(user_items.indices, minlength=n_items) if user_items.nnz else \
        torch.zeros(n_items, dtype=torch.int64)
    user_items.values = lightgcn_values(user_items, item_degree)
    return user_items


def build_user_item_graph(n_users: int, n_items: int, users: np.ndarray | torch.Tensor,
                          items: np.ndarray | torch.Tensor) -> UserItemGraph:
    """Build the graph from the TRAIN split's parallel id arrays.

    **Shapes:** ``users``, ``items`` [E] integer (numpy arrays and memmaps are read chunk by chunk).
    Repeated (user, item) pairs are merged; degrees count distinct neighbours.

    Memory beyond the inputs: about 2 x (4 + 4) bytes per distinct edge (int32 indices + float32
    values, both directions) plus 8 bytes per node, plus O(chunk) temporaries.
    """
    user_items = build_user_items(n_users, n_items, users, items)
    graph = UserItemGraph.from_csr(user_items, user_items.transpose())
    log.info("user-item graph: %d users, %d items, %d edges (%d cold users, %d cold items)", n_users, n_items,
             graph.nnz, int((graph.user_degree == 0).sum()), int((graph.item_degree == 0).sum()))
    return graph
