"""Synthetic generator: exact counts, split ratios, power-law degrees, features, determinism, streaming
over many chunks, and a planted structure that beats popularity (oracle Recall@20 >> popularity)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

import goat_dist.data.synth as synth
from data_fixtures import mem_url  # noqa: F401 (pytest fixtures)
from goat_dist.config import DataConfig, SynthConfig
from goat_dist.data import load_dataset


@pytest.fixture(scope="module")
def default_synth(tmp_path_factory):
    """The built-in default dataset (SynthConfig defaults), generated once for this module."""
    cfg = SynthConfig()
    out = tmp_path_factory.mktemp("synth") / "default"
    stats = synth.generate(str(out), users=cfg.users, items=cfg.items, interactions=cfg.interactions,
                           modalities=dict(cfg.modalities), user_profiles=cfg.user_profiles, seed=cfg.seed)
    return out, stats, cfg


def test_counts_are_exact_and_loadable(default_synth):
    out, stats, cfg = default_synth
    ds = load_dataset(DataConfig(path=str(out)))
    sizes = {s: len(v) for s, v in ds.splits.items()}
    assert sum(sizes.values()) == cfg.interactions == stats["interactions"]
    assert sizes == {s: stats[f"{s}_interactions"] for s in sizes}
    assert (ds.n_users, ds.n_items) == (cfg.users, cfg.items)
    assert ds.duplicates == {"train": 0, "valid": 0, "test": 0}
    all_pairs = np.concatenate([v.users.astype(np.int64) * cfg.items + v.items for v in ds.splits.values()])
    assert np.unique(all_pairs).shape[0] == cfg.interactions  # unique across splits too


def test_split_ratio_and_every_user_has_train(default_synth):
    out, stats, cfg = default_synth
    ds = load_dataset(DataConfig(path=str(out)))
    assert np.bincount(ds.train.users, minlength=cfg.users).min() >= 1
    frac = {s: len(v) / cfg.interactions for s, v in ds.splits.items()}
    assert abs(frac["train"] - 0.8) < 0.02 and abs(frac["valid"] - 0.1) < 0.01 and abs(frac["test"] - 0.1) < 0.01


def test_degrees_are_heavy_tailed(default_synth):
    out, _, cfg = default_synth
    ds = load_dataset(DataConfig(path=str(out)))
    user_deg = sum(np.bincount(v.users, minlength=cfg.users) for v in ds.splits.values())
    item_deg = sum(np.bincount(v.items, minlength=cfg.items) for v in ds.splits.values())
    assert user_deg.max() >= 10 * np.median(user_deg)
    assert item_deg.max() >= 10 * np.median(item_deg)


def test_features_shapes_and_dtypes(default_synth):
    out, _, cfg = default_synth
    ds = load_dataset(DataConfig(path=str(out)))
    assert {k: v.shape for k, v in ds.item_features.items()} == {m: (cfg.items, d) for m, d in cfg.modalities.items()}
    assert ds.user_features["profile"].shape == (cfg.users, cfg.user_profiles)
    assert all(v.dtype == np.float16 for v in [*ds.item_features.values(), *ds.user_features.values()])


def test_modalities_carry_the_latent_clusters(default_synth):
    """Nearest neighbours in a modality share the planted cluster far above chance (1/K)."""
    out, _, _ = default_synth
    ds = load_dataset(DataConfig(path=str(out)))
    latent = synth.load_latent(str(out))
    x = np.asarray(ds.item_features["text"], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    same = (latent.item_cluster[sim.argmax(1)] == latent.item_cluster).mean()
    assert same > 0.5 > 1 / latent.n_clusters


def _recall_at_20(scores, train_mask, test_mask):
    scores = scores.astype(np.float64).copy()
    scores[train_mask] = -np.inf
    top = np.argpartition(-scores, 20, axis=1)[:, :20]
    hits = np.take_along_axis(test_mask, top, axis=1).sum(1)
    n = test_mask.sum(1)
    keep = n > 0
    return float((hits[keep] / n[keep]).mean())


def test_oracle_beats_popularity(default_synth):
    out, _, cfg = default_synth
    ds = load_dataset(DataConfig(path=str(out)))
    train = np.zeros((cfg.users, cfg.items), dtype=bool)
    train[ds.train.users, ds.train.items] = True
    test = np.zeros_like(train)
    test[ds.splits["test"].users, ds.splits["test"].items] = True
    pop = np.bincount(ds.train.items, minlength=cfg.items)
    r_pop = _recall_at_20(np.broadcast_to(pop, train.shape), train, test)
    r_oracle = _recall_at_20(synth.oracle_scores(synth.load_latent(str(out)), np.arange(cfg.users)), train, test)
    assert r_oracle > 1.8 * r_pop and r_oracle - r_pop > 0.15, (r_pop, r_oracle)


def _digest(folder):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "synth.json"}


def test_deterministic_and_streamed_in_chunks(tmp_path, monkeypatch):
    """Many small chunks (forced) give a valid dataset; the same arguments give identical files."""
    monkeypatch.setattr(synth, "CHUNK_INTERACTIONS", 500)
    monkeypatch.setattr(synth, "ITEM_CHUNK", 64)
    kw = dict(users=300, items=400, interactions=3000, modalities={"image": 8}, user_profiles=4, seed=3)
    synth.generate(str(tmp_path / "a"), **kw)
    synth.generate(str(tmp_path / "b"), **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    ds = load_dataset(DataConfig(path=str(tmp_path / "a")))
    assert sum(len(v) for v in ds.splits.values()) == 3000 and ds.duplicates["train"] == 0
    assert synth.load_latent(str(tmp_path / "a")).chunk_users == 50
    synth.generate(str(tmp_path / "c"), **{**kw, "seed": 4})
    assert _digest(tmp_path / "c")["train.txt"] != _digest(tmp_path / "a")["train.txt"]


def test_memory_url_output_and_float32(mem_url):
    synth.generate(mem_url, users=50, items=80, interactions=400, modalities={"image": 4}, feature_dtype="float32")
    ds = load_dataset(DataConfig(path=mem_url))
    assert ds.item_features["image"].dtype == np.float32 and len(ds.train) > 0


def test_generate_if_missing(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "auto"), generate_if_missing=True,
                     synth=SynthConfig(users=40, items=60, interactions=300, modalities={"image": 4}, user_profiles=0))
    ds = load_dataset(cfg)
    assert ds.n_users == 40 and sum(len(v) for v in ds.splits.values()) == 300


@pytest.mark.parametrize("kw", [dict(users=10, items=100, interactions=5), dict(users=10, items=4, interactions=30)])
def test_impossible_arguments_are_rejected(tmp_path, kw):
    with pytest.raises(ValueError, match="interactions must be in"):
        synth.generate(str(tmp_path / "x"), **kw)


def test_cli_synth(tmp_path, capsys):
    from goat_dist.cli import main

    assert main(["data", "synth", "--users", "30", "--items", "50", "--interactions", "200", "--out",
                 str(tmp_path / "s"), "--modalities", "image:4"]) == 0
    assert "interactions: 200" in capsys.readouterr().out
    assert (tmp_path / "s" / "item_image.npy").exists() and not (tmp_path / "s" / "user_profile.npy").exists()
