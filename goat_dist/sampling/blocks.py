"""Typed outputs of the samplers (the contract between ``sampling/`` and ``model/``).

Conventions (as in DGL/PyG "blocks"):
- A ``Block`` is one hop of message passing from its source nodes to its destination nodes.
  For every node type ``t``, the destination nodes are the FIRST ``n_dst[t]`` entries of
  ``src_nodes[t]`` (so a node's own previous-layer state is always at the same local index).
- ``SampledSubgraph.blocks`` run from the outermost hop (input layer) to the seeds:
  ``blocks[i + 1].src_nodes[t] == blocks[i].src_nodes[t][:blocks[i].n_dst[t]]``, and the seeds
  ``seeds[t]`` are the first ``blocks[-1].n_dst[t]`` source nodes of the last block.
- Relation keys are ``(src_type, name, dst_type)``. ``edge_index[rel]`` is [2, E] int64 LOCAL
  indices: row 0 indexes ``src_nodes[src_type]``, row 1 indexes the destination prefix of
  ``src_nodes[dst_type]``. ``edge_weight[rel]`` is [E] float32 or None (the CSR's values).
- Node ids in ``src_nodes``/``seeds`` are GLOBAL ids (int64).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Relation = tuple[str, str, str]

# Relation names used by the graph and sampling layers.
USER, ITEM = "user", "item"
ITEM_TO_USER: Relation = (ITEM, "to_user", USER)   # CSR rows = users, columns = their items
USER_TO_ITEM: Relation = (USER, "to_item", ITEM)   # CSR rows = items, columns = their users
USER_USER: Relation = (USER, "knn", USER)


def item_item_relation(modality: str) -> Relation:
    """The item-item kNN relation of one modality."""
    return (ITEM, f"knn_{modality}", ITEM)


@dataclass(slots=True)
class Block:
    src_nodes: dict[str, torch.Tensor]
    n_dst: dict[str, int]
    edge_index: dict[Relation, torch.Tensor]
    edge_weight: dict[Relation, torch.Tensor | None] = field(default_factory=dict)

    def to(self, device, non_blocking: bool = False) -> "Block":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Block({k: mv(v) for k, v in self.src_nodes.items()}, dict(self.n_dst),
                     {k: mv(v) for k, v in self.edge_index.items()},
                     {k: mv(v) for k, v in self.edge_weight.items()})


@dataclass(slots=True)
class SampledSubgraph:
    seeds: dict[str, torch.Tensor]
    blocks: list[Block]

    def to(self, device, non_blocking: bool = False) -> "SampledSubgraph":
        return SampledSubgraph({k: v.to(device, non_blocking=non_blocking) for k, v in self.seeds.items()},
                               [b.to(device, non_blocking) for b in self.blocks])


@dataclass(slots=True)
class MiniBatch:
    """One training step's input for one rank.

    ``users``/``pos_items``/``neg_items`` are the triples' GLOBAL ids [B]. ``unique_users`` and
    ``unique_items`` (pos ∪ neg, deduplicated) are the seeds of every subgraph below, in this order;
    ``user_index``/``pos_index``/``neg_index`` [B] map each triple to its row among those seeds.
    ``ui`` is the user-item subgraph (node types user and item, relations ITEM_TO_USER and
    USER_TO_ITEM); ``item_item[m]`` the item-item kNN subgraph of modality ``m``; ``user_user`` the
    user-user subgraph (None when the user branch is off).
    """

    users: torch.Tensor
    pos_items: torch.Tensor
    neg_items: torch.Tensor
    unique_users: torch.Tensor
    unique_items: torch.Tensor
    user_index: torch.Tensor
    pos_index: torch.Tensor
    neg_index: torch.Tensor
    ui: SampledSubgraph | None = None
    item_item: dict[str, SampledSubgraph] = field(default_factory=dict)
    user_user: SampledSubgraph | None = None

    def to(self, device, non_blocking: bool = False) -> "MiniBatch":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return MiniBatch(mv(self.users), mv(self.pos_items), mv(self.neg_items), mv(self.unique_users),
                         mv(self.unique_items), mv(self.user_index), mv(self.pos_index), mv(self.neg_index),
                         None if self.ui is None else self.ui.to(device, non_blocking),
                         {k: v.to(device, non_blocking) for k, v in self.item_item.items()},
                         None if self.user_user is None else self.user_user.to(device, non_blocking))
