"""Optimisers of the two parameter families.

ID tables ("sparse"): on CPU, fbgemm's fused optimisers are exact SGD, Adagrad and row-wise
Adagrad only (Adam is CUDA-only), so the same choices are offered for the unsharded single-process
tables, with the same update rules (``torchrec.optim.RowWiseAdagrad`` is the reference of the fused
kernel's row-wise Adagrad). Dense parameters (encoders, fusion) use Adam or SGD.
"""
from __future__ import annotations

from typing import Iterable

import torch

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
DENSE_OPTIMIZERS = ("adam", "adamw", "sgd")


def sparse_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-10)
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad(params, lr=lr, eps=1e-10)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"train.optimizer: {name!r} is not one of {', '.join(SPARSE_OPTIMIZERS)}")


def dense_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer | None:
    params = [p for p in params if p.requires_grad]
    if not params:
        return None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"train.dense_optimizer: {name!r} is not one of {', '.join(DENSE_OPTIMIZERS)}")
