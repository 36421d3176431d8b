"""goat_dist.graph: the CSR user-item graph, blockwise kNN item-item / user-user graphs, and their
on-disk cache. ``build_graphs`` is the one entry point the trainer calls."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from goat_dist.config import GraphConfig
from goat_dist.data.dataset import RecDataset
from goat_dist.graph.cache import cached, content_hash
from goat_dist.graph.csr import CSR
from goat_dist.graph.knn import (IVFParams, knn_graph, resolve_backend, user_graph_from_interactions,
                                 user_knn_from_embeddings)
from goat_dist.graph.ui import UserItemGraph, build_user_item_graph, build_user_items
from goat_dist.log import get_logger
from goat_dist.sampling.blocks import ITEM_TO_USER, USER_TO_ITEM, USER_USER, Relation, item_item_relation

__all__ = ["CSR", "Graphs", "IVFParams", "UserItemGraph", "build_graphs", "build_user_item_graph", "cached",
           "content_hash", "knn_graph", "knn_options", "resolve_backend", "user_graph_from_interactions",
           "user_knn_from_embeddings"]

log = get_logger(__name__)


@dataclass(slots=True)
class Graphs:
    """Every graph one training run needs.

    ``ui``: the train user-item graph; ``item_item[m]``: the kNN graph [n_items, n_items] of item
    modality ``m``; ``user_user``: the user-user graph [n_users, n_users] or None (user branch off).
    """

    ui: UserItemGraph
    item_item: dict[str, CSR] = field(default_factory=dict)
    user_user: CSR | None = None

    def relations(self) -> dict[Relation, CSR]:
        """The graphs keyed by the sampler's relation names (CSR rows = destination nodes)."""
        rels: dict[Relation, CSR] = {ITEM_TO_USER: self.ui.user_items, USER_TO_ITEM: self.ui.item_users}
        for m, csr in self.item_item.items():
            rels[item_item_relation(m)] = csr
        if self.user_user is not None:
            rels[USER_USER] = self.user_user
        return rels


def knn_options(cfg: GraphConfig, n: int) -> tuple[dict, dict]:
    """``(knn_graph keyword arguments, cache-key parts)`` for a kNN over ``n`` rows under ``cfg``.

    The backend is resolved first (``auto`` by size), so the key names the backend that actually
    runs; the ``exact`` key has no backend part (entries written before backends existed stay valid)."""
    backend = resolve_backend(cfg.knn_backend, n, cfg.knn_exact_max_rows)
    ivf = IVFParams(nlist=cfg.knn_nlist, nprobe=cfg.knn_nprobe, train_per_list=cfg.knn_ivf_train_per_list,
                    niter=cfg.knn_ivf_niter, quantizer=cfg.knn_ivf_quantizer, codec=cfg.knn_ivf_codec)
    kw = dict(block_size=cfg.knn_block_size, device=cfg.device, backend=backend, ivf=ivf, threads=cfg.knn_threads)
    key: dict = {}
    if backend == "faiss_flat":
        key = {"backend": backend}
    elif backend == "ivf":
        key = {"backend": backend, **ivf.key(n)}
    return kw, key


def build_graphs(dataset: RecDataset, cfg: GraphConfig, modalities: list[str], use_user_branch: bool,
                 user_feature: str | None = None, timings: dict[str, float] | None = None) -> Graphs:
    """Build (or load from ``cfg.cache_dir``) the user-item graph of the train split, one item-item
    kNN graph (k = ``cfg.item_knn_k``) per name in ``modalities``, and, when ``use_user_branch``, the
    user-user graph (k = ``cfg.user_knn_k``): kNN over ``dataset.user_features[user_feature]`` (default:
    the first user feature) or, when the dataset has no user features, co-interaction top-k.

    ``timings``, when given, receives the wall seconds of each graph (cache hits included):
    ``graph_ui``, ``knn_<modality>`` per modality and ``user_user``."""
    timings = {} if timings is None else timings
    t = time.perf_counter()
    train = dataset.train
    ui_key = {"train": content_hash(train.users, train.items), "n_users": dataset.n_users,
              "n_items": dataset.n_items}
    user_items = cached(cfg.cache_dir, "user_items", ui_key,
                        lambda: build_user_items(dataset.n_users, dataset.n_items, train.users, train.items))
    item_users = cached(cfg.cache_dir, "item_users", ui_key, user_items.transpose)
    ui = UserItemGraph.from_csr(user_items, item_users)
    timings["graph_ui"], t = time.perf_counter() - t, time.perf_counter()

    item_item = {}
    for m in modalities:
        if m not in dataset.item_features:
            raise KeyError(f"item modality {m!r} not in the dataset (has: {sorted(dataset.item_features)})")
        feats = dataset.item_features[m]
        kw, key = knn_options(cfg, int(feats.shape[0]))
        item_item[m] = cached(cfg.cache_dir, "item_knn", {"features": feats, "k": cfg.item_knn_k, **key},
                              lambda feats=feats, kw=kw: knn_graph(feats, cfg.item_knn_k, **kw))
        timings[f"knn_{m}"], t = time.perf_counter() - t, time.perf_counter()

    user_user = None
    if use_user_branch:
        if dataset.user_features:
            name = user_feature or next(iter(dataset.user_features))
            feats = dataset.user_features[name]
            log.info("user-user graph: kNN over user feature %r", name)
            kw, key = knn_options(cfg, int(feats.shape[0]))
            user_user = cached(cfg.cache_dir, "user_knn", {"features": feats, "k": cfg.user_knn_k, **key},
                               lambda: user_knn_from_embeddings(feats, cfg.user_knn_k, **kw))
        else:
            log.info("user-user graph: no user features; co-interaction top-%d", cfg.user_knn_k)
            user_user = cached(cfg.cache_dir, "user_cointeraction", {**ui_key, "k": cfg.user_knn_k},
                               lambda: user_graph_from_interactions(ui, cfg.user_knn_k))
        timings["user_user"] = time.perf_counter() - t
    return Graphs(ui, item_item, user_user)
