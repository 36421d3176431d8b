"""Row-sharded full-graph representations (``RowShard``) are bit-identical, row for row, to the
single-process pass, before training (all-item OAT statistics) and after (EMA plan), with the user
branch, a user subset and uneven blocks; sharded eval with ``eval.user_sample`` equals
single-process eval exactly."""
from __future__ import annotations

import os

import pytest
import torch

from dist_utils import run_distributed
from parallel_fixtures import single_process_run, steps, tiny_cfg
from goat_dist.engine.trainer import Trainer
from goat_dist.model.lightgcn import RowShard

pytestmark = pytest.mark.dist


def reps_body(rank, world_size, cfg, run_dir, n_steps):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        users = torch.arange(0, trainer.dataset.n_users, 3)  # a subset, in every block
        out = {"users": users}
        before = trainer._sharded_representations(users)
        out["before"] = (before[0], before[1], trainer.full_state_dict())
        steps(trainer, n_steps)
        after = trainer._sharded_representations(users)
        out["after"] = (after[0], after[1], trainer.full_state_dict())
        out["block"] = after[2].block(trainer.dataset.n_items, trainer.eval_chunk_size)
        out["valid"] = trainer.evaluate("valid")
        return out
    finally:
        trainer.close()


def test_row_shard_blocks_cover_rows_once():
    for n in (0, 1, 5, 60, 64, 65, 1000, 200_003):
        for world in (1, 2, 3, 7):
            seen = torch.zeros(n, dtype=torch.int64)
            n_chunks = set()
            for r in range(world):
                sh = RowShard(r, world, None if world == 1 else (lambda out, blk: None))
                r0, r1 = sh.block(n, 1000)
                seen[r0:r1] += 1
                chunks = sh.chunks(n, 1000)
                n_chunks.add(len(chunks))
                assert sum(e - s for s, e in chunks) == r1 - r0
                assert bool((sh.owner(torch.arange(r0, r1), n, 1000) == r).all())
            assert bool((seen == 1).all()) and len(n_chunks) == 1, (n, world)
            assert RowShard.chunk(n, 1000) <= 1000


@pytest.mark.parametrize("world_size,extra", [(3, ()),
                                               (3, ("model.score_fused=false", "model.score_view_weight=0.5"))])
def test_sharded_representations_bit_identical(tmp_path, world_size, extra):
    """``extra``: the ID item plus the weighted OAT-aligned views scores (``model.score_view_weight``)."""
    cfg = tiny_cfg(tmp_path, 16, "eval.user_sample=37", "eval.batch_size=5", *extra)
    single_process_run(cfg, tmp_path / "prep", 1)  # data + graph cache once
    results = run_distributed(reps_body, world_size, cfg, tmp_path / "w", 6)
    ref = run_distributed(single_body, 1, cfg, tmp_path / "single", results)[0]  # one thread, like the ranks
    users = results[0]["users"]
    for phase in ("before", "after"):
        ref_u, ref_i = ref[phase]
        got_u = torch.cat([res[phase][0] for res in results])
        assert torch.equal(got_u, ref_u[users]), phase  # bit for bit
        for res in results:
            assert torch.equal(res[phase][1], ref_i), phase
    sizes = [res["block"][1] - res["block"][0] for res in results]
    assert sum(sizes) == ref_i.shape[0] and len(set(sizes)) > 1  # uneven item blocks
    assert ref["valid"]["n_users"] > 0
    for res in results:
        assert res["valid"] == ref["valid"]  # exact, every metric, on the user sample


def single_body(rank, world_size, cfg, run_dir, results):
    """The single-process reference: the same parameters in a plain Trainer."""
    ref = Trainer(cfg, run_dir).build()
    try:
        assert ref.model.use_user_branch and len(ref.model.modalities) == 2
        out = {}
        for phase in ("before", "after"):
            ref.model.load_state_dict(results[0][phase][2])
            out[phase] = ref.model.compute_all_representations(
                ref.graphs.ui.user_items, ref.graphs.ui.item_users, ref.item_features, ref.user_features,
                ref.graphs.item_item, ref.graphs.user_user)
        out["valid"] = ref.evaluate("valid")
        return out
    finally:
        ref.close()
