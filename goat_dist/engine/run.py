"""Entry point used by ``goat train`` (and later by the torchrun/Ray launchers)."""
from goat_dist.engine.trainer import Trainer, train_main

__all__ = ["Trainer", "train_main"]
