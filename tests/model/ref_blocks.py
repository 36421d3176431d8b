"""Slow, obviously-correct references for the model tests: full-neighbourhood (fanout -1) blocks
built by Python loops from CSRs, honouring the conventions of ``goat_dist/sampling/blocks.py``, and
a tiny random dataset (interactions, kNN graphs, features)."""
from __future__ import annotations

import random

import numpy as np
import torch

from goat_dist.graph.csr import CSR
from goat_dist.sampling.blocks import (ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, USER_USER, Block, MiniBatch,
                                       SampledSubgraph, item_item_relation)


def full_subgraph(seeds: dict[str, list[int]], csrs: dict, num_layers: int) -> SampledSubgraph:
    """All-neighbour L-hop subgraph. ``csrs[(src_t, name, dst_t)]``: CSR whose row v (a dst_t node)
    lists its src_t neighbours. Blocks are returned outermost first; dst nodes prefix src nodes."""
    types = list(seeds)
    dst = {t: [int(v) for v in seeds[t]] for t in types}
    blocks = []
    for _ in range(num_layers):
        src = {t: list(dst[t]) for t in types}
        pos = {t: {v: k for k, v in enumerate(src[t])} for t in types}
        edge_index, edge_weight = {}, {}
        for rel, csr in csrs.items():
            s_t, _, d_t = rel
            indptr, indices = csr.indptr.tolist(), csr.indices.tolist()
            values = None if csr.values is None else csr.values.tolist()
            es, ed, ew = [], [], []
            for j, v in enumerate(dst[d_t]):
                for p in range(indptr[v], indptr[v + 1]):
                    nb = indices[p]
                    if nb not in pos[s_t]:
                        pos[s_t][nb] = len(src[s_t])
                        src[s_t].append(nb)
                    es.append(pos[s_t][nb])
                    ed.append(j)
                    if values is not None:
                        ew.append(values[p])
            edge_index[rel] = torch.tensor([es, ed], dtype=torch.int64).reshape(2, -1)
            edge_weight[rel] = torch.tensor(ew, dtype=torch.float32) if csr.values is not None else None
        blocks.append(Block({t: torch.tensor(src[t], dtype=torch.int64) for t in types},
                            {t: len(dst[t]) for t in types}, edge_index, edge_weight))
        dst = src
    blocks.reverse()
    return SampledSubgraph({t: torch.tensor([int(v) for v in seeds[t]], dtype=torch.int64) for t in types}, blocks)


def unique_in_order(values: list[int]) -> list[int]:
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


class TinyData:
    """Random bipartite graph + per-modality symmetric kNN graphs with self-loops + features."""

    def __init__(self, n_users=24, n_items=20, n_edges=90, modalities=("image", "text"), feat_dims=(10, 7),
                 user_dim=6, knn=3, seed=0):
        rng = np.random.default_rng(seed)
        rows = np.concatenate([np.arange(n_users), rng.integers(0, n_users, n_edges), rng.integers(0, n_users, n_items)])
        cols = np.concatenate([rng.integers(0, n_items, n_users), rng.integers(0, n_items, n_edges), np.arange(n_items)])
        item_features = {m: torch.randn(n_items, f, generator=torch.Generator().manual_seed(seed + k))
                         for k, (m, f) in enumerate(zip(modalities, feat_dims))}
        user_features = torch.randn(n_users, user_dim, generator=torch.Generator().manual_seed(seed + 99))
        self.setup(rows, cols, n_users, n_items, item_features, user_features, knn)

    def setup(self, rows, cols, n_users, n_items, item_features, user_features, knn):
        """Every user and item must have at least one interaction."""
        self.n_users, self.n_items = n_users, n_items
        ui = CSR.from_edges(rows, cols, n_users, n_items)
        deg_u = ui.degrees().double()
        deg_i = torch.bincount(ui.indices.long(), minlength=n_items).double()
        assert deg_u.min() > 0 and deg_i.min() > 0
        r = torch.repeat_interleave(torch.arange(n_users), ui.degrees())
        ui.values = (deg_u[r] * deg_i[ui.indices.long()]).rsqrt().float()
        self.user_items = ui
        self.item_users = ui.transpose()
        self.deg = {USER: deg_u.long(), ITEM: deg_i.long()}
        self.item_features = item_features
        self.user_features = user_features
        self.item_graphs = {m: self._knn(f, knn) for m, f in item_features.items()}
        self.user_graph = self._knn(user_features, knn)

    @classmethod
    def planted(cls, n_users=48, n_items=36, clusters=3, per_user=6, seed=0):
        """Users and items in clusters; users interact with items of their own cluster only; item
        features (two modalities) and user features reveal the cluster through noise."""
        rng = np.random.default_rng(seed)
        cu, ci = np.arange(n_users) % clusters, np.arange(n_items) % clusters
        rows, cols = [], []
        for u in range(n_users):
            pool = np.flatnonzero(ci == cu[u])
            for i in rng.choice(pool, per_user, replace=False):
                rows.append(u)
                cols.append(int(i))
        for i in range(n_items):                     # every item gets one user of its cluster
            rows.append(int(rng.choice(np.flatnonzero(cu == ci[i]))))
            cols.append(i)
        onehot_i, onehot_u = np.eye(clusters)[ci], np.eye(clusters)[cu]
        feats = {}
        for k, (m, f) in enumerate((("image", 10), ("text", 7))):
            proj = rng.standard_normal((clusters, f))
            feats[m] = torch.tensor(onehot_i @ proj + 0.3 * rng.standard_normal((n_items, f)), dtype=torch.float32)
        users = torch.tensor(onehot_u @ rng.standard_normal((clusters, 6)) + 0.3 * rng.standard_normal((n_users, 6)),
                             dtype=torch.float32)
        obj = cls.__new__(cls)
        obj.setup(np.array(rows), np.array(cols), n_users, n_items, feats, users, 3)
        obj.user_cluster, obj.item_cluster = torch.tensor(cu), torch.tensor(ci)
        return obj

    @staticmethod
    def _knn(x: torch.Tensor, k: int) -> CSR:
        xn = torch.nn.functional.normalize(x, dim=1)
        sim = xn @ xn.t()
        sim.fill_diagonal_(-2)
        nb = sim.topk(k, dim=1).indices
        n = x.shape[0]
        rows = torch.cat([torch.arange(n).repeat_interleave(k), nb.reshape(-1), torch.arange(n)])
        cols = torch.cat([nb.reshape(-1), torch.arange(n).repeat_interleave(k), torch.arange(n)])
        return CSR.from_edges(rows, cols, n, n)

    def batch(self, users, pos, neg, id_layers: int, gat_layers: int, modalities=None, user_branch=True) -> MiniBatch:
        users, pos, neg = list(map(int, users)), list(map(int, pos)), list(map(int, neg))
        uu, ui_ = unique_in_order(users), unique_in_order(pos + neg)
        seeds = {USER: uu, ITEM: ui_}
        ui = full_subgraph(seeds, {ITEM_TO_USER: self.user_items, USER_TO_ITEM: self.item_users}, id_layers)
        mods = list(self.item_graphs) if modalities is None else modalities
        ii = {m: full_subgraph({ITEM: ui_}, {item_item_relation(m): self.item_graphs[m]}, gat_layers) for m in mods}
        us = full_subgraph({USER: uu}, {USER_USER: self.user_graph}, gat_layers) if user_branch else None
        t = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
        return MiniBatch(t(users), t(pos), t(neg), t(uu), t(ui_), t([uu.index(u) for u in users]),
                         t([ui_.index(i) for i in pos]), t([ui_.index(i) for i in neg]), ui, ii, us)

    def random_batch(self, size: int, seed: int, **kw) -> MiniBatch:
        rnd = random.Random(seed)
        users, pos, neg = [], [], []
        for _ in range(size):
            u = rnd.randrange(self.n_users)
            s, e = int(self.user_items.indptr[u]), int(self.user_items.indptr[u + 1])
            users.append(u)
            pos.append(int(self.user_items.indices[rnd.randrange(s, e)]))
            neg.append(rnd.randrange(self.n_items))
        return self.batch(users, pos, neg, **kw)
