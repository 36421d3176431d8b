"""Sharded checkpoints: atomic DCP saves with a verified manifest, keep-last-k, resharding loads.

    from goat_dist.checkpoint import CheckpointStore, CheckpointError, resolve_url

    store = CheckpointStore(f"{run_dir}/checkpoints", keep=3)
    url = store.save(step, state_dict, extra={"config": cfg_dict})   # collective under torch.distributed
    extra = store.load("latest", state_dict)                          # verified, then loaded in place

See :mod:`goat_dist.checkpoint.store` for the layout and the guarantees.
"""
from goat_dist.checkpoint.errors import CheckpointError
from goat_dist.checkpoint.store import CheckpointStore
from goat_dist.checkpoint.urls import DEFAULT_PROTOCOLS, resolve_url

__all__ = ["CheckpointError", "CheckpointStore", "DEFAULT_PROTOCOLS", "resolve_url"]
