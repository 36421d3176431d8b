"""BPR ranking loss and the L2 penalty on a batch's raw ID embeddings (LightGCN's recipe).

Design choices:
- Both losses are SUMS over the local rows divided by a normaliser ``denom`` (default: the local row
  count, i.e. a plain mean). A distributed caller passes the GLOBAL batch size so that the per-rank
  values add up to the global-batch loss (see ``RecGOAT.compute_loss``).
- L2 follows LightGCN: ``1/2 * (|e_u|^2 + |e_i+|^2 + |e_i-|^2)`` per triple, averaged over the batch,
  on the layer-0 (raw) embeddings only; the weight (``LossConfig.l2``) is applied by the caller.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bpr_loss(user: Tensor, pos: Tensor, neg: Tensor, denom: float | Tensor | None = None) -> Tensor:
    """Bayesian personalised ranking (Rendle et al. 2009):

        L = 1/denom * sum_b -log sigmoid(<u_b, i+_b> - <u_b, i-_b>)

    **Shapes:** ``user``, ``pos``, ``neg`` [B, d] -> scalar.
    """
    x = (user * pos).sum(-1) - (user * neg).sum(-1)
    total = -F.logsigmoid(x).sum()
    return total / (max(x.numel(), 1) if denom is None else denom)


def l2_loss(*embeddings: Tensor, denom: float | Tensor | None = None) -> Tensor:
    """``1/denom * 1/2 * sum_t |E_t|_F^2`` over the given [B, d] tensors (denom defaults to B).

    **Shapes:** each embedding [B, d] -> scalar.
    """
    if not embeddings:
        raise ValueError("l2_loss needs at least one tensor")
    n = embeddings[0].shape[0]
    total = 0.5 * sum(e.pow(2).sum() for e in embeddings)
    return total / (max(n, 1) if denom is None else denom)
