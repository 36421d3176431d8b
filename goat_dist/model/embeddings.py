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

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

from goat_dist.sampling.blocks import ITEM, USER

INIT_STD = 0.1


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
    def reset_parameters(self) -> None:
        """N(0, 0.1^2) for every entry of both tables (no-op on ``meta``)."""
        for emb in self.collection.embeddings.values():
            if emb.weight.device.type != "meta":
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


def materialize_(module: nn.Module, device: torch.device | str, seed: int = 0) -> nn.Module:
    """Allocate a ``meta``-built module on ``device`` and initialise it deterministically.

    Every submodule with a ``reset_parameters`` method is reset (Linear, GATConv, LayerNorm,
    ``IdEmbeddings``, ``OATFusion`` ...) under a forked RNG seeded with ``seed``, so the global RNG
    of the caller is left untouched. Returns ``module``.
    """
    device = torch.device(device)
    module.to_empty(device=device)
    for sub in module.modules():
        if isinstance(sub, EmbeddingCollection):
            sub._device = device  # TorchRec's own reset_parameters is a no-op while this says "meta"
    # The tables inside an EmbeddingCollection are nn.Embedding (whose own reset is N(0, 1)): they are
    # initialised by their owner (IdEmbeddings.reset_parameters), never directly.
    inside_tables = {id(m) for sub in module.modules() if isinstance(sub, EmbeddingCollection) for m in sub.modules()}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for sub in module.modules():
            if sub is not module and hasattr(sub, "reset_parameters") and id(sub) not in inside_tables:
                sub.reset_parameters()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return module
