"""Optimisers of the two parameter families.

ID tables ("sparse"): on CPU, fbgemm's fused optimisers are exact SGD, Adagrad and row-wise
Adagrad only (Adam is CUDA-only), so the same choices are offered for the unsharded single-process
tables, with the same update rules (``torchrec.optim.RowWiseAdagrad`` is the reference of the fused
kernel's row-wise Adagrad). Dense parameters (encoders, fusion) use Adam or SGD.

Sparse gradients: with ``sparse_grad_optimizer(name)`` true the single-process engine makes the ID
tables emit row-sparse gradients (``nn.Embedding.sparse``), so a step costs O(rows in the batch), not
O(table): at 20M users a dense gradient is a 5 GB tensor written, read and zeroed every step, and
torchrec's ``RowWiseAdagrad`` updates every row (~30 s per step at 200M interactions). SGD and
Adagrad take sparse gradients natively (torch); row-wise Adagrad through :class:`SparseRowWiseAdagrad`
(the torchrec rule on the touched rows; untouched rows are unchanged under the dense rule too, since
their gradient is 0 and there is no weight decay). Adam keeps dense gradients (its moments decay on
every row every step).
"""
from __future__ import annotations

from typing import Iterable

import torch

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
DENSE_OPTIMIZERS = ("adam", "adamw", "sgd")


def sparse_grad_optimizer(name: str) -> bool:
    """Whether ``train.optimizer`` ``name`` takes row-sparse gradients (see the module docstring)."""
    return name in ("sgd", "adagrad", "rowwise_adagrad")


def _rowwise_adagrad_class():
    from torchrec.optim import RowWiseAdagrad

    class SparseRowWiseAdagrad(RowWiseAdagrad):
        """``torchrec.optim.RowWiseAdagrad`` (same state: ``sum`` [rows, 1], ``step``) that also takes
        sparse COO gradients: per touched row r (duplicates summed) ``sum_r += mean(g_r^2)``,
        ``w_r -= lr_t * g_r / (sqrt(sum_r) + eps)``. Dense gradients take torchrec's path."""

        @torch.no_grad()
        def step(self, closure=None):
            sparse = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p.grad.is_sparse]
            if not sparse:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                if group["weight_decay"] != 0 or group["maximize"]:
                    raise ValueError("SparseRowWiseAdagrad: weight_decay and maximize need dense gradients")
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if not p.grad.is_sparse:
                        raise ValueError("SparseRowWiseAdagrad: mixed sparse and dense gradients in one step")
                    grad = p.grad.coalesce()    # a no-op when the caller coalesced it already
                    rows, vals = grad.indices()[0], grad.values()
                    state = self.state[p]
                    state["step"] += 1
                    clr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
                    ssum = state["sum"]
                    ssum.index_add_(0, rows, vals.pow(2).mean(dim=1, keepdim=True))
                    std = ssum.index_select(0, rows).sqrt_().add_(group["eps"])
                    p.index_add_(0, rows, vals / std, alpha=-clr)
            return loss

    return SparseRowWiseAdagrad


def sparse_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-10)
    if name == "rowwise_adagrad":
        return _rowwise_adagrad_class()(params, lr=lr, eps=1e-10)
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
