"""The obvious dense InfoNCE that the optimised ``goat_dist.losses.InfoNCE`` and the model's CMCL are
tested against."""
import torch
import torch.nn.functional as F


def reference(a, b, tau, ids_a=None, ids_b=None, symmetric=True):
    """The obvious dense implementation: full N x N logits, masks built by double loops."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    n = a.shape[0]

    def one(x, y, ids):
        logits = x @ y.t() / tau
        mask = torch.zeros(n, n, dtype=torch.bool)
        if ids is not None:
            for i in range(n):
                for j in range(n):
                    mask[i, j] = j != i and bool(ids[j] == ids[i])
        logits = logits.masked_fill(mask, float("-inf"))
        return -(torch.diag(logits) - torch.logsumexp(logits, 1)).mean()

    l = one(a, b, ids_b)
    return 0.5 * (l + one(b, a, ids_a)) if symmetric else l
