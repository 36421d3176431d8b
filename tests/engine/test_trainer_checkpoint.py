"""Single-process Trainer checkpoints: exact resume, listeners, config-change refusal, NaN guard."""
from __future__ import annotations

import json

import pytest
import torch

from goat_dist.config import ConfigError, load_config
from goat_dist.engine.trainer import NonFiniteError, Trainer


def tiny_cfg(tmp_path, *extra):
    return load_config(None, [
        f"data.path={tmp_path / 'data'}", "data.generate_if_missing=true",
        "data.synth={users: 60, items: 40, interactions: 900, modalities: {image: 6, text: 5}, "
        "user_profiles: 4, seed: 3}",
        f"graph.cache_dir={tmp_path / 'cache'}", "graph.item_knn_k=3", "graph.user_knn_k=3",
        "sampling.fanouts={user_item: [4, 4], item_item: [3], user_user: [3]}",
        "model.dim=8", "model.id_layers=2", "model.dropout=0.2", "ot.max_iter=40", "train.batch_size=64",
        "train.epochs=3", "train.dense_lr=0.01", "log.every_steps=1", "log.tensorboard=false",
        "eval.ks=[5, 10]", "eval.metric=recall@10", "checkpoint.every_steps=5", *extra])


def losses(run_dir):
    return {e["step"]: e["loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "train"}


def fit(cfg, run_dir, resume=None, listener=None):
    trainer = Trainer(cfg, run_dir).build()
    try:
        if listener is not None:
            trainer.add_checkpoint_listener(listener)
        if resume is not None:
            assert trainer.resume(resume)
        final = trainer.fit()
        return trainer, final
    finally:
        trainer.close()


# score_fused false + modality BPR over the aligned views: the fusion weights never get a gradient,
# so the saved Adam state has no entry for them (the load once demanded one: TikTok could not resume)
@pytest.mark.parametrize("extra", [(), ("model.score_fused=false", "loss.modality_bpr_weight=0.1",
                                        "loss.modality_bpr_views=aligned")])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, extra):
    """Dropout ON (its RNG is part of the state): a run stopped at step 7 (checkpoint at 5) and
    resumed gives the losses, final parameters and final.json of the run never stopped."""
    full, final_full = fit(tiny_cfg(tmp_path, *extra), tmp_path / "full")
    n = full.state.step
    assert n > 12
    seen = []
    fit(tiny_cfg(tmp_path, "train.max_steps=7", "checkpoint.at_end=false", *extra), tmp_path / "cut",
        listener=lambda url, step, metrics: seen.append((url, step, metrics)))
    assert [s for _, s, _ in seen] == [5] and "loss" in seen[0][2]
    resumed, final_res = fit(tiny_cfg(tmp_path, *extra), tmp_path / "cut", resume="latest")
    stateless = [n for n, p in full.model.named_parameters() if p not in full.dense_opt.state
                 and not n.startswith("id_emb")]
    assert stateless == [n for n, p in resumed.model.named_parameters() if p not in resumed.dense_opt.state
                         and not n.startswith("id_emb")]
    assert (stateless == ["fusion.logits"]) == bool(extra), stateless
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, n + 1))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert final_full["test"] == final_res["test"] and final_full["best_epoch"] == final_res["best_epoch"]


def test_resume_latest_without_checkpoints_and_config_change(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.max_steps=5")
    t = Trainer(cfg, tmp_path / "r").build()
    assert t.resume("latest") is False
    t.fit()
    t.close()
    assert len(t.store.list_complete()) == 1  # at step 5 (the end-of-training save adds none at the same step)
    t2 = Trainer(tiny_cfg(tmp_path, "train.max_steps=9", "train.sparse_lr=0.5", "model.dropout=0.0"),
                 tmp_path / "r").build()
    with pytest.raises(ConfigError, match=r"model.dropout: 0.2 -> 0.0.*train.sparse_lr: 0.05 -> 0.5"):
        t2.resume("latest")
    t2.close()


def test_nonfinite_loss_skips_the_step_then_fails(tmp_path, caplog):
    cfg = tiny_cfg(tmp_path, "train.max_nonfinite_steps=3", "model.fusion=sum")  # OAT refuses NaN costs outright
    t = Trainer(cfg, tmp_path / "r").build()
    t.item_features = {m: torch.full(tuple(f.shape), float("nan")) for m, f in t.item_features.items()}
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.loader.set_epoch(0)
    it = iter(t.loader)
    import logging
    with caplog.at_level(logging.WARNING, logger="goat_dist"):
        assert t.train_step(next(it)) is None and t.train_step(next(it)) is None
        with pytest.raises(NonFiniteError, match="3 training steps had a non-finite loss"):
            t.train_step(next(it))
    assert "rank 0: " in caplog.text and "step skipped on every rank" in caplog.text
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    t.close()


def test_goat_train_resume_cli(tmp_path, capsys):
    from goat_dist.cli import main
    from goat_dist.config import save_config

    config = tmp_path / "cfg.yaml"
    save_config(tiny_cfg(tmp_path, "checkpoint.every_steps=2", "train.epochs=1"), config)
    run = str(tmp_path / "run")
    assert main(["train", "-c", str(config), "--run-dir", run, "--set", "train.max_steps=4"]) == 0
    assert main(["train", "-c", str(config), "--run-dir", run, "--set", "train.max_steps=6",
                 "--resume", "latest"]) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 6
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    # resuming a finished run trains no further step
    assert main(["train", "-c", str(config), "--run-dir", run, "--set", "train.max_steps=6", "--resume", "latest"]) == 0
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 6
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    assert main(["train", "-c", str(config), "--run-dir", run, "--set", "model.dim=4", "--resume", "latest"]) == 2
    assert "model.dim: 8 -> 4" in capsys.readouterr().err
    assert main(["train", "-c", str(config), "--run-dir", run, "--resume", f"{run}/checkpoints/step-99"]) == 2
    assert "step-99" in capsys.readouterr().err


def test_config_key_added_after_the_checkpoint_compares_as_its_default():
    """A checkpoint written before a config key existed resumes when the key is at its default, and
    is refused (naming the key) when it is not."""
    from goat_dist.config import Config, to_dict
    from goat_dist.engine.checkpointing import config_differences

    current = to_dict(Config())
    saved = to_dict(Config())
    del saved["model"]["item_knn_id_modalities"]
    assert config_differences(saved, current) == []
    current["model"]["item_knn_id_modalities"] = ["image"]
    assert config_differences(saved, current) == ["model.item_knn_id_modalities: [] -> ['image']"]
    current["model"]["item_knn_id_modalities"] = []
    saved["model"]["no_such_key"] = 1              # a key the code no longer has still counts
    assert config_differences(saved, current) == ["model.no_such_key: 1 -> '<absent>'"]
