"""RecGOAT on neighbour-sampled mini-batches (DESIGN.md section 1).

    user  = LightGCN_u + beta * GAT_user(Linear(pref))            (second term only with the user branch)
    id_i  = LightGCN_i + w_knn * mean_m (S_m^L e)_i                (second term only with item_knn_id_layers;
                                                                    m over item_knn_id_modalities; with
                                                                    item_knn_id_combine "mean":
                                                                    1/L sum_l S_m^l e)
    item  = Fusion(id_i, {GAT_m(Linear(feat_m))}_m)                (OAT | concat | sum | none)
    score(u, i) = <user_u, item_i>       (with ``score_fused: false``: <user_u, id_i + w_s * sum_m view_m(i)>,
                                          w_s = score_view_weight, 0 by default; see below)
    loss  = BPR(user, item+, item-) + l2 * L2(raw ID embeddings) + cmcl_weight * CMCL + w_weight * sum_m W_m
            + modality_bpr_weight * sum_m BPR(LightGCN_u, view_m(item+), view_m(item-))
              (view_m = GAT_m(...) with ``modality_bpr_views: raw``, OAT's aligned_m with ``aligned``)
    CMCL  = mean of InfoNCE(user, item+), InfoNCE(view_a, view_b) for every pair of item views
            (ID, each modality; over the batch's positive items), and
            InfoNCE(user ID view, user preference view) when the user branch is on — all MINIMISED.

Design choices:
- Built on any device, ``meta`` included: no data in constructors; ``embeddings.materialize_``
  allocates and initialises (or the sharder does, for the ID tables).
- Branch switches: ``use_item_modalities`` / ``modalities`` select item modalities (zero -> pure
  LightGCN: the fused item is the LightGCN item), ``use_user_branch`` needs user preference
  features (``user_feature_dim``); ``fusion`` picks the fusion.
- Item-item ID propagation (FREEDOM, Zhou et al. 2023; ``item_knn_id_layers`` L > 0): the raw item
  ID embeddings are propagated L layers over each used modality's kNN graph (or those listed in
  ``item_knn_id_modalities``), symmetric-normalised
  on its binary edges (``S_m = D^-1/2 A_m D^-1/2``, full-graph degrees ``degrees["knn_<m>"]``), and
  the mean over modalities is added to the LightGCN item: items with similar content share
  collaborative signal, which reaches cold items (no training interactions) too. The item-item
  subgraphs carry ``max(gat_layers, L)`` hops for the propagation's modalities and ``gat_layers``
  for the others (:func:`item_item_hops`: each graph only as deep as its consumers read); the GATs
  and this term each use their last hops, and the extra source items are looked up in the same
  ID-table call as the user-item ones.
- ``score_fused: false`` (the FREEDOM protocol): the ID item scores, and the modality views and the
  fusion shape the model through the loss only (modality BPR, CMCL): they pull the shared user
  representation towards what content predicts without adding their noise to every score. On TikTok
  the fused scoring item cost more than the views gave (see configs/tiktok.yaml). ``score_view_weight``
  w_s > 0 adds the views (OAT-aligned with fusion ``oat``, raw otherwise) to the ID item at scoring
  time only (full-graph inference: evaluation, export): a late fusion of the ID scorer with the
  modality scorers the modality BPR trains; the mini-batch ``item`` (training's BPR) stays the ID item.
- The user branch is added to the LightGCN user with a learnable scalar ``beta`` (init
  ``alpha_init``), so at initialisation the collaborative signal dominates, as for the items.
- Loss convention ("shares", needed for rank-invariant training): every term returned by
  ``compute_loss`` has the VALUE of the global-batch loss (all ranks print the same number) and the
  GRADIENT of this rank's share, where the shares sum to the global loss: BPR and L2 are sums over
  local triples divided by the GLOBAL batch size, InfoNCE follows ``losses.infonce``, the W term is
  scaled by 1/world_size in the gradient (it is computed identically on every rank from all-reduced
  statistics whose autograd all-reduce sums gradients back). Summing parameter gradients over ranks
  therefore gives exactly the gradient of the single-process loss on the concatenated batch; an
  averaging reducer (DDP, DeepSpeed) must be compensated by scaling the loss by world_size.
- OAT statistics are taken over the triples' items (pos and neg, with multiplicity), so their sums
  over ranks are the global batch's; eval uses the training EMA (see ``fusion.py``).
- Full-graph inference (``compute_all_representations``) runs the same maths layer by layer over the
  CSRs in chunks — the exactness test ties the two paths together. Given a ``RowShard`` it runs
  row-sharded over ranks (each rank its row blocks, per-layer all-gathers), bit-identical row for row.
"""
from __future__ import annotations

from itertools import combinations
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from goat_dist.config import MODALITY_BPR_VIEWS, LossConfig, ModelConfig, OTConfig
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger
from goat_dist.losses import InfoNCE, bpr_loss, global_value_local_grad, l2_loss
from goat_dist.model.embeddings import IdEmbeddings
from goat_dist.model.fusion import FusionOutput, OATFusion, ReduceStats, build_fusion
from goat_dist.model.gat import FeatureSource, GATEncoder, gather_features
from goat_dist.model.lightgcn import (RowShard, full_graph_knn_propagate, full_graph_lightgcn, knn_propagate_blocks,
                                     lightgcn_blocks)
from goat_dist.sampling.blocks import ITEM, USER, USER_USER, MiniBatch, SampledSubgraph, item_item_relation

log = get_logger(__name__)


def used_modalities(cfg: ModelConfig, available: Mapping[str, Any]) -> list[str]:
    """The item modalities the model uses: ``cfg.modalities`` (all of ``available``, sorted, when
    empty); ``[]`` with ``use_item_modalities`` off. Raises ``ValueError`` naming ``model.modalities``
    when it lists one that ``available`` (the dataset's item features) lacks."""
    if not cfg.use_item_modalities:
        return []
    unknown = [m for m in cfg.modalities if m not in available]
    if unknown:
        raise ValueError(f"model.modalities {unknown} not among the dataset's item features {sorted(available)}")
    return list(cfg.modalities) or sorted(available)


def knn_id_modalities(cfg: ModelConfig, modalities: Sequence[str]) -> list[str]:
    """The modalities whose kNN graphs carry the item-item ID propagation: ``item_knn_id_modalities``
    (all of ``modalities`` when empty); ``[]`` when ``item_knn_id_layers`` is 0. Raises
    ``ValueError`` naming the key when it lists a modality that is not used."""
    if not cfg.item_knn_id_layers:
        return []
    out = list(cfg.item_knn_id_modalities) or list(modalities)
    stray = [m for m in out if m not in modalities]
    if stray:
        raise ValueError(f"model.item_knn_id_modalities {stray} are not among the used modalities {list(modalities)}")
    return out


def item_item_hops(cfg: ModelConfig, modalities: Sequence[str]) -> dict[str, int]:
    """modality -> hops its kNN graph must be sampled with: ``gat_layers`` for its GAT view, and
    ``item_knn_id_layers`` where the ID propagation runs over it (the sampler's ``hops["item_item"]``)."""
    knn = set(knn_id_modalities(cfg, modalities))
    return {m: max(int(cfg.gat_layers), int(cfg.item_knn_id_layers) if m in knn else 0) for m in modalities}


class RecGOAT(nn.Module):
    """The composed model. See the module docstring for the maths.

    Args:
        cfg, ot_cfg: model and OT sections of the config.
        n_users, n_items: table sizes (ids are range-checked against them).
        item_feature_dims: modality name -> feature width, for every modality the dataset HAS
            (``cfg.modalities`` selects among them; empty = all, sorted by name).
        user_feature_dim: width of the user preference embeddings, or None (no user branch).
        device: where parameters are created; ``"meta"`` builds without memory.
    """

    def __init__(self, cfg: ModelConfig, ot_cfg: OTConfig, n_users: int, n_items: int,
                 item_feature_dims: Mapping[str, int], user_feature_dim: int | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.cfg, self.ot_cfg = cfg, ot_cfg
        self.n_users, self.n_items, self.dim = int(n_users), int(n_items), int(cfg.dim)
        self.modalities: list[str] = used_modalities(cfg, item_feature_dims)
        self.use_user_branch = bool(cfg.use_user_branch and user_feature_dim is not None)
        self.knn_id_layers = int(cfg.item_knn_id_layers)
        if self.knn_id_layers < 0:
            raise ValueError(f"model.item_knn_id_layers must be >= 0, got {self.knn_id_layers}")
        if self.knn_id_layers and not self.modalities:
            raise ValueError("model.item_knn_id_layers > 0 propagates over the item modalities' kNN graphs: "
                             "it needs use_item_modalities and at least one modality")
        self.knn_modalities: list[str] = knn_id_modalities(cfg, self.modalities)
        self.score_view_weight = float(cfg.score_view_weight)
        if self.score_view_weight < 0:
            raise ValueError(f"model.score_view_weight must be >= 0, got {self.score_view_weight}")
        if self.score_view_weight and (cfg.score_fused or not self.modalities):
            raise ValueError("model.score_view_weight > 0 adds the modality views to the ID item that scores: it "
                             "needs model.score_fused false and at least one item modality "
                             f"(score_fused {cfg.score_fused}, modalities {self.modalities or 'none'})")
        if cfg.use_user_branch and user_feature_dim is None:
            log.info("model.use_user_branch is on but the dataset has no user features: user branch off")
        device = torch.device(device) if device is not None else torch.device("cpu")
        with device:
            self.id_emb = IdEmbeddings(n_users, n_items, cfg.dim, device=device)
            self.item_encoders = nn.ModuleDict({
                m: GATEncoder(item_feature_dims[m], cfg.dim, item_item_relation(m), cfg.gat_layers, cfg.gat_heads,
                              cfg.dropout) for m in self.modalities})
            self.fusion = build_fusion(cfg.fusion, cfg.dim, len(self.modalities), cfg.alpha_init, cfg.dropout,
                                       ot_cfg, cfg.oat_ema_momentum, cfg.fusion_normalize)
            if self.use_user_branch:
                self.user_encoder = GATEncoder(int(user_feature_dim), cfg.dim, USER_USER, cfg.gat_layers,
                                               cfg.gat_heads, cfg.dropout)
                self.user_beta = nn.Parameter(torch.full((), float(cfg.alpha_init)))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Top-level parameters only (children reset themselves; see ``embeddings.materialize_``)."""
        if self.use_user_branch:
            self.user_beta.fill_(float(self.cfg.alpha_init))

    # ------------------------------------------------------------------------------------------
    # Mini-batch forward

    @staticmethod
    def _last_hops(sub: SampledSubgraph | None, hops: int, what: str) -> SampledSubgraph | None:
        """The seeds' ``hops``-hop subgraph: the last ``hops`` blocks of ``sub`` (which may have more)."""
        if sub is None or len(sub.blocks) == hops:
            return sub
        if len(sub.blocks) < hops:
            raise ValueError(f"{what}: {hops} hops need as many sampled item-item blocks, got {len(sub.blocks)}")
        return SampledSubgraph(sub.seeds, sub.blocks[len(sub.blocks) - hops:])

    def _item_views(self, batch: MiniBatch, item_features: Mapping[str, FeatureSource]) -> Tensor:
        xs = []
        for m in self.modalities:
            if m not in item_features:
                raise KeyError(f"item features for modality {m!r} missing (have {sorted(item_features)})")
            sub = self._last_hops(batch.item_item.get(m), self.cfg.gat_layers, f"GAT over modality {m!r}")
            xs.append(self.item_encoders[m](sub, item_features[m], seeds=batch.unique_items))
        if not xs:
            return torch.zeros((0, batch.unique_items.numel(), self.dim), device=batch.unique_items.device)
        return torch.stack(xs)

    def forward(self, batch: MiniBatch, item_features: Mapping[str, FeatureSource] | None = None,
                user_features: FeatureSource | None = None, degrees: Mapping[str, Tensor] | None = None,
                reduce_stats: ReduceStats | None = None) -> dict[str, Any]:
        """Representations of the batch's unique users and items.

        Args:
            batch: ``MiniBatch`` with ``ui`` (``id_layers`` blocks), ``item_item[m]`` for every used
                modality and ``user_user`` when the user branch is on (``gat_layers`` blocks each).
            item_features: modality -> [n_items, f_m] tensor / numpy memmap / callable(ids).
            user_features: [n_users, f_u] source (user branch only).
            degrees: full-graph degrees ``{"user": [n_users], "item": [n_items]}`` (e.g.
                ``graphs.ui.user_degree`` / ``item_degree``, on the model's device) for the unbiased
                sampled LightGCN: REQUIRED whenever a user-item fanout can be below a node's degree
                (the sampler does not rescale edge weights); None = no rescaling, exact at fanout -1.
                With ``item_knn_id_layers`` also ``"knn_<m>"`` [n_items] for every used modality:
                the kNN graph's row lengths (``graphs.item_item[m].degrees()``), always required.
            reduce_stats: applied to the packed OAT statistics before the solve (all-reduce them).

        Returns a dict (U = len(unique_users), I = len(unique_items), M = #modalities):
            ``user`` [U, d] (scoring representation), ``item`` [I, d] (fused, scoring),
            ``user_id`` [U, d] / ``item_id`` [I, d] (LightGCN outputs),
            ``item_views`` {"id": [I, d], m: [I, d]}, ``user_views`` {"id", "pref"} or {},
            ``user_emb0`` [U, d] / ``item_emb0`` [I, d] (raw ID embeddings, for L2),
            ``W`` [M] or None, ``fusion`` (``FusionOutput``: plan, cost, weights ...).
        """
        item_features = item_features or {}
        nu, ni = batch.unique_users.numel(), batch.unique_items.numel()
        if self.cfg.id_layers > 0:
            if batch.ui is None or len(batch.ui.blocks) != self.cfg.id_layers:
                got = None if batch.ui is None else len(batch.ui.blocks)
                raise ValueError(f"model.id_layers={self.cfg.id_layers} needs as many user-item blocks, got {got}")
            sub = batch.ui
            src_u, src_i = sub.blocks[0].src_nodes[USER], sub.blocks[0].src_nodes[ITEM]
        else:
            sub = SampledSubgraph({USER: batch.unique_users, ITEM: batch.unique_items}, [])
            src_u, src_i = batch.unique_users, batch.unique_items
        if sub.seeds[USER].numel() != nu or sub.seeds[ITEM].numel() != ni:
            raise ValueError("the user-item subgraph's seeds must be the batch's unique users and items")
        knn_subs = self._knn_subgraphs(batch, degrees)
        extra = [s.blocks[0].src_nodes[ITEM] if s.blocks else s.seeds[ITEM] for s in knn_subs.values()]
        e_u, e_i = self.id_emb(src_u, torch.cat([src_i, *extra]) if extra else src_i)
        e_i, *e_knn = torch.split(e_i, [src_i.numel(), *(x.numel() for x in extra)]) if extra else (e_i,)
        u_id, i_id = lightgcn_blocks(sub, e_u, e_i, None if degrees is None else dict(degrees))
        if knn_subs:
            props = [knn_propagate_blocks(s, item_item_relation(m), h, degrees[f"knn_{m}"],
                                          self.cfg.item_knn_id_combine)
                     for (m, s), h in zip(knn_subs.items(), e_knn)]
            i_id = i_id + self.cfg.item_knn_id_weight * self._mean(props)

        xs = self._item_views(batch, item_features)
        rows = torch.cat([batch.pos_index, batch.neg_index])
        fo: FusionOutput = self.fusion(i_id, xs, stats_rows=rows, reduce_stats=reduce_stats)

        user, user_views = u_id, {}
        if self.use_user_branch:
            if user_features is None:
                raise ValueError("the user branch is on: pass user_features")
            u_pref = self.user_encoder(batch.user_user, user_features, seeds=batch.unique_users)
            user = u_id + self.user_beta * u_pref
            user_views = {"id": u_id, "pref": u_pref}
        item_views = {"id": i_id, **{m: xs[k] for k, m in enumerate(self.modalities)}}
        aligned = {} if fo.aligned is None else {m: fo.aligned[k] for k, m in enumerate(self.modalities)}
        return {"user": user, "item": fo.fused if self.cfg.score_fused else i_id, "user_id": u_id, "item_id": i_id,
                "item_views": item_views, "item_aligned": aligned, "user_views": user_views,
                "user_emb0": e_u[:nu], "item_emb0": e_i[:ni], "W": fo.W, "fusion": fo}

    def _knn_subgraphs(self, batch: MiniBatch, degrees: Mapping[str, Tensor] | None) -> dict[str, SampledSubgraph]:
        """modality -> the subgraph of the item-item ID propagation (empty when it is off)."""
        if not self.knn_id_layers:
            return {}
        subs = {}
        for m in self.knn_modalities:
            if degrees is None or f"knn_{m}" not in degrees:
                raise ValueError(f"model.item_knn_id_layers: pass degrees['knn_{m}'] (the row lengths of "
                                 f"modality {m!r}'s kNN graph)")
            sg = batch.item_item.get(m)
            if sg is None:
                raise ValueError(f"model.item_knn_id_layers: the batch has no item-item subgraph for modality {m!r}")
            subs[m] = self._last_hops(sg, self.knn_id_layers, f"item-item ID propagation over {m!r}")
        return subs

    @staticmethod
    def _mean(xs: list[Tensor]) -> Tensor:
        """Mean of equal-shape tensors, summed in list order (both forward paths use it)."""
        acc = xs[0]
        for x in xs[1:]:
            acc = acc + x
        return acc / len(xs)

    # ------------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, out: Mapping[str, Any], batch: MiniBatch, loss_cfg: LossConfig, rank: int = 0,
                     world_size: int = 1, group=None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and its (unweighted) parts, following the "shares" convention of the module
        docstring (world_size 1: the plain loss).

        Args:
            out: the dict returned by ``forward`` for ``batch``.
            loss_cfg: weights (``l2``, ``cmcl_weight``), ``temperature`` and the InfoNCE options;
                the W weight is ``ot_cfg.w_weight`` (constructor).
            rank, world_size, group: this process's place in the data-parallel group (the InfoNCE
                all-gathers and the batch-size all-reduce use them; world_size 1 never communicates).

        Returns ``(total, parts)``: ``total`` to backpropagate; ``parts`` = {"bpr", "l2", "cmcl", "w",
        "loss"} as detached 0-dim tensors (unweighted values; equal on every rank; ``loss`` = total) —
        call ``float()`` only when logging, to avoid a device sync per step.
        """
        b_local = batch.users.numel()
        device = out["user"].device
        if world_size > 1:
            b = torch.tensor([b_local], dtype=torch.float64, device=device)
            dist.all_reduce(b, group=group)
            b_global = float(b.item())
        else:
            b_global = float(b_local)
        b_global = max(b_global, 1.0)
        share = lambda t: global_value_local_grad(t, world_size, group)  # noqa: E731

        u = out["user"].index_select(0, batch.user_index)
        pos = out["item"].index_select(0, batch.pos_index)
        neg = out["item"].index_select(0, batch.neg_index)
        bpr = share(bpr_loss(u, pos, neg, denom=b_global))
        l2 = share(l2_loss(out["user_emb0"].index_select(0, batch.user_index),
                           out["item_emb0"].index_select(0, batch.pos_index),
                           out["item_emb0"].index_select(0, batch.neg_index), denom=b_global))
        total = bpr + loss_cfg.l2 * l2

        mod_bpr = torch.zeros((), device=device)
        if loss_cfg.modality_bpr_weight > 0 and self.modalities:
            u_id = out["user_id"].index_select(0, batch.user_index)
            views = self._modality_bpr_views(out, loss_cfg.modality_bpr_views)
            mod_bpr = share(torch.stack([bpr_loss(u_id, views[m].index_select(0, batch.pos_index),
                                                  views[m].index_select(0, batch.neg_index), denom=b_global)
                                         for m in self.modalities]).sum())
            total = total + loss_cfg.modality_bpr_weight * mod_bpr

        cmcl = torch.zeros((), device=device)
        if loss_cfg.cmcl_weight > 0:
            nce = InfoNCE(loss_cfg.temperature, rank=rank, world_size=world_size,
                          local_loss=loss_cfg.infonce_local_loss, chunk_size=loss_cfg.infonce_chunk_size or None,
                          symmetric=loss_cfg.infonce_symmetric, group=group)
            which = set(loss_cfg.cmcl_terms)
            terms = [nce(u, pos, batch.users, batch.pos_items)] if "user_item" in which else []
            # Item views over the triples' POSITIVE items (B rows, repeats masked as false negatives):
            # the [B, B] logits of every view pair are the dominant cost of a RecGOAT step on CPU,
            # and pos + neg rows would make them 4x larger for little extra signal.
            views = out["item_views"] if "item_views" in which else {}
            for va, vb in combinations(list(views), 2):
                terms.append(nce(views[va].index_select(0, batch.pos_index),
                                 views[vb].index_select(0, batch.pos_index), batch.pos_items, batch.pos_items))
            if out["user_views"] and "user_views" in which:
                uv = out["user_views"]
                terms.append(nce(uv["id"].index_select(0, batch.user_index), uv["pref"].index_select(0, batch.user_index),
                                 batch.users, batch.users))
            if not terms:
                raise ValueError(f"loss.cmcl_terms {list(loss_cfg.cmcl_terms)} leaves CMCL without a term for this "
                                 f"model (item views need modalities, user views the user branch); set "
                                 f"loss.cmcl_weight 0 to turn CMCL off")
            cmcl = torch.stack(terms).mean()
            total = total + loss_cfg.cmcl_weight * cmcl

        w = torch.zeros((), device=device)
        if out.get("W") is not None:
            w_sum = out["W"].sum()
            w = w_sum / world_size + (w_sum - w_sum / world_size).detach()
            if self.ot_cfg.w_weight > 0:
                total = total + self.ot_cfg.w_weight * w
        parts = {"bpr": bpr.detach(), "l2": l2.detach(), "cmcl": cmcl.detach(), "w": w.detach(),
                 "loss": total.detach()}
        if loss_cfg.modality_bpr_weight > 0 and self.modalities:
            parts["mod_bpr"] = mod_bpr.detach()
        return total, parts

    def _modality_bpr_views(self, out: Mapping[str, Any], which: str) -> Mapping[str, Tensor]:
        if which == "raw":
            return out["item_views"]
        if which not in MODALITY_BPR_VIEWS:
            raise ValueError(f"loss.modality_bpr_views must be one of {', '.join(MODALITY_BPR_VIEWS)}, got {which!r}")
        if not out.get("item_aligned"):
            raise ValueError(f"loss.modality_bpr_views 'aligned' needs model.fusion 'oat' (OAT's transported "
                             f"views), got fusion {self.cfg.fusion!r}")
        return out["item_aligned"]

    # ------------------------------------------------------------------------------------------
    # Full-graph inference

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @torch.no_grad()
    def compute_all_representations(self, user_items: CSR, item_users: CSR,
                                    item_features: Mapping[str, FeatureSource] | None = None,
                                    user_features: FeatureSource | None = None,
                                    item_graphs: Mapping[str, CSR] | None = None, user_graph: CSR | None = None,
                                    chunk_size: int = 65536, user_ids: Tensor | None = None,
                                    shard: RowShard | None = None, stream_users: bool = False) -> tuple[Tensor, Tensor]:
        """Scoring representations of ALL items and of all (or the given) users (eval mode, full
        graphs, chunked; optionally row-sharded over ranks).

        Args:
            user_items: training CSR, rows = users, columns = items, values = 1/sqrt(deg_u deg_i)
                (computed from the CSR when values is None). ``item_users``: its transpose.
            item_features / user_features: as in ``forward``.
            item_graphs: modality -> item-item kNN CSR (row v lists v's neighbours);
                ``user_graph``: user-user CSR (user branch).
            chunk_size: at most this many rows per chunk for lookups, propagation and fusion.
            user_ids: only these users' representations (the final user table is never built for
                the others; e.g. the eval users). Single process: the user branch runs over their
                ``gat_layers``-hop user-user neighbourhood only (equal to the full graph's rows up to
                float rounding).
            shard: ``RowShard`` of this rank: LightGCN layers, modality encoders, fusion and the
                user branch run on this rank's row blocks (per-layer all-gathers); the fused item
                table is all-gathered. Collective: every rank calls it with the same arguments.
                Bit-identical, row for row, to the single-process call.
            stream_users: single process with ``user_ids``: the LightGCN pass holds no [n_users, d]
                buffer (``full_graph_lightgcn(stream_users=True)``; equal up to float rounding).

        The OAT plan comes from the training EMA of the statistics (as in eval-mode ``forward``);
        before any training step, from the statistics of all items. Dropout is off.

        **Shapes:** -> (user_reps [n_users, d] | [len(user_ids), d] | with a shard: the rows of this
        rank's user block (of ``user_ids`` in it), item_reps [n_items, d]);
        score = user_reps @ item_reps.T.
        """
        was_training = self.training
        self.eval()
        sh = shard or RowShard()
        try:
            device = self._device()
            empty = torch.empty(0, dtype=torch.int64, device=device)

            def lookup(node_type: str, ids: Tensor) -> Tensor:
                if node_type == USER:
                    return self.id_emb(ids, empty)[0]
                return self.id_emb(empty, ids)[1]

            u_id, i_id = full_graph_lightgcn(user_items, item_users, lookup, self.cfg.id_layers, self.dim,
                                             device, chunk_size, user_ids=user_ids, shard=sh,
                                             stream_users=stream_users)
            item_features, item_graphs = item_features or {}, item_graphs or {}
            if self.knn_id_layers:
                missing = [m for m in self.knn_modalities if item_graphs.get(m) is None]
                if missing:
                    raise ValueError(f"model.item_knn_id_layers: item_graphs lack the kNN graphs of {missing}")
                props = [full_graph_knn_propagate(item_graphs[m], lookup, self.knn_id_layers, self.dim, device,
                                                  chunk_size, shard=sh, combine=self.cfg.item_knn_id_combine)
                         for m in self.knn_modalities]
                i_id = i_id + self.cfg.item_knn_id_weight * self._mean(props)
            views_score = self.cfg.score_fused or self.score_view_weight > 0
            xs = [self.item_encoders[m].full_graph(item_graphs.get(m), item_features[m], self.n_items, chunk_size,
                                                   shard=sh) for m in self.modalities] if views_score else []
            i0, i1 = sh.block(self.n_items, chunk_size)
            chunks = [(s - i0, e - i0) for s, e in sh.chunks(self.n_items, chunk_size) if e > s]
            items = sh.full_buffer(self.n_items, chunk_size, self.dim, device)
            block = items[:sh.block_rows(self.n_items, chunk_size)] if sh.world_size == 1 else \
                items.new_empty((sh.block_rows(self.n_items, chunk_size), self.dim))
            plan = None
            if xs and isinstance(self.fusion, OATFusion):
                flat = self.fusion.ema_statistics()
                if flat is None:  # before any training step: statistics of ALL items
                    flat = self.fusion.statistics(*self._gather_items(i_id, torch.stack(xs), sh, chunk_size))
                plan, _, _ = self.fusion.solve(flat)
            if not self.cfg.score_fused:  # the FREEDOM protocol: the ID item scores (+ w * its views)
                for s, e in chunks:
                    block[s:e] = i_id[s:e]
                    if xs:  # score_view_weight > 0; views stacked per chunk: no [M, n_items, d] copy
                        part = torch.stack([x[s:e] for x in xs])
                        views = part if plan is None else self.fusion.fuse(i_id[s:e], part, plan)[1]
                        block[s:e] += self.score_view_weight * views.sum(0)
            elif plan is not None:
                for s, e in chunks:
                    block[s:e] = self.fusion.fuse(i_id[s:e], torch.stack([x[s:e] for x in xs]), plan)[0]
            else:
                for s, e in chunks:
                    part = torch.stack([x[s:e] for x in xs]) if xs else i_id.new_zeros((0, e - s, self.dim))
                    block[s:e] = self.fusion(i_id[s:e], part).fused
            sh.gather(items, block)
            users = u_id
            if self.use_user_branch:
                if user_features is None:
                    raise ValueError("the user branch is on: pass user_features")
                if user_ids is not None and sh.world_size == 1:
                    pref = self._user_branch_at(user_ids, user_graph, user_features, chunk_size, device)
                else:
                    pref = self.user_encoder.full_graph(user_graph, user_features, self.n_users, chunk_size,
                                                        shard=sh)
                    if user_ids is not None:
                        u0, u1 = sh.block(self.n_users, chunk_size)
                        ids = user_ids.to(torch.int64).to(device)
                        pref = pref.index_select(0, ids[(ids >= u0) & (ids < u1)] - u0)
                users = u_id + self.user_beta * pref
            return users, items[:self.n_items]
        finally:
            self.train(was_training)

    def _user_branch_at(self, user_ids: Tensor, user_graph: CSR | None, user_features: FeatureSource,
                        chunk_size: int, device: torch.device) -> Tensor:
        """The user branch's preference view of ``user_ids`` only (distinct ids, any order): the user
        GAT over their ``gat_layers``-hop user-user neighbourhood (``CSR.khop_subgraph``: full rows
        inside, so each seed's output is its full-graph row up to float rounding), features read for
        those nodes only -- never the [n_users, d] buffers of the full-graph call (10 GB at 20M users).

        **Shapes:** user_ids [n] -> [n, d]."""
        ids = user_ids.to(torch.int64).cpu()
        if self.user_encoder.num_layers and user_graph is not None:
            nodes, local = user_graph.khop_subgraph(ids, self.user_encoder.num_layers)
        else:   # no GAT layers: the projection of the users' own features (a missing graph raises below)
            nodes, local = ids, user_graph
        order = torch.argsort(nodes)    # read memory-mapped feature rows in ascending order
        feats = torch.empty((nodes.numel(), self.user_encoder.proj.in_features), device=device)
        feats[order.to(device)] = gather_features(user_features, nodes[order], device)
        return self.user_encoder.full_graph(local, feats, nodes.numel(), chunk_size)[:ids.numel()]

    def _gather_items(self, i_id: Tensor, xs: Tensor, sh: RowShard, chunk_size: int) -> tuple[Tensor, Tensor]:
        """Full [n_items, d] ID view and [M, n_items, d] modality views from this rank's blocks (for
        the all-item OAT statistics, only needed before the first training step)."""
        if sh.world_size == 1:
            return i_id, xs
        b = sh.block_rows(self.n_items, chunk_size)

        def full(x: Tensor) -> Tensor:
            blk = x.new_zeros((b, x.shape[1]))
            blk[:x.shape[0]] = x
            out = sh.full_buffer(self.n_items, chunk_size, x.shape[1], x.device)
            sh.gather(out, blk)
            return out[:self.n_items]

        return full(i_id), torch.stack([full(x) for x in xs.unbind(0)])
