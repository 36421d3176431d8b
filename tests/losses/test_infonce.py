"""InfoNCE against a plain dense reference, single-process and in real gloo worlds of size 2 and 3."""
import pytest
import torch

from dist_utils import run_distributed
from ref_infonce import reference
from goat_dist.losses import InfoNCE


def _inputs(n, d=6, seed=0, n_ids=None):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ids = None if n_ids is None else torch.randint(0, n_ids, (n,), generator=g)
    return a, b, ids


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_single_process_matches_reference(symmetric, chunk, masked):
    a, b, ids = _inputs(11, n_ids=4 if masked else None)
    ids_a = None if ids is None else ids.flip(0)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = InfoNCE(0.3, chunk_size=chunk, symmetric=symmetric)(a1, b1, ids_a, ids)
    ref = reference(a2, b2, 0.3, ids_a, ids, symmetric)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)


def test_masking_changes_the_loss_when_ids_repeat():
    a, b, _ = _inputs(8)
    ids = torch.tensor([0, 1, 0, 2, 3, 4, 5, 6])
    assert not torch.allclose(InfoNCE(0.2)(a, b, ids, ids), InfoNCE(0.2)(a, b))
    # unique ids: masking is a no-op
    torch.testing.assert_close(InfoNCE(0.2)(a, b, torch.arange(8), torch.arange(8)), InfoNCE(0.2)(a, b))


def test_perfectly_aligned_views_have_lower_loss():
    a, b, _ = _inputs(16)
    assert InfoNCE(0.1)(a, a) < InfoNCE(0.1)(a, b)


def _dist_body(rank, world_size, cases):
    out = []
    for a, b, ids, sizes, local_loss, chunk in cases:
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        xa, xb = a[sl].clone().requires_grad_(), b[sl].clone().requires_grad_()
        loss = InfoNCE(0.25, rank=rank, world_size=world_size, local_loss=local_loss, chunk_size=chunk)(
            xa, xb, ids[sl], ids[sl])
        loss.backward()
        out.append({"loss": loss.detach(), "ga": xa.grad, "gb": xb.grad})
    return out


@pytest.mark.dist
@pytest.mark.parametrize("world_size,cases", [
    (2, [([4, 4], True, None), ([5, 2], False, None), ([5, 2], True, 2)]),
    (3, [([3, 0, 6], True, 2), ([1, 5, 3], False, None), ([2, 2, 2], False, 4)]),
])
def test_distributed_equals_global_batch(world_size, cases):
    """Even and uneven per-rank sizes (one rank empty), both modes: value and gradients equal the
    single-process reference on the concatenated batch (repeated ids, so masking is exercised)."""
    data = []
    for sizes, local_loss, chunk in cases:
        n = sum(sizes)
        a, b, ids = _inputs(n, seed=n, n_ids=max(2, n - 2))
        data.append((a, b, ids, sizes, local_loss, chunk))
    results = run_distributed(_dist_body, world_size, data)
    for k, (a, b, ids, sizes, local_loss, chunk) in enumerate(data):
        ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
        ref = reference(ra, rb, 0.25, ids, ids)
        ref.backward()
        for res in results:
            torch.testing.assert_close(res[k]["loss"], ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([res[k]["ga"] for res in results]), ra.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([res[k]["gb"] for res in results]), rb.grad, rtol=1e-5, atol=1e-6)
