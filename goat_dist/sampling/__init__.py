"""goat_dist.sampling: training triples with negatives, vectorised neighbour sampling into typed
blocks, and the mini-batch loader that composes them (see ``blocks.py`` for the output contract)."""
from goat_dist.sampling.blocks import (ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, USER_USER, Block, MiniBatch,
                                       Relation, SampledSubgraph, item_item_relation)
from goat_dist.sampling.loader import MiniBatchLoader, MiniBatchSampler, make_loader
from goat_dist.sampling.neighbor import NeighborSampler, resolve_fanouts, sample_rows
from goat_dist.sampling.triples import TripleSampler, derive_seed

__all__ = ["ITEM", "ITEM_TO_USER", "USER", "USER_TO_ITEM", "USER_USER", "Block", "MiniBatch", "Relation",
           "SampledSubgraph", "item_item_relation", "MiniBatchLoader", "MiniBatchSampler", "make_loader",
           "NeighborSampler", "resolve_fanouts", "sample_rows", "TripleSampler", "derive_seed"]
