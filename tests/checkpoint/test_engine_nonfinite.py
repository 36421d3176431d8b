"""The non-finite guard on 2 gloo ranks: a NaN dense gradient, then a NaN loss, on rank 1 only
skip the step on BOTH ranks with the weights the guard covers unchanged, name the rank and the
part, and the third such step fails the run on both ranks."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from dist_utils import run_distributed
from test_engine_resume import tiny_cfg

pytestmark = pytest.mark.dist


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def guard_body(rank, world_size, cfg, run_dir):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer
    from goat_dist.engine.trainer import NonFiniteError

    records = _Records()
    logging.getLogger("goat_dist").addHandler(records)
    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        trainer.loader.set_epoch(0)
        batches = iter(trainer.loader)
        assert trainer.train_step(next(batches)) is not None  # a normal step first: optimiser state exists
        before = trainer.full_state_dict()
        name, param = trainer._dense_named[0]
        hook = param.register_hook(lambda g: g * float("nan")) if rank == 1 else None
        out_grad = trainer.train_step(next(batches))
        after_grad = trainer.full_state_dict()
        if hook is not None:
            hook.remove()
        if rank == 1:
            trainer.item_features = {m: torch.full(tuple(f.shape), float("nan")) for m, f in
                                     trainer.item_features.items()}
        out_loss = trainer.train_step(next(batches))
        after_loss = trainer.full_state_dict()
        try:
            trainer.train_step(next(batches))
            error = None
        except NonFiniteError as exc:
            error = str(exc)
        dense_names = [n for n, _ in trainer._dense_named]
        return {"out": (out_grad, out_loss), "before": before, "after_grad": after_grad, "after_loss": after_loss,
                "error": error, "log": records.lines, "dense": dense_names, "nonfinite": trainer.state.nonfinite_steps}
    finally:
        trainer.close()
        logging.getLogger("goat_dist").removeHandler(records)


def test_nonfinite_on_one_rank_skips_the_step_on_both(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.fusion=sum", "train.max_nonfinite_steps=3")  # OAT refuses NaN costs outright
    res = run_distributed(guard_body, 2, cfg, tmp_path / "run")
    for r, out in enumerate(res):
        assert out["out"] == (None, None), r
        for k in out["dense"]:  # dense gradient NaN: DeepSpeed's step skipped, dense weights unchanged
            assert torch.equal(out["after_grad"][k], out["before"][k]), (r, k)
        for k, v in out["after_grad"].items():  # NaN loss: skipped before backward, EVERYTHING unchanged
            assert torch.equal(out["after_loss"][k], v), (r, k)
        assert out["error"] is not None and "3 training steps had a non-finite loss" in out["error"]
        assert out["nonfinite"] == 3
    log = "\n".join(res[0]["log"])
    assert "non-finite dense gradient" in log
    assert any("non-finite loss (" in line and "rank 1: " in line and "step skipped on every rank" in line
               for line in res[0]["log"]), log
