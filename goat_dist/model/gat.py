"""Modality encoders: Linear projection, then PyG ``GATConv`` layers over sampled kNN blocks.

    h^(0) = x W_p + b_p                       (feature_dim -> d)
    h^(l+1)_v = GATConv_l((h^(l)_src, h^(l)_dst), edges)_v,  ELU between layers (not after the last)

Used for every item modality (item-item kNN graph of that modality) and for the user branch (user
preference embeddings over the user-user graph).

Design choices:
- Bipartite form ``GATConv((x_src, x_dst), edge_index)`` per block; destination nodes are a prefix of
  the source nodes, so GATConv's own self-loops (``add_self_loops=True``: existing self-loops are
  removed, then one (v, v) per destination is added) connect each node to ITSELF whether or not the
  sampler kept the kNN graph's self-loop edge. Hence the sampled result with fanout -1 equals GATConv
  on the full graph.
- Heads are averaged (``concat=False``) so every layer keeps width d whatever ``heads`` is;
  attention dropout = ``dropout``.
- Features are read lazily: only the rows of ``blocks[0].src_nodes`` (the input nodes of the batch)
  are gathered, from a tensor, a numpy array / memmap, or a callable ``ids -> rows``; float16 rows
  are converted to float32 after the gather, so a float16 memmap never gets fully converted.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GATConv

from goat_dist.graph.csr import CSR
from goat_dist.model.lightgcn import RowShard
from goat_dist.sampling.blocks import Relation, SampledSubgraph

FeatureSource = Union[Tensor, np.ndarray, Callable[[Tensor], Any]]


def gather_features(source: FeatureSource, ids: Tensor, device: torch.device | str) -> Tensor:
    """Rows ``ids`` of a feature source as float32 on ``device``.

    **Shapes:** ids [n] int64 -> [n, feature_dim].
    """
    if callable(source) and not isinstance(source, (Tensor, np.ndarray)):
        rows = source(ids)
    elif isinstance(source, Tensor):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= source.shape[0]):
            raise IndexError(f"feature rows must lie in [0, {source.shape[0]}), got [{int(ids.min())}, {int(ids.max())}]")
        rows = source.index_select(0, ids.to(source.device))
    else:
        idx = ids.detach().cpu().numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= source.shape[0]):
            raise IndexError(f"feature rows must lie in [0, {source.shape[0]}), got [{idx.min()}, {idx.max()}]")
        rows = torch.from_numpy(np.ascontiguousarray(source[idx]))
    rows = torch.as_tensor(rows)
    return rows.to(device=device, dtype=torch.float32)


class GATEncoder(nn.Module):
    """Linear(feature_dim -> d) + ``layers`` GATConv(d -> d) layers over one relation's blocks.

    ``forward(subgraph, features)`` returns the representations of the subgraph's seeds.

    **Shapes:** features [n_nodes, feature_dim] (any FeatureSource) -> [n_seeds, d].
    """

    def __init__(self, feature_dim: int, dim: int, relation: Relation, layers: int = 1, heads: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.relation, self.node_type, self.num_layers = relation, relation[2], int(layers)
        if relation[0] != relation[2]:
            raise ValueError(f"GATEncoder expects a homogeneous relation, got {relation}")
        self.proj = nn.Linear(feature_dim, dim)
        self.convs = nn.ModuleList(GATConv(dim, dim, heads=heads, concat=False, dropout=dropout, add_self_loops=True)
                                   for _ in range(self.num_layers))

    def forward(self, subgraph: SampledSubgraph | None, features: FeatureSource, seeds: Tensor | None = None) -> Tensor:
        t = self.node_type
        blocks = [] if subgraph is None else subgraph.blocks
        if len(blocks) != self.num_layers:
            raise ValueError(f"GAT over {self.relation}: {self.num_layers} layers need as many sampled blocks, "
                             f"got {len(blocks)}")
        device = self.proj.weight.device
        inputs = blocks[0].src_nodes[t] if blocks else (subgraph.seeds[t] if subgraph is not None else seeds)
        if inputs is None:
            raise ValueError("GATEncoder without blocks needs the seeds")
        h = self.proj(gather_features(features, inputs, device))
        for layer, (conv, block) in enumerate(zip(self.convs, blocks)):
            n_dst = block.n_dst[t]
            h = conv((h, h[:n_dst]), block.edge_index[self.relation])
            if layer + 1 < self.num_layers:
                h = F.elu(h)
        n_seeds = subgraph.seeds[t].numel() if subgraph is not None else h.shape[0]
        return h[:n_seeds]

    @torch.no_grad()
    def full_graph(self, graph: CSR | None, features: FeatureSource, n_nodes: int, chunk_size: int = 65536,
                   shard: RowShard | None = None) -> Tensor:
        """Representations of all ``n_nodes`` nodes, layer by layer, destinations in grid chunks.

        ``graph``: CSR whose row v lists v's in-neighbours (the kNN graph). Each chunk is a 1-hop
        block whose source list is [chunk nodes, the chunk's distinct neighbours], with a row's
        self-loop mapped to its own chunk position, so GATConv sees exactly what a fanout -1 sampled
        block would show it.

        ``shard``: this rank projects and convolves only its row block (``RowShard``; the same grid
        chunks as one process, hence bit-identical rows); every layer but the last is all-gathered,
        and the result is this rank's block ``shard.block(n_nodes)``.

        **Shapes:** -> [n_nodes, d] (with a shard: [r1 - r0, d]).
        """
        sh = shard or RowShard()
        device, dim = self.proj.weight.device, self.proj.out_features
        r_lo, r_hi = sh.block(n_nodes, chunk_size)
        chunks = [(s, e) for s, e in sh.chunks(n_nodes, chunk_size) if e > s]
        blk = torch.empty((sh.block_rows(n_nodes, chunk_size), dim), device=device)
        for s, e in chunks:
            ids = torch.arange(s, e, device=device)
            blk[s - r_lo:e - r_lo] = self.proj(gather_features(features, ids, device))
        if self.num_layers and graph is None:
            raise ValueError(f"GAT over {self.relation} needs its graph for full-graph inference")
        h = sh.full_buffer(n_nodes, chunk_size, dim, device) if self.num_layers else blk
        for layer, conv in enumerate(self.convs):
            sh.gather(h, blk)
            for r0, r1 in chunks:
                e0, e1 = int(graph.indptr[r0]), int(graph.indptr[r1])
                nbr = graph.indices[e0:e1].to(torch.int64).to(device)
                dst = torch.repeat_interleave(torch.arange(r1 - r0, device=device),
                                              (graph.indptr[r0 + 1:r1 + 1] - graph.indptr[r0:r1]).to(device))
                uniq, inv = torch.unique(nbr, return_inverse=True)
                src = torch.where(nbr == dst + r0, dst, inv + (r1 - r0))
                x_src = torch.cat([h[r0:r1], h.index_select(0, uniq)])
                out = conv((x_src, h[r0:r1]), torch.stack([src, dst]))
                blk[r0 - r_lo:r1 - r_lo] = F.elu(out) if layer + 1 < self.num_layers else out
        return blk[:r_hi - r_lo]
