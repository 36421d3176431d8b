"""Export from a checkpoint written by 2 real gloo ranks (TorchRec-sharded tables, DeepSpeed dense
parameters): the bundle's top-K equals the evaluation top-K of the same weights in one process."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from goat_dist.checkpoint.export import build_for_inference, export_main
from goat_dist.eval.metrics import csr_rows_coo
from goat_dist.serving import Retriever

pytestmark = pytest.mark.dist


def tiny_cfg(root):
    from goat_dist.config import load_config

    return load_config(None, [
        f"data.path={root}/data", "data.generate_if_missing=true",
        "data.synth={users: 60, items: 40, interactions: 900, modalities: {image: 6, text: 5}, "
        "user_profiles: 4, seed: 3}",
        f"graph.cache_dir={root}/cache", "graph.item_knn_k=3", "graph.user_knn_k=3", "sampling.fanouts=-1",
        "model.dim=8", "model.id_layers=2", "ot.max_iter=60", "train.batch_size=16", "train.epochs=1",
        "log.tensorboard=false", "eval.ks=[5, 10]", "eval.metric=recall@10", "checkpoint.every_steps=2"])


def fit_body(rank, world_size, cfg, run_dir):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        trainer.fit()
        return {"state": trainer.full_state_dict()}  # the selected (best) model, full tables
    finally:
        trainer.close()


def test_export_from_two_rank_checkpoint(tmp_path):
    from goat_dist.engine.distributed import DistributedTrainer

    if not hasattr(DistributedTrainer, "full_state_dict"):
        pytest.skip("this tree's DistributedTrainer has no checkpointing")
    cfg = tiny_cfg(tmp_path)
    state = run_distributed(fit_body, 2, cfg, tmp_path / "run")[0]["state"]
    assert any((tmp_path / "run" / "checkpoints").glob("step-*"))
    export_main(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "exp"), faiss_kind="flat")

    ref = build_for_inference(cfg)
    ref.model.load_state_dict(state)
    users = torch.arange(ref.dataset.n_users)
    scores = ref._scorer()(users).float()
    pos, cols = csr_rows_coo(ref.graphs.ui.user_items, users)
    scores[pos, cols] = -torch.inf
    top = torch.topk(scores, 10, dim=1).indices.numpy()
    ref.close()
    r = Retriever.load(str(tmp_path / "exp"))
    np.testing.assert_array_equal(r.recommend(users.numpy(), 10)[0], top)
    np.testing.assert_array_equal(r.recommend(users.numpy(), 10, exact=False)[0], top)
    assert r.manifest["checkpoint"]["weights"] == "best_model"
