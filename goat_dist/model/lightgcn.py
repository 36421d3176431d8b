"""LightGCN propagation (He et al. 2020) over sampled user-item blocks, and over full CSRs.

    e_u^(k+1) = sum_{i in N(u)} w_ui e_i^(k),   e_i^(k+1) = sum_{u in N(i)} w_ui e_u^(k),
    w_ui = 1 / sqrt(deg_u deg_i)   (FULL-graph degrees: the CSR values, ``Block.edge_weight``)
    e^final = 1/(L+1) sum_{k=0..L} e^(k)

Design choices:
- Mini-batch: one ``Block`` per layer, outermost hop first; a node's layer-k state is the row of its
  local index (destination nodes are a prefix of the source nodes), so the seeds' layer-k states are
  the first ``n_seed`` rows of every layer and the layer mean needs no gathers. Aggregation is one
  ``index_add_`` per relation per layer, no per-node loops.
- Sampling estimator: when a destination node v keeps s_v of its D_v neighbours (uniformly, without
  replacement), its sum is multiplied by D_v / s_v, which makes every layer an unbiased estimate of the
  full sum given the previous layer. This needs the full-graph degrees D (``degrees`` argument, indexed
  by global id); with ``degrees=None`` no rescaling happens, which is exact for fanout -1 (s_v = D_v).
- Full-graph inference (``full_graph_lightgcn``) walks the CSRs in row chunks with the same maths, so
  evaluation never needs the [N, N] adjacency.

**Relations:** ``ITEM_TO_USER`` (messages item -> user; CSR rows = users) and ``USER_TO_ITEM``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from goat_dist.graph.csr import CSR
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, Block, Relation, SampledSubgraph


def aggregate(block: Block, rel: Relation, h_src: Tensor, degrees: Tensor | None = None) -> Tensor:
    """One relation of one block: ``out[v] = scale_v * sum_{(u,v)} w_uv h_src[u]`` for dst nodes v.

    ``scale_v = D_v / s_v`` (full / sampled degree) when ``degrees`` [n_nodes of dst type] is given,
    else 1. Missing edge weights count as 1.

    **Shapes:** h_src [n_src(src_type), d] -> [n_dst(dst_type), d].
    """
    src_t, _, dst_t = rel
    n_dst = block.n_dst[dst_t]
    out = h_src.new_zeros((n_dst, h_src.shape[1]))
    ei = block.edge_index.get(rel)
    if ei is None or ei.numel() == 0:
        return out
    msg = h_src.index_select(0, ei[0])
    w = block.edge_weight.get(rel)
    if w is not None:
        msg = msg * w.to(msg.dtype).unsqueeze(1)
    out = out.index_add(0, ei[1], msg)
    if degrees is not None:
        sampled = torch.bincount(ei[1], minlength=n_dst).to(out.dtype)
        full = degrees.to(out.device)[block.src_nodes[dst_t][:n_dst]].to(out.dtype)
        out = out * (full / sampled.clamp_min(1.0)).unsqueeze(1)
    return out


def lightgcn_blocks(subgraph: SampledSubgraph, h_user: Tensor, h_item: Tensor,
                    degrees: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Mean over layers 0..L of LightGCN states of the seeds, L = len(subgraph.blocks).

    ``h_user``/``h_item`` are the layer-0 (ID) embeddings of ``blocks[0].src_nodes[user/item]``
    (of the seeds when there are no blocks). ``degrees``: optional full-graph degrees
    ``{"user": [n_users], "item": [n_items]}`` for the unbiased sampled estimator.

    **Shapes:** h_user [n_src_u, d], h_item [n_src_i, d] -> ([n_seed_u, d], [n_seed_i, d]).
    """
    nu, ni = subgraph.seeds[USER].numel(), subgraph.seeds[ITEM].numel()
    acc_u, acc_i = h_user[:nu], h_item[:ni]
    for block in subgraph.blocks:
        if h_user.shape[0] != block.src_nodes[USER].numel() or h_item.shape[0] != block.src_nodes[ITEM].numel():
            raise ValueError("LightGCN: layer state does not match the block's source nodes "
                             f"({h_user.shape[0]} vs {block.src_nodes[USER].numel()} users, "
                             f"{h_item.shape[0]} vs {block.src_nodes[ITEM].numel()} items)")
        new_u = aggregate(block, ITEM_TO_USER, h_item, None if degrees is None else degrees[USER])
        new_i = aggregate(block, USER_TO_ITEM, h_user, None if degrees is None else degrees[ITEM])
        h_user, h_item = new_u, new_i
        acc_u = acc_u + h_user[:nu]
        acc_i = acc_i + h_item[:ni]
    scale = 1.0 / (len(subgraph.blocks) + 1)
    return acc_u * scale, acc_i * scale


def csr_norm_values(csr: CSR) -> Tensor:
    """``csr.values`` or, when absent, ``1/sqrt(deg_row deg_col)`` computed from the CSR itself."""
    if csr.values is not None:
        return csr.values
    deg_r = csr.degrees().to(torch.float32)
    deg_c = torch.bincount(csr.indices.to(torch.int64), minlength=csr.n_cols).to(torch.float32)
    rows = torch.repeat_interleave(torch.arange(csr.n_rows), csr.degrees())
    return (deg_r[rows] * deg_c[csr.indices.to(torch.int64)]).clamp_min(1.0).rsqrt()


def csr_spmm(csr: CSR, h: Tensor, chunk_size: int = 65536, values: Tensor | None = None) -> Tensor:
    """``out[r] = sum_{c in row r} values[rc] * h[c]`` in row chunks (memory O(chunk edges * d)).

    **Shapes:** h [n_cols, d] -> [n_rows, d].
    """
    vals = csr_norm_values(csr) if values is None else values
    out = h.new_zeros((csr.n_rows, h.shape[1]))
    indptr = csr.indptr
    for r0 in range(0, csr.n_rows, chunk_size):
        r1 = min(r0 + chunk_size, csr.n_rows)
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e1 == e0:
            continue
        cols = csr.indices[e0:e1].to(torch.int64).to(h.device)
        rows = torch.repeat_interleave(torch.arange(r1 - r0, device=h.device),
                                       (indptr[r0 + 1:r1 + 1] - indptr[r0:r1]).to(h.device))
        msg = h.index_select(0, cols) * vals[e0:e1].to(h.device, h.dtype).unsqueeze(1)
        out[r0:r1].index_add_(0, rows, msg)
    return out


def full_graph_lightgcn(user_items: CSR, item_users: CSR, lookup: Callable[[str, Tensor], Tensor], num_layers: int,
                        dim: int, device: torch.device | str = "cpu", chunk_size: int = 65536
                        ) -> tuple[Tensor, Tensor]:
    """Full-graph LightGCN, layer by layer in row chunks.

    ``lookup(node_type, ids)`` returns the layer-0 embeddings of ``ids`` (called in chunks of
    ``chunk_size`` ids). ``user_items``: rows = users, values = norm; ``item_users``: rows = items.

    **Shapes:** -> ([n_users, d], [n_items, d]).
    """
    n_users, n_items = user_items.n_rows, item_users.n_rows

    def table(node_type: str, n: int) -> Tensor:
        out = torch.empty((n, dim), device=device)
        for s in range(0, n, chunk_size):
            ids = torch.arange(s, min(s + chunk_size, n), device=device)
            out[s:s + ids.numel()] = lookup(node_type, ids).to(out.dtype)
        return out

    h_u, h_i = table(USER, n_users), table(ITEM, n_items)
    vu, vi = csr_norm_values(user_items), csr_norm_values(item_users)
    acc_u, acc_i = h_u.clone(), h_i.clone()
    for _ in range(num_layers):
        h_u, h_i = csr_spmm(user_items, h_i, chunk_size, vu), csr_spmm(item_users, h_u, chunk_size, vi)
        acc_u += h_u
        acc_i += h_i
    return acc_u / (num_layers + 1), acc_i / (num_layers + 1)
