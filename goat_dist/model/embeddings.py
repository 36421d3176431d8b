"""ID embeddings of users and items: one TorchRec ``EmbeddingCollection`` with two tables.

Design choices:
- Tables ``"user"`` [n_users, d] and ``"item"`` [n_items, d], feature names ``"user"``/``"item"``,
  one id per KJT row. Every lookup goes through ``self.collection(kjt)``, so when ``parallel/``
  swaps the collection for its sharded twin (DistributedModelParallel) nothing here changes.
- Ids are range-checked BEFORE the lookup: fbgemm's bounds check only logs and silently maps an
  out-of-range id to row 0, which would train the wrong row without any error.
- Constructors never allocate data on a real device when ``device="meta"``; ``materialize_`` (or the
  sharder) allocates and initialises later. Initialisation is LightGCN's: N(0, 0.1^2) per entry. The
  same function is the tables' TorchRec ``init_fn``, so sharded tables initialise the same way.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from goat_dist.sampling.blocks import ITEM, USER

INIT_STD = 0.1
SINK_CHUNK_ROWS = 65536


def check_ids(ids: torch.Tensor, n: int, what: str) -> None:
    """Raise IndexError unless every id lies in ``[0, n)``; ``what`` names the table in the message."""
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= n:
        bad = ids[(ids < 0) | (ids >= n)][:5].tolist()
        raise IndexError(f"{what} ids must lie in [0, {n}), got min {lo}, max {hi} (e.g. {bad})")


class IdEmbeddings(nn.Module):
    """User and item ID tables behind one ``EmbeddingCollection``.

    ``forward(user_ids, item_ids)`` returns ``(E_user[user_ids], E_item[item_ids])``.

    **Shapes:** ``user_ids`` [Nu] int, ``item_ids`` [Ni] int -> ([Nu, d], [Ni, d]) float32.
    """

    def __init__(self, n_users: int, n_items: int, dim: int, device: torch.device | str | None = None):
        super().__init__()
        self.n_users, self.n_items, self.dim = int(n_users), int(n_items), int(dim)
        init = partial(nn.init.normal_, mean=0.0, std=INIT_STD)
        tables = [EmbeddingConfig(name=USER, embedding_dim=dim, num_embeddings=self.n_users,
                                  feature_names=[USER], init_fn=init),
                  EmbeddingConfig(name=ITEM, embedding_dim=dim, num_embeddings=self.n_items,
                                  feature_names=[ITEM], init_fn=init)]
        self.collection = EmbeddingCollection(tables=tables, device=torch.device(device) if device else None)

    @torch.no_grad()
    def reset_parameters(self, sink: Callable[[str, int, torch.Tensor], None] | None = None) -> None:
        """N(0, 0.1^2) for every entry of both tables (no-op on ``meta``).

        ``sink``: the tables stay where they are (e.g. on ``meta``); their initial values are
        generated in row chunks and handed to ``sink(table_name, first_row, rows)`` -- bit for bit
        the values (and the RNG consumption) of one ``normal_`` over the whole table, whose CPU
        kernel draws in blocks of 16 (so every chunk but the last has a multiple of 16 entries and
        the last at least 16). A rank keeps the rows of its shards and never holds a full table."""
        for name, emb in self.collection.embeddings.items():
            if sink is not None:
                n, d = emb.weight.shape
                step = SINK_CHUNK_ROWS  # a multiple of 16 rows
                starts = list(range(0, n, step))
                if len(starts) > 1 and (n - starts[-1]) * d < 16:
                    starts.pop()      # a last chunk under 16 entries would be drawn differently
                for i, r0 in enumerate(starts):
                    r1 = starts[i + 1] if i + 1 < len(starts) else n
                    sink(name, r0, torch.empty((r1 - r0, d)).normal_(mean=0.0, std=INIT_STD))
            elif emb.weight.device.type != "meta":
                nn.init.normal_(emb.weight, mean=0.0, std=INIT_STD)

    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        user_ids = user_ids.reshape(-1).to(torch.int64)
        item_ids = item_ids.reshape(-1).to(torch.int64)
        check_ids(user_ids, self.n_users, "user")
        check_ids(item_ids, self.n_items, "item")
        nu, ni = user_ids.numel(), item_ids.numel()
        # A KJT has one stride (rows per key): pad the shorter key with empty rows (length 0). At least
        # one row, so that a rank with nothing to look up still joins a sharded collection's all-to-all.
        stride = max(nu, ni, 1)
        lengths = torch.zeros(2, stride, dtype=torch.int32, device=user_ids.device)
        lengths[0, :nu] = 1
        lengths[1, :ni] = 1
        lengths = lengths.reshape(-1)
        kjt = KeyedJaggedTensor(keys=[USER, ITEM], values=torch.cat([user_ids, item_ids]), lengths=lengths)
        out = self.collection(kjt)
        return out[USER].values(), out[ITEM].values()


def materialize_(module: nn.Module, device: torch.device | str, seed: int = 0,
                 table_sink: Callable[[str, int, torch.Tensor], None] | None = None) -> nn.Module:
    """Allocate a ``meta``-built module on ``device`` and initialise it deterministically.

    Every submodule with a ``reset_parameters`` method is reset (Linear, GATConv, LayerNorm,
    ``IdEmbeddings``, ``OATFusion`` ...) under a forked RNG seeded with ``seed``, so the global RNG
    of the caller is left untouched. Returns ``module``.

    ``table_sink``: the ID tables stay on ``meta`` and their initial rows go, chunk by chunk, to
    ``table_sink(table_name, first_row, rows)`` (``IdEmbeddings.reset_parameters(sink=)``); every
    other parameter gets exactly the values it gets without a sink.
    """
    device = torch.device(device)
    # The tables inside an EmbeddingCollection are nn.Embedding (whose own reset is N(0, 1)): they are
    # initialised by their owner (IdEmbeddings.reset_parameters), never directly.
    inside_tables = {id(m) for sub in module.modules() if isinstance(sub, EmbeddingCollection) for m in sub.modules()}
    if table_sink is None:
        module.to_empty(device=device)
        for sub in module.modules():
            if isinstance(sub, EmbeddingCollection):
                sub._device = device  # TorchRec's own reset_parameters is a no-op while this says "meta"
    else:
        for sub in module.modules():
            if id(sub) in inside_tables:
                continue
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty_like(b, device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for sub in module.modules():
            if sub is not module and hasattr(sub, "reset_parameters") and id(sub) not in inside_tables:
                if table_sink is not None and isinstance(sub, IdEmbeddings):
                    sub.reset_parameters(sink=table_sink)
                else:
                    sub.reset_parameters()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return module
