"""Mini-batches for one rank: triples + their user-item, item-item and user-user subgraphs, and a
DataLoader that computes them in worker processes.

Design choices:
- ``MiniBatchSampler.batch(i)`` is a pure function of ``(seed, epoch, rank, world_size, i)``: the
  triples come from :class:`TripleSampler.batch` and the neighbour sampling from a generator seeded
  by the same tuple. So the batches do not depend on ``num_workers``, prefetching or restarts.
- ``make_loader`` feeds ``(epoch, i)`` pairs to a map-style dataset from the main process; persistent
  workers therefore follow ``set_epoch`` without being restarted. Graph and interaction tensors are
  moved to shared memory once, so forked or spawned workers read them without copies; the samplers'
  scratch buffers are private per worker.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger
from goat_dist.sampling.blocks import (ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, USER_USER, MiniBatch,
                                       item_item_relation)
from goat_dist.sampling.neighbor import NeighborSampler, resolve_fanouts
from goat_dist.sampling.triples import TripleSampler, derive_seed

log = get_logger(__name__)

_SUBGRAPH_STREAM = 0x5A3


def _item_item_hops(value: int | Mapping[str, int], modalities: list[str]) -> dict[str, int]:
    """``hops["item_item"]`` (one count for every kNN graph, or modality -> count) -> modality -> count."""
    if isinstance(value, Mapping):
        stray = sorted(set(value) - set(modalities))
        if stray:
            raise ValueError(f"hops['item_item'] names modalities {stray} that have no item-item graph; "
                             f"the graphs are {sorted(modalities)}")
        out = {m: int(value.get(m, 0)) for m in modalities}
    else:
        out = {m: int(value) for m in modalities}
    bad = {m: h for m, h in out.items() if h < 0}
    if bad:
        raise ValueError(f"hops['item_item'] must be >= 0 for every modality, got {bad}")
    return out


class MiniBatchSampler:
    """Compose a :class:`TripleSampler` with the subgraph samplers into :class:`MiniBatch` objects.

    Graphs (CSR rows = destination nodes):
    - ``user_items``: rows = users, columns = their items (relation ``ITEM_TO_USER``);
    - ``item_users``: rows = items, columns = their users (relation ``USER_TO_ITEM``);
    - ``item_item[m]``: rows = items, columns = kNN items of modality ``m``;
    - ``user_user``: rows = users, columns = neighbour users (optional).

    ``hops`` maps family (``user_item``, ``item_item``, ``user_user``) to its hop count (0 = no
    subgraph for that family: e.g. ``{"user_item": id_layers, "item_item": gat_layers,
    "user_user": gat_layers}``). ``hops["item_item"]`` may also map modality -> hops, so that each
    kNN graph is sampled only as deep as its consumers read (e.g. ``{"image": 3, "audio": 1}``: the
    item-item ID propagation runs over the image graph only); a modality left out gets 0 hops (no
    subgraph). ``fanouts`` is the ``sampling.fanouts`` config value (see :func:`resolve_fanouts`),
    read with the deepest modality's hop count; a shallower modality uses the first (nearest-seed)
    entries of the per-hop list. All graphs must live on one device (CPU for worker processes).

    **Shapes:** see :class:`MiniBatch`; ``batch(i)`` has ``b <= triples.batch_size`` triples.
    """

    def __init__(self, triples: TripleSampler, user_items: CSR, item_users: CSR, *,
                 hops: Mapping[str, int], fanouts: Any = -1, item_item: Mapping[str, CSR] | None = None,
                 user_user: CSR | None = None, backend: str = "torch") -> None:
        item_item = dict(item_item or {})
        if user_items.n_rows != item_users.n_cols or user_items.n_cols != item_users.n_rows:
            raise ValueError(f"user_items is {user_items.n_rows}x{user_items.n_cols} but item_users is "
                             f"{item_users.n_rows}x{item_users.n_cols}; they must be transposes")
        self.triples = triples
        item_hops = _item_item_hops(hops.get("item_item", 0), list(item_item))
        hops = {f: int(hops.get(f, 0)) for f in ("user_item", "user_user")}
        hops["item_item"] = max(item_hops.values(), default=0)
        relations = {"user_item": [ITEM_TO_USER, USER_TO_ITEM],
                     "item_item": [item_item_relation(m) for m in item_item],
                     "user_user": [USER_USER] if user_user is not None else []}
        if not item_item:   # no kNN graphs (item modalities off): no item-item fanouts to check
            del relations["item_item"]
        fan = resolve_fanouts(fanouts, relations, hops)
        for m in item_item:   # hop 1 is nearest the seeds: a shallower graph keeps the first entries
            rel = item_item_relation(m)
            fan[rel] = fan[rel][:item_hops[m]]
        self.ui: NeighborSampler | None = None
        if hops["user_item"] > 0:
            self.ui = NeighborSampler({ITEM_TO_USER: user_items, USER_TO_ITEM: item_users},
                                      {r: fan[r] for r in relations["user_item"]}, backend)
        self.item_item: dict[str, NeighborSampler] = {}
        for m, csr in item_item.items():
            if item_hops[m] > 0:
                rel = item_item_relation(m)
                self.item_item[m] = NeighborSampler({rel: csr}, {rel: fan[rel]}, backend)
        self.user_user: NeighborSampler | None = None
        if hops["user_user"] > 0 and user_user is not None:
            self.user_user = NeighborSampler({USER_USER: user_user}, {USER_USER: fan[USER_USER]}, backend)
        self.fanouts = fan

    # ---- delegation ------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.triples.epoch

    @property
    def num_batches(self) -> int:
        return self.triples.num_batches

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.triples.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.triples.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.triples.load_state_dict(state)

    def samplers(self) -> list[NeighborSampler]:
        return [s for s in (self.ui, *self.item_item.values(), self.user_user) if s is not None]

    def share_memory_(self) -> "MiniBatchSampler":
        """Move graph and interaction tensors to shared memory (before starting worker processes)."""
        for s in self.samplers():
            s.share_memory_()
        if self.triples.csr.indptr.device.type == "cpu":
            self.triples.csr.share_memory_()
        self.triples.users.share_memory_()
        self.triples.items.share_memory_()
        return self

    # ---- batches ---------------------------------------------------------------------------------
    def minibatch(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                  generator: torch.Generator | None = None) -> MiniBatch:
        """Build the MiniBatch of given triples ([b] int64 each), sampling subgraphs with ``generator``."""
        unique_users, user_index = torch.unique(users, return_inverse=True)
        unique_items, item_index = torch.unique(torch.cat([pos, neg]), return_inverse=True)
        b = pos.numel()
        mb = MiniBatch(users, pos, neg, unique_users, unique_items, user_index, item_index[:b], item_index[b:])
        if self.ui is not None:
            dev = self.ui.device
            mb.ui = self.ui.sample({USER: unique_users.to(dev), ITEM: unique_items.to(dev)}, generator)
        for m, s in self.item_item.items():
            mb.item_item[m] = s.sample({ITEM: unique_items.to(s.device)}, generator)
        if self.user_user is not None:
            mb.user_user = self.user_user.sample({USER: unique_users.to(self.user_user.device)}, generator)
        return mb

    def batch(self, index: int, epoch: int | None = None) -> MiniBatch:
        """Mini-batch ``index`` of this rank in ``epoch`` (default: current); a pure function of
        ``(seed, epoch, rank, world_size, index)`` (for a given device)."""
        t = self.triples
        epoch = t.epoch if epoch is None else int(epoch)
        users, pos, neg = t.batch(index, epoch)
        samplers = self.samplers()
        dev = samplers[0].device if samplers else torch.device("cpu")
        g = torch.Generator(device=dev)
        g.manual_seed(derive_seed(t.seed, epoch, t.rank, t.world_size, index, _SUBGRAPH_STREAM))
        return self.minibatch(users, pos, neg, g)

    def __iter__(self) -> Iterator[MiniBatch]:
        """In-process iteration (no workers) from ``position`` to the end of the epoch."""
        t = self.triples
        while t.position < t.num_batches:
            out = self.batch(t.position)
            t.position += 1
            yield out
        t.position = 0


class _BatchDataset(Dataset):
    def __init__(self, sampler: MiniBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return self.sampler.num_batches

    def __getitem__(self, key: tuple[int, int]) -> MiniBatch:
        epoch, index = key
        return self.sampler.batch(index, epoch)


class _EpochIndices(Sampler):
    """Yields ``(epoch, i)`` for ``i`` from the resume position to the end of the current epoch;
    runs in the main process, so it always sees the latest ``set_epoch``/``load_state_dict``."""

    def __init__(self, sampler: MiniBatchSampler) -> None:
        self.sampler = sampler
        self.start = 0

    def __len__(self) -> int:
        return max(0, self.sampler.num_batches - self.start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0
        epoch = self.sampler.epoch
        for i in range(start, self.sampler.num_batches):
            yield (epoch, i)


class MiniBatchLoader(DataLoader):
    """A DataLoader over a :class:`MiniBatchSampler` that knows its position for exact resume.

    ``state_dict()`` -> ``{"epoch", "position"}`` where ``position`` counts the batches this loader
    has HANDED OUT in the current epoch (not those prefetched by workers); ``load_state_dict`` makes
    the next iteration start there. ``set_epoch`` selects the epoch (call it before each epoch).
    """

    def __init__(self, sampler: MiniBatchSampler, **kwargs) -> None:
        self.minibatch_sampler = sampler
        self._indices = _EpochIndices(sampler)
        self._position = 0
        super().__init__(_BatchDataset(sampler), batch_size=None, sampler=self._indices,
                         collate_fn=_identity, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.minibatch_sampler.set_epoch(epoch)
        self._indices.start = 0
        self._position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.minibatch_sampler.epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.minibatch_sampler.load_state_dict(state)
        self._indices.start = self._position = int(state["position"])

    def __iter__(self) -> Iterator[MiniBatch]:  # type: ignore[override]
        self._position = self._indices.start
        for mb in super().__iter__():
            self._position += 1
            yield mb
        self._position = 0


def _identity(x):
    return x


def make_loader(sampler: MiniBatchSampler, *, num_workers: int = 0, prefetch_factor: int = 2,
                persistent_workers: bool = True, pin_memory: bool = False,
                multiprocessing_context: str | None = None) -> MiniBatchLoader:
    """A DataLoader yielding this rank's :class:`MiniBatch` objects of the current epoch in order.

    With ``num_workers > 0`` the batches are computed in worker processes, ``prefetch_factor`` ahead
    each; the output is identical for any ``num_workers`` (batches are pure functions of their
    index). Graph tensors are put in shared memory first. Graphs must be on the CPU when workers are
    used (sample on the GPU in the main process with ``num_workers=0`` instead).
    """
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        if any(s.device.type != "cpu" for s in sampler.samplers()):
            raise ValueError("sampling.num_workers > 0 needs the graphs on the CPU; use num_workers=0 "
                             "to sample on the GPU")
        sampler.share_memory_()
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                      multiprocessing_context=multiprocessing_context)
    return MiniBatchLoader(sampler, **kwargs)
