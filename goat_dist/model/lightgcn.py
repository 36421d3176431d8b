"""LightGCN propagation (He et al. 2020) over sampled user-item blocks, and over full CSRs.

    e_u^(k+1) = sum_{i in N(u)} w_ui e_i^(k),   e_i^(k+1) = sum_{u in N(i)} w_ui e_u^(k),
    w_ui = 1 / sqrt(deg_u deg_i)   (FULL-graph degrees: the CSR values, ``Block.edge_weight``)
    e^final = 1/(L+1) sum_{k=0..L} e^(k)

Design choices:
- Mini-batch: one ``Block`` per layer, outermost hop first; a node's layer-k state is the row of its
  local index (destination nodes are a prefix of the source nodes), so the seeds' layer-k states are
  the first ``n_seed`` rows of every layer and the layer mean needs no gathers. Aggregation is one
  sparse-CSR matmul per relation per layer (backward through the transposed CSR), no per-node loops.
- Sampling estimator: when a destination node v keeps s_v of its D_v neighbours (uniformly, without
  replacement), its sum is multiplied by D_v / s_v, which makes every layer an unbiased estimate of the
  full sum given the previous layer. This needs the full-graph degrees D (``degrees`` argument, indexed
  by global id); with ``degrees=None`` no rescaling happens, which is exact for fanout -1 (s_v = D_v).
- Item-item ID propagation (``knn_propagate_blocks`` / ``full_graph_knn_propagate``, FREEDOM-style):
  ``S^L e`` over a modality's kNN graph with ``S = D^-1/2 A D^-1/2`` on its binary edges, the same
  sampled-block estimator and chunked full-graph pass as the user-item layers.
- Full-graph inference (``full_graph_lightgcn``) walks the CSRs in row chunks with the same maths, so
  evaluation never needs the [N, N] adjacency. It is memory-lean (layer buffers reused in place,
  accumulators started from the looked-up table, an optional user subset) and can be row-sharded
  over ranks (``RowShard``: each rank its row block of every layer, the layer all-gathered), with
  results bit-identical row for row to the single-process pass.

**Relations:** ``ITEM_TO_USER`` (messages item -> user; CSR rows = users) and ``USER_TO_ITEM``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from goat_dist.config import KNN_ID_COMBINE
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, Block, Relation, SampledSubgraph

# The sparse-CSR matmul used here (CSR @ dense, forward and backward) is stable; silence torch's blanket
# "beta" notice, once per process.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

log = get_logger(__name__)


class _CSRMatmul(torch.autograd.Function):
    """``A @ h`` with ``A`` a fixed (no-grad) sparse CSR matrix; backward ``A^T @ grad`` through a
    precomputed CSR of ``A^T`` (torch's own sparse-CSR backward transposes on every call)."""

    @staticmethod
    def forward(ctx, a: Tensor, a_t: Tensor, h: Tensor) -> Tensor:  # noqa: D102
        ctx.a_t = a_t
        return a @ h

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return None, None, ctx.a_t @ grad.contiguous()


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """Sparse CSR [n_rows, n_cols] from COO triplets (duplicates kept: they add up in a matmul)."""
    if rows.numel() > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = torch.argsort(rows, stable=True)
        rows, cols, vals = rows.index_select(0, order), cols.index_select(0, order), vals.index_select(0, order)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
    return torch.sparse_csr_tensor(crow, cols, vals, (n_rows, n_cols), check_invariants=False)


def aggregate(block: Block, rel: Relation, h_src: Tensor, degrees: Tensor | None = None) -> Tensor:
    """One relation of one block: ``out[v] = scale_v * sum_{(u,v)} w_uv h_src[u]`` for dst nodes v.

    ``scale_v = D_v / s_v`` (full / sampled degree) when ``degrees`` [n_nodes of dst type] is given,
    else 1. Missing edge weights count as 1.

    Computed as one sparse-CSR matmul ``A @ h_src`` with ``A[v, u] = scale_v w_uv`` (the scale folded
    into the edge values), backward ``A^T @ grad``: no [E, d] message tensor is materialised, which
    is ~5x faster on CPU than gather + ``index_add`` at full fanout.

    **Shapes:** h_src [n_src(src_type), d] -> [n_dst(dst_type), d].
    """
    src_t, _, dst_t = rel
    n_dst = block.n_dst[dst_t]
    ei = block.edge_index.get(rel)
    if ei is None or ei.numel() == 0:
        return h_src.new_zeros((n_dst, h_src.shape[1]))
    src, dst = ei[0], ei[1]
    w = block.edge_weight.get(rel)
    vals = (torch.ones(src.numel(), device=h_src.device, dtype=h_src.dtype) if w is None
            else w.to(h_src.device, h_src.dtype))
    if degrees is not None:
        sampled = torch.bincount(dst, minlength=n_dst).to(h_src.dtype)
        full = degrees.to(h_src.device)[block.src_nodes[dst_t][:n_dst]].to(h_src.dtype)
        vals = vals * (full / sampled.clamp_min(1.0)).index_select(0, dst)
    n_src = h_src.shape[0]
    a = _csr(dst, src, vals, n_dst, n_src)
    if not h_src.requires_grad:
        return a @ h_src
    return _CSRMatmul.apply(a, _csr(src, dst, vals, n_src, n_dst), h_src)


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


GRID_CHUNKS = 64
"""Full-graph passes split the rows of each node type into a fixed grid of at most this many chunks
(each at most ``chunk_size`` rows), whatever the world size, and a rank's block is a run of whole grid
chunks: every dense op (Linear, GATConv, fusion) then sees exactly the same row chunks on one process
as on W, which is what makes sharded evaluation bit-identical (a GEMM's per-row result can depend on
how many rows it is given, e.g. M = 1 takes a gemv path)."""


@dataclass(frozen=True)
class RowShard:
    """Which rows of a full-graph pass this process computes, and how the blocks are joined.

    Rows ``0..n-1`` of a node type are cut into grid chunks of ``chunk(n, chunk_size)`` rows; rank r
    owns rows ``[r * B, min((r + 1) * B, n))`` with ``B = block_rows(n, chunk_size)`` a whole number of
    chunks (the last ranks may own fewer rows, or none). Full per-layer tables are held in buffers of
    ``world_size * B`` rows (global row g at row g; rows >= n are padding), filled by
    ``all_gather(out [W * B, d], block [B, d])`` (``all_gather_into_tensor`` semantics; the caller
    binds the process group). ``RowShard()`` is the single-process pass (one block, no communication).
    """

    rank: int = 0
    world_size: int = 1
    all_gather: Callable[[Tensor, Tensor], Any] | None = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RowShard: rank {self.rank} outside world size {self.world_size}")
        if self.world_size > 1 and self.all_gather is None:
            raise ValueError("RowShard with world_size > 1 needs an all_gather")

    @staticmethod
    def chunk(n: int, chunk_size: int) -> int:
        """Rows per grid chunk: ``min(chunk_size, ceil(n / GRID_CHUNKS))``, at least 1."""
        return max(1, min(int(chunk_size), -(-int(n) // GRID_CHUNKS)))

    def block_rows(self, n: int, chunk_size: int) -> int:
        """Rows per rank block B (a multiple of the grid chunk)."""
        c = self.chunk(n, chunk_size)
        return -(-(-(-int(n) // c)) // self.world_size) * c

    def block(self, n: int, chunk_size: int) -> tuple[int, int]:
        """This rank's rows ``[r0, r1)``."""
        b = self.block_rows(n, chunk_size)
        return min(self.rank * b, n), min((self.rank + 1) * b, n)

    def owner(self, ids: Tensor, n: int, chunk_size: int) -> Tensor:
        """The rank owning each row id. **Shapes:** ids [k] -> [k] int64."""
        return torch.div(ids.to(torch.int64), self.block_rows(n, chunk_size), rounding_mode="floor")

    def chunks(self, n: int, chunk_size: int) -> list[tuple[int, int]]:
        """This rank's grid chunks ``(start, stop)``; the same COUNT on every rank (trailing chunks
        may be empty), so that a collective called once per chunk is called equally often."""
        c, b = self.chunk(n, chunk_size), self.block_rows(n, chunk_size)
        r0 = self.rank * b
        return [(min(s, n), min(s + c, n)) for s in range(r0, r0 + b, c)]

    def full_buffer(self, n: int, chunk_size: int, dim: int, device, dtype=torch.float32) -> Tensor:
        """Uninitialised [W * B, dim] buffer for a gathered table (rows >= n are padding)."""
        return torch.empty((self.world_size * self.block_rows(n, chunk_size), dim), device=device, dtype=dtype)

    def gather(self, out: Tensor, block: Tensor) -> None:
        """``out[r * B:(r + 1) * B] = block of rank r`` for every r (no-op copy-free for W = 1 when
        ``block`` is ``out``). **Shapes:** block [B, d], out [W * B, d]."""
        if self.world_size == 1:
            if block.data_ptr() != out.data_ptr():
                out[:block.shape[0]].copy_(block)
            return
        self.all_gather(out, block.contiguous())


def csr_spmm(csr: CSR, h: Tensor, chunk_size: int = 65536, values: Tensor | None = None,
             out: Tensor | None = None, rows: tuple[int, int] | None = None) -> Tensor:
    """``out[r - r0] = sum_{c in row r} values[rc] * h[c]`` for rows ``[r0, r1)`` (default: all), in row
    chunks, one sparse-CSR matmul per chunk (memory O(chunk edges + chunk rows * d), no [E, d]
    messages). Each row's sum depends only on that row's entries, not on the chunking.

    ``out``: optional preallocated [>= r1 - r0, d] output (written in place, rows of empty CSR rows
    set to 0; it must not overlap ``h``). ``h`` may have more rows than ``csr.n_cols`` (padding).

    **Shapes:** h [>= n_cols, d] -> [r1 - r0, d].
    """
    vals = csr_norm_values(csr) if values is None else values
    r_lo, r_hi = (0, csr.n_rows) if rows is None else (int(rows[0]), int(rows[1]))
    if h.shape[0] > csr.n_cols:
        h = h[:csr.n_cols]
    if out is None:
        out = h.new_empty((r_hi - r_lo, h.shape[1]))
    indptr = csr.indptr
    for r0 in range(r_lo, r_hi, chunk_size):
        r1 = min(r0 + chunk_size, r_hi)
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        dst = out[r0 - r_lo:r1 - r_lo]
        if e1 == e0:
            dst.zero_()
            continue
        cols = csr.indices[e0:e1].to(torch.int64).to(h.device)
        crow = (indptr[r0:r1 + 1] - e0).to(h.device)
        a = torch.sparse_csr_tensor(crow, cols, vals[e0:e1].to(h.device, h.dtype), (r1 - r0, csr.n_cols),
                                    check_invariants=False)
        dst.copy_(a @ h)
    return out[:r_hi - r_lo]


def csr_rows_spmm(csr: CSR, ids: Tensor, h: Tensor, chunk_size: int = 65536, values: Tensor | None = None) -> Tensor:
    """``csr_spmm`` for an arbitrary list of rows ``ids`` (any order, repeats allowed), in chunks of
    ids. Equal, row for row, to the corresponding rows of ``csr_spmm`` over all rows.

    **Shapes:** ids [k], h [>= n_cols, d] -> [k, d].
    """
    vals = csr_norm_values(csr) if values is None else values
    if h.shape[0] > csr.n_cols:
        h = h[:csr.n_cols]
    ids = ids.to(torch.int64).cpu()
    out = h.new_empty((ids.numel(), h.shape[1]))
    for s in range(0, ids.numel(), chunk_size):
        rows = ids[s:s + chunk_size]
        start = csr.indptr[rows]
        deg = csr.indptr[rows + 1] - start
        crow = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        torch.cumsum(deg, 0, out=crow[1:])
        n_e = int(crow[-1])
        if n_e == 0:
            out[s:s + rows.numel()].zero_()
            continue
        # edge positions of the selected rows, row by row in CSR order
        edge = torch.repeat_interleave(start - crow[:-1], deg) + torch.arange(n_e)
        a = torch.sparse_csr_tensor(crow.to(h.device), csr.indices[edge].to(torch.int64).to(h.device),
                                    vals[edge].to(h.device, h.dtype), (rows.numel(), csr.n_cols),
                                    check_invariants=False)
        out[s:s + rows.numel()] = a @ h
    return out


def _t_spmm_add_py(indptr, indices, vals, h, out, r0, r1):  # pragma: no cover - compiled by numba
    d = h.shape[1]
    for r in range(r0, r1):
        for e in range(indptr[r], indptr[r + 1]):
            c = indices[e]
            w = vals[e]
            for k in range(d):
                out[c, k] += w * h[r - r0, k]


try:  # optional: the compiled transposed product (a torch index_add_ path runs without it)
    import numba as _numba
    _t_spmm_add = _numba.njit(cache=True, nogil=True)(_t_spmm_add_py)
except ImportError:  # pragma: no cover - numba is pinned by `make install`
    _t_spmm_add = None


def csr_t_spmm_add(csr: CSR, h: Tensor, out: Tensor, rows: tuple[int, int], values: Tensor | None = None,
                   compiled: bool | None = None) -> Tensor:
    """``out[c] += sum_{r in [r0, r1)} values[rc] * h[r - r0]`` over the entries (r, c) of the rows
    ``[r0, r1)``: the transposed product ``A[r0:r1]^T @ h`` added into ``out`` without building the
    transpose (a user chunk's contribution to every item). Entries are added row by row in CSR order.

    ``compiled``: True = the numba loop (float32/float64 CPU tensors; ~2x a sparse matmul of the
    transposed CSR, in place, no [E, d] messages), False = ``index_add_`` of [E, d] messages (any device),
    None = the compiled loop when numba imports and the tensors are on the CPU.

    **Shapes:** h [r1 - r0, d], out [>= n_cols, d] (updated in place) -> out.
    """
    vals = csr_norm_values(csr) if values is None else values
    r0, r1 = int(rows[0]), int(rows[1])
    if h.shape[0] != r1 - r0:
        raise ValueError(f"csr_t_spmm_add: h has {h.shape[0]} rows for the CSR rows [{r0}, {r1})")
    if r1 <= r0:
        return out
    fits = h.device.type == out.device.type == vals.device.type == "cpu" and out.is_contiguous() \
        and h.dtype == out.dtype == vals.dtype and h.dtype in (torch.float32, torch.float64)
    use = _t_spmm_add is not None and fits if compiled is None else bool(compiled)
    if use:
        if _t_spmm_add is None:
            raise RuntimeError("csr_t_spmm_add(compiled=True) needs numba (pip install numba)")
        if not fits:
            raise ValueError("csr_t_spmm_add(compiled=True): CPU tensors, a contiguous out and one float32/"
                             f"float64 dtype for h, out and values (got {h.dtype}, {out.dtype}, {vals.dtype})")
        _t_spmm_add(csr.indptr.numpy(), csr.indices.numpy(), vals.numpy(), h.contiguous().numpy(),
                     out.numpy(), r0, r1)
        return out
    e0, e1 = int(csr.indptr[r0]), int(csr.indptr[r1])
    if e1 > e0:
        deg = (csr.indptr[r0 + 1:r1 + 1] - csr.indptr[r0:r1]).to(torch.int64)
        src = torch.repeat_interleave(torch.arange(r1 - r0), deg).to(h.device)
        msg = h.index_select(0, src) * vals[e0:e1].to(h.device, h.dtype).unsqueeze(1)
        out.index_add_(0, csr.indices[e0:e1].to(torch.int64).to(out.device), msg)
    return out


def _fill_layer0(lookup: Callable[[str, Tensor], Tensor], node_type: str, sh: RowShard, n: int, chunk_size: int,
                 buf: Tensor, r0: int, device: torch.device | str) -> None:
    """``buf[s - r0:e - r0] = lookup(node_type, s..e)`` for this rank's grid chunks of ``n`` rows
    (empty chunks are looked up too: a sharded table's all-to-all needs the same calls on every rank)."""
    for s, e in sh.chunks(n, chunk_size):
        emb = lookup(node_type, torch.arange(s, e, device=device))
        if e > s:
            buf[s - r0:e - r0] = emb.to(buf.dtype)


def _lightgcn_streamed_users(user_items: CSR, lookup: Callable[[str, Tensor], Tensor], num_layers: int, dim: int,
                             device: torch.device | str, chunk_size: int, user_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Single-process ``full_graph_lightgcn`` for a user subset WITHOUT any [n_users, d] buffer.

    Pass k (k = 0..L-1) walks the users in chunks: their layer k (k = 0: the table; else
    ``A_ui[chunk] @ items_{k-1}``) is added to the kept users' accumulators and its transposed
    product ``A_ui[chunk]^T @ users_k`` (``csr_t_spmm_add``) into items_{k+1}; the kept users' layer L
    is ``A_ui[ids] @ items_{L-1}`` at the end. Memory: 3 item layers + the item accumulator + one user
    chunk (+ |ids| rows), against n_users rows for the buffered pass. The item sums run in another
    order than the buffered pass's ``A_iu @ users_k`` (same values up to float rounding)."""
    n_users, n_items = user_items.n_rows, user_items.n_cols
    sh = RowShard()
    vu = csr_norm_values(user_items)
    ids = user_ids.to(torch.int64).cpu()
    order = torch.argsort(ids)
    sorted_ids = ids[order]
    acc_u = torch.zeros((ids.numel(), dim), device=device)
    cur = torch.empty((n_items, dim), device=device)     # items_k
    _fill_layer0(lookup, ITEM, sh, n_items, chunk_size, cur, 0, device)
    acc_i = cur.clone()
    prev = None                                          # items_{k-1}
    for k in range(max(num_layers, 1)):
        nxt = torch.zeros_like(cur) if k < num_layers else None   # items_{k+1}
        for s, e in sh.chunks(n_users, chunk_size):
            if k == 0:   # every grid chunk, empty ones too, as in the buffered pass
                h = lookup(USER, torch.arange(s, e, device=device)).to(acc_u.dtype)
            if e <= s:
                continue
            if k > 0:
                h = csr_spmm(user_items, prev, chunk_size, vu, rows=(s, e))
            lo, hi = int(torch.searchsorted(sorted_ids, s)), int(torch.searchsorted(sorted_ids, e))
            if hi > lo:
                acc_u.index_add_(0, order[lo:hi].to(device), h.index_select(0, (sorted_ids[lo:hi] - s).to(device)))
            if nxt is not None:
                csr_t_spmm_add(user_items, h, nxt, (s, e), vu)
        if nxt is None:
            break
        acc_i += nxt
        prev, cur = cur, nxt
        log.debug("streamed full-graph LightGCN: layer %d of %d done", k + 1, num_layers)
    if num_layers:
        acc_u += csr_rows_spmm(user_items, ids, prev, chunk_size, vu)
    scale = float(num_layers + 1)
    return acc_u.div_(scale), acc_i.div_(scale)


def full_graph_lightgcn(user_items: CSR, item_users: CSR, lookup: Callable[[str, Tensor], Tensor], num_layers: int,
                        dim: int, device: torch.device | str = "cpu", chunk_size: int = 65536,
                        user_ids: Tensor | None = None, shard: RowShard | None = None,
                        stream_users: bool = False) -> tuple[Tensor, Tensor]:
    """Full-graph LightGCN, layer by layer in row chunks, memory-lean and optionally row-sharded.

    ``lookup(node_type, ids)`` returns the layer-0 embeddings of ``ids`` (called once per grid chunk of
    this rank's block: the same number of calls on every rank, as a sharded table's all-to-all needs).
    ``user_items``: rows = users, values = norm; ``item_users``: rows = items.

    ``user_ids``: return only these users (and skip the last layer's propagation to every other user).
    ``shard``: this rank computes its row block of every layer (users and items; ``RowShard``), the
    layer is all-gathered; the results are this rank's rows only (see Returns). Row for row the
    result is bit-identical to the single-process pass.

    Memory (W = 1, n_u users, n_i items, rows of d floats): one user layer buffer (propagated in
    place: layer k+1 of the users reads only layer k of the items, which is computed first from the
    user layer), user accumulator (n_u, or |user_ids|), two item layer buffers (ping-pong) and the
    item accumulator: 2 n_u + 3 n_i rows (n_u + 3 n_i with ``user_ids``), against 5 (n_u + n_i) + the
    tables before. With W ranks: the two gathered layer tables n_u + n_i plus 2 blocks of each type.

    ``stream_users`` (single process, with ``user_ids``): no [n_users, d] buffer at all -- the users
    are streamed chunk by chunk through every layer and pushed to the items by the transposed product
    (``_lightgcn_streamed_users``): n_u rows less (5 GB at 20M users, d 64), equal up to float rounding
    (the item sums run in another order), ~the same time with numba.

    Returns ``(users, items)``: single process [n_users or len(user_ids), d], [n_items, d]; with a
    shard, users = rows of this rank's user block (the ``user_ids`` in it, in the given order) and
    items = rows ``shard.block(n_items)`` of the items.

    **Shapes:** -> ([n_u_out, d], [n_i_out, d]).
    """
    sh = shard or RowShard()
    if stream_users:
        if user_ids is None or sh.world_size > 1:
            raise ValueError("full_graph_lightgcn(stream_users=True) needs user_ids and a single process "
                             f"(got user_ids={'None' if user_ids is None else user_ids.numel()}, "
                             f"world size {sh.world_size})")
        return _lightgcn_streamed_users(user_items, lookup, num_layers, dim, device, int(chunk_size), user_ids)
    n_users, n_items = user_items.n_rows, item_users.n_rows
    cs = int(chunk_size)
    (u0, u1), (i0, i1) = sh.block(n_users, cs), sh.block(n_items, cs)
    bu, bi = sh.block_rows(n_users, cs), sh.block_rows(n_items, cs)
    vu, vi = csr_norm_values(user_items), csr_norm_values(item_users)
    W = sh.world_size

    h_u = sh.full_buffer(n_users, cs, dim, device)
    h_i = sh.full_buffer(n_items, cs, dim, device)
    # W = 1: the next user layer is written in place; W > 1: into a block, then gathered.
    blk_u = h_u[:bu] if W == 1 else h_u.new_empty((bu, dim))
    blk_i = h_i.new_empty((bi, dim))  # next item layer (own block); W = 1: the ping-pong buffer

    _fill_layer0(lookup, USER, sh, n_users, cs, blk_u, u0, device)
    _fill_layer0(lookup, ITEM, sh, n_items, cs, h_i[i0:] if W == 1 else blk_i, i0, device)
    if user_ids is not None:
        user_ids = user_ids.to(torch.int64).to(device)
        local = user_ids[(user_ids >= u0) & (user_ids < u1)] - u0
        acc_u = blk_u.index_select(0, local)
    else:
        local = None
        acc_u = blk_u[:u1 - u0].clone()
    acc_i = (h_i[:n_items] if W == 1 else blk_i[:i1 - i0]).clone()
    sh.gather(h_u, blk_u)
    sh.gather(h_i, blk_i if W > 1 else h_i)
    log.debug("full-graph LightGCN rank %d/%d: users [%d, %d) of %d%s, items [%d, %d) of %d, %d layers",
              sh.rank, W, u0, u1, n_users, "" if local is None else f" ({local.numel()} kept)", i0, i1, n_items,
              num_layers)

    for layer in range(num_layers):
        last = layer + 1 == num_layers
        # items first: they read the current user layer, which the users then overwrite
        csr_spmm(item_users, h_u, cs, vi, out=blk_i, rows=(i0, i1))
        acc_i += blk_i[:i1 - i0]
        if last and local is not None:
            acc_u += csr_rows_spmm(user_items, local + u0, h_i, cs, vu)
        else:
            csr_spmm(user_items, h_i, cs, vu, out=blk_u, rows=(u0, u1))
            acc_u += blk_u[:u1 - u0] if local is None else blk_u.index_select(0, local)
        if last:
            break
        sh.gather(h_u, blk_u)
        if W == 1:
            h_i, blk_i = blk_i, h_i
        else:
            sh.gather(h_i, blk_i)
    scale = float(num_layers + 1)
    return acc_u.div_(scale), acc_i.div_(scale)


# ---- item-item propagation of ID embeddings (FREEDOM-style; ``model.item_knn_id_layers``) --------

def knn_norm_values(graph: CSR) -> Tensor:
    """Edge values ``1/sqrt(D_r D_c)`` of a symmetric kNN CSR with BINARY edges, ``D`` = row lengths
    (self-loops included): the symmetric normalisation ``D^-1/2 A D^-1/2``. The CSR's own values
    (cosine similarities) are ignored. **Shapes:** -> [nnz] float32."""
    deg = graph.degrees().to(torch.float32)
    rows = torch.repeat_interleave(torch.arange(graph.n_rows), graph.degrees())
    return (deg[rows] * deg[graph.indices.to(torch.int64)]).rsqrt()


def _check_combine(combine: str) -> None:
    if combine not in KNN_ID_COMBINE:
        raise ValueError(f"kNN propagation: combine must be one of {', '.join(KNN_ID_COMBINE)}, got {combine!r}")


def knn_propagate_blocks(subgraph: SampledSubgraph, rel: Relation, h: Tensor, degree: Tensor,
                         combine: str = "last") -> Tensor:
    """``S^L h`` (``combine="last"``) or ``1/L sum_{l=1..L} S^l h`` (``"mean"``) at the seeds over the
    L sampled blocks of one kNN relation, ``S = D^-1/2 A D^-1/2`` with FULL-graph degrees ``degree``
    (global id -> row length incl. the self-loop); each block's sums are rescaled by ``D_v / s_v``
    (``aggregate``), exact at fanout -1. The seeds are the first rows of every block's destinations,
    so hop l's value at the seeds is the first ``n_seeds`` rows after block l.

    **Shapes:** h [n_src of blocks[0], d] -> [n_seeds, d]."""
    _check_combine(combine)
    node_t = rel[2]
    n_seeds = subgraph.seeds[node_t].numel()
    degree = degree.to(h.device, h.dtype)
    acc = None
    for block in subgraph.blocks:
        nodes = block.src_nodes[node_t]
        if h.shape[0] != nodes.numel():
            raise ValueError(f"kNN propagation over {rel}: state has {h.shape[0]} rows for "
                             f"{nodes.numel()} source nodes")
        ei = block.edge_index.get(rel)
        if ei is None:
            ei = torch.empty((2, 0), dtype=torch.int64, device=h.device)
        g = nodes.to(h.device)
        w = (degree.index_select(0, g.index_select(0, ei[0])) * degree.index_select(0, g.index_select(0, ei[1]))).rsqrt()
        h = aggregate(Block(block.src_nodes, block.n_dst, {rel: ei}, {rel: w}), rel, h, degree)
        if combine == "mean":
            acc = h[:n_seeds] if acc is None else acc + h[:n_seeds]
    if acc is not None:
        return acc / len(subgraph.blocks)
    return h[:n_seeds]


def full_graph_knn_propagate(graph: CSR, lookup: Callable[[str, Tensor], Tensor], num_layers: int, dim: int,
                             device: torch.device | str = "cpu", chunk_size: int = 65536,
                             shard: RowShard | None = None, combine: str = "last") -> Tensor:
    """``S^L e`` (``combine="last"``) or ``1/L sum_{l=1..L} S^l e`` (``"mean"``) for every item
    (``knn_propagate_blocks`` over the full graph), layer by layer in row chunks; ``lookup(ITEM,
    ids)`` gives the layer-0 ID embeddings (once per grid chunk, as in ``full_graph_lightgcn``). With
    a ``shard``: this rank's rows ``shard.block(n_items)``, the layers all-gathered.
    **Shapes:** -> [n_items, d] (with a shard: [i1 - i0, d])."""
    _check_combine(combine)
    sh = shard or RowShard()
    n, cs = graph.n_rows, int(chunk_size)
    i0, i1 = sh.block(n, cs)
    vals = knn_norm_values(graph)
    blk = torch.empty((sh.block_rows(n, cs), dim), device=device)
    _fill_layer0(lookup, ITEM, sh, n, cs, blk, i0, device)
    if num_layers:
        h = sh.full_buffer(n, cs, dim, device)
        acc = None
        for _ in range(num_layers):
            sh.gather(h, blk)
            csr_spmm(graph, h, cs, vals, out=blk, rows=(i0, i1))
            if combine == "mean":
                acc = blk.clone() if acc is None else acc.add_(blk)
        if acc is not None:
            return acc[:i1 - i0] / num_layers
    return blk[:i1 - i0]
