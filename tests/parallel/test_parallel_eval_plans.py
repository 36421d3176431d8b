"""Distributed evaluation is bit-identical to single-process evaluation of the same parameters, fit()
works sharded (best-model snapshot and restore); every TorchRec plan trains to the same losses."""
from __future__ import annotations

import json

import pytest

from dist_utils import run_distributed
from parallel_fixtures import distributed_body, max_rel_err, single_process_run, tiny_cfg
from goat_dist.engine.trainer import Trainer

pytestmark = pytest.mark.dist


def fit_body(rank, world_size, cfg, run_dir):
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        final = trainer.fit()
        return {"final": final, "state": trainer.full_state_dict(), "valid": trainer.evaluate("valid"),
                "test": trainer.evaluate("test")}
    finally:
        trainer.close()


def single_eval_body(rank, world_size, cfg, run_dir, state):
    ref = Trainer(cfg, run_dir).build()
    try:
        ref.model.load_state_dict(state)
        return ref.evaluate("valid"), ref.evaluate("test")
    finally:
        ref.close()


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_eval_equals_single_process_eval_exactly(tmp_path, world_size):
    """Row-sharded representations (uneven blocks for W = 3), batches straddling the user blocks."""
    cfg = tiny_cfg(tmp_path, 24, "train.max_steps=0", "train.epochs=2", "eval.batch_size=7")
    single_process_run(cfg, tmp_path / "prep", 1)  # generate the data and the graph cache once
    results = run_distributed(fit_body, world_size, cfg, tmp_path / "w2")
    # the reference in a child too: one intra-op thread like the ranks (a GEMM's result can depend on
    # the thread count, and earlier tests may have changed this process's)
    valid, test = run_distributed(single_eval_body, 1, cfg, tmp_path / "single", results[0]["state"])[0]
    for res in results:
        assert res["valid"] == valid and res["test"] == test  # exact, every metric
        assert res["final"]["test"] == test  # fit() restored and evaluated the selected model
    on_disk = json.loads((tmp_path / "w2" / "final.json").read_text())
    assert on_disk["test"] == pytest.approx(test) and on_disk["steps"] == results[0]["final"]["steps"]


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_plans_train_to_the_same_losses(tmp_path, sharding):
    """SGD on the tables (a wrong gradient scale would show) and Adam on the dense parameters."""
    n = 8
    extra = ["train.optimizer=sgd", "model.dim=16"]
    ref_parts, _, _ = single_process_run(tiny_cfg(tmp_path, 32, *extra), tmp_path / "single", n)
    results = run_distributed(distributed_body, 2, tiny_cfg(tmp_path, 16, *extra, f"dist.sharding={sharding}"),
                              tmp_path / sharding, n)
    for res in results:
        errs = [max_rel_err(p, r) for p, r in zip(res["parts"], ref_parts)]
        assert max(errs) <= 1e-5, f"{sharding}: max relative error {max(errs):.3g}"

