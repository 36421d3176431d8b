"""goat_dist.losses: BPR, L2 on raw ID embeddings, distributed InfoNCE."""
from goat_dist.losses.bpr import bpr_loss, l2_loss
from goat_dist.losses.infonce import InfoNCE, all_gather_rows, gather_sizes, global_value_local_grad

__all__ = ["bpr_loss", "l2_loss", "InfoNCE", "all_gather_rows", "gather_sizes", "global_value_local_grad"]
