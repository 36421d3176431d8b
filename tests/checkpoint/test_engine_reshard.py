"""A checkpoint written by 2 gloo ranks (row-wise tables) loads into 1 rank, 3 ranks with
column-wise tables and 2 ranks with table-wise tables: identical parameters, optimiser state and
evaluation metrics, and training continues from it."""
from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_distributed
from test_engine_resume import tiny_cfg

pytestmark = pytest.mark.dist

STEPS = 6


def gathered_state(trainer) -> dict:
    """Full tables, fused optimiser state (gathered shards, in offset order) and dense state."""
    import torch.distributed as dist

    from goat_dist.engine import checkpointing as ckpt

    local = {f"{pk}/{sk}": [(s.metadata.shard_offsets[0], s.tensor.detach().cpu().clone()) for s in st.local_shards()]
             for pk, states in ckpt.fused_state(trainer.dmp).items() for sk, st in states.items()}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)  # table-wise / column-wise: a rank holds only some tables' state
    fused = {}
    for key in sorted({k for p in parts for k in p}):
        shards = sorted((off, i, t) for i, p in enumerate(parts) for off, t in p.get(key, []))
        fused[key] = torch.cat([t for _, _, t in shards])
    dense = ckpt.get_dense_state(trainer.engine, trainer._dense_named)
    return {"model": trainer.full_state_dict(), "fused": fused, "dense_master": dense["master"],
            "dense_moments": dense["moments"], "dense_step": float(dense["step"])}


def source_body(rank, world_size, cfg, run_dir):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        trainer.loader.set_epoch(0)
        for batch in trainer.loader:
            assert trainer.train_step(batch) is not None
            trainer.state.step += 1
            if trainer.state.step == STEPS:
                break
        url = trainer.save_checkpoint()
        return {"url": url, "valid": trainer.evaluate("valid"), "test": trainer.evaluate("test"),
                **gathered_state(trainer)}
    finally:
        trainer.close()


def load_body(rank, world_size, cfg, run_dir, url):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        assert trainer.resume(url)
        out = {"valid": trainer.evaluate("valid"), "test": trainer.evaluate("test"), **gathered_state(trainer),
               "step": trainer.state.step}
        trainer.loader.load_state_dict(trainer._resume_loader)
        batches = iter(trainer.loader)
        out["more"] = [float(trainer.train_step(next(batches))["loss"]) for _ in range(2)]
        return out
    finally:
        trainer.close()


def test_reshard_world2_into_1_and_3_and_other_sharding_types(tmp_path):
    src = run_distributed(source_body, 2, tiny_cfg(tmp_path), tmp_path / "src")[0]
    rows = {k.split("/")[0]: src["model"][k.split("/")[0]].shape[0] for k in src["fused"]}
    for world, sharding in ((1, "row_wise"), (3, "column_wise"), (2, "table_wise")):
        cfg = tiny_cfg(tmp_path, f"dist.sharding={sharding}")
        got = run_distributed(load_body, world, cfg, tmp_path / f"w{world}_{sharding}", src["url"])
        for r, res in enumerate(got):
            where = f"world {world} {sharding} rank {r}"
            assert res["step"] == STEPS
            assert res["valid"] == src["valid"] and res["test"] == src["test"], where
            for k, v in src["model"].items():
                assert torch.equal(res["model"][k], v), (where, k)
            for k, v in src["dense_master"].items():
                assert torch.equal(res["dense_master"][k], v), (where, k)
                for key, m in src["dense_moments"][k].items():
                    assert torch.equal(res["dense_moments"][k][key], m), (where, k, key)
            assert res["dense_step"] == src["dense_step"] == STEPS
            for k, v in src["fused"].items():
                n = rows[k.split("/")[0]]
                # row-wise Adagrad: [rows * column shards]; every column shard starts from the saved per-row value
                assert torch.equal(res["fused"][k].view(-1, n), v.view(-1, n).mean(0).expand(
                    res["fused"][k].numel() // n, n)), (where, k)
            assert all(torch.isfinite(torch.tensor(res["more"])))
