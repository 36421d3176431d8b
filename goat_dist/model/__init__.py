"""goat_dist.model: ID embeddings (TorchRec), LightGCN on blocks, GAT encoders, fusion, RecGOAT."""
from goat_dist.model.embeddings import IdEmbeddings, check_ids, materialize_
from goat_dist.model.fusion import FUSIONS, FusionOutput, OATFusion, build_fusion
from goat_dist.model.gat import GATEncoder, gather_features
from goat_dist.model.lightgcn import aggregate, csr_spmm, full_graph_lightgcn, lightgcn_blocks
from goat_dist.model.recgoat import RecGOAT

__all__ = ["IdEmbeddings", "check_ids", "materialize_", "FUSIONS", "FusionOutput", "OATFusion", "build_fusion",
           "GATEncoder", "gather_features", "aggregate", "csr_spmm", "full_graph_lightgcn", "lightgcn_blocks",
           "RecGOAT"]
