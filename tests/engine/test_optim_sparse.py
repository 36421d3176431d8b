"""Row-sparse gradients for the ID tables (single-process engine): the sparse optimisers against
their dense references on fresh random inputs, and a Trainer run with sparse gradients against the
same run with dense ones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from goat_dist.engine import optim as optim_mod
from goat_dist.engine.optim import sparse_grad_optimizer, sparse_optimizer


def _dense_reference(name, params, lr):
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad(params, lr=lr, eps=1e-10)
    return sparse_optimizer(name, params, lr)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adagrad", "sgd"])
def test_sparse_step_equals_dense_reference(name):
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(40, 6, generator=gen)
    emb_s, emb_d = nn.Embedding(40, 6, sparse=True), nn.Embedding(40, 6, sparse=False)
    with torch.no_grad():
        emb_s.weight.copy_(w0)
        emb_d.weight.copy_(w0)
    opt_s = sparse_optimizer(name, emb_s.parameters(), 0.1)
    opt_d = _dense_reference(name, list(emb_d.parameters()), 0.1)
    assert sparse_grad_optimizer(name)
    for _ in range(6):
        ids = torch.randint(0, 25, (30,), generator=gen)       # duplicates; rows 25.. never touched
        up = torch.randn(30, 6, generator=gen)
        for emb, opt in ((emb_s, opt_s), (emb_d, opt_d)):
            opt.zero_grad(set_to_none=True)
            (emb(ids) * up).sum().backward()
            opt.step()
        assert emb_s.weight.grad.is_sparse and not emb_d.weight.grad.is_sparse
    torch.testing.assert_close(emb_s.weight, emb_d.weight, rtol=1e-6, atol=1e-6)
    assert torch.equal(emb_s.weight[25:], w0[25:])
    if name != "sgd":
        key = "sum"
        torch.testing.assert_close(opt_s.state[emb_s.weight][key], opt_d.state[emb_d.weight][key], rtol=1e-6,
                                   atol=1e-7)
    if name == "rowwise_adagrad":   # same state layout as torchrec's (checkpoints are interchangeable)
        assert opt_s.state[emb_s.weight]["sum"].shape == (40, 1)
        assert float(opt_s.state[emb_s.weight]["step"]) == 6.0


def test_adam_keeps_dense_gradients():
    assert not sparse_grad_optimizer("adam")


def test_sparse_rowwise_adagrad_refuses_weight_decay_with_sparse_grads():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = optim_mod._rowwise_adagrad_class()(emb.parameters(), lr=0.1, weight_decay=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step()


def test_trainer_with_sparse_gradients_equals_dense(tmp_path, monkeypatch):
    from goat_dist.engine.trainer import Trainer
    from tests.engine.test_trainer import tiny_cfg

    def trained(sparse: bool, run: str):
        monkeypatch.setattr("goat_dist.engine.trainer.sparse_grad_optimizer", lambda name: sparse)
        tr = Trainer(tiny_cfg(tmp_path, "train.optimizer=rowwise_adagrad", "train.max_steps=4"),
                     tmp_path / run).build()
        losses = []
        it = iter(tr.loader)
        for _ in range(4):
            losses.append(float(tr.train_step(next(it))["loss"]))
        grads = [p.grad for p in tr.model.id_emb.parameters()]
        return tr, losses, grads

    tr_s, loss_s, grads_s = trained(True, "s")
    tr_d, loss_d, grads_d = trained(False, "d")
    assert all(g.is_sparse for g in grads_s) and not any(g.is_sparse for g in grads_d)
    assert loss_s == pytest.approx(loss_d, rel=1e-5)
    for (name, ps), pd in zip(tr_s.model.named_parameters(), tr_d.model.parameters()):
        torch.testing.assert_close(ps, pd, rtol=1e-5, atol=1e-6, msg=name)
