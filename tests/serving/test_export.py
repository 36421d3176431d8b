"""Serving export round trip on a tiny trained model: exact top-K equals the trainer's evaluation
top-K, FAISS equals exact, original ids in and out, integrity checks, cold-start embedding against a
torch reference, and the ``goat export`` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from goat_dist.checkpoint.export import build_faiss_index, export_model
from goat_dist.config import load_config
from goat_dist.engine.trainer import Trainer
from goat_dist.eval.metrics import csr_rows_coo, finalize, metric_sums
from goat_dist.graph.csr import CSR
from goat_dist.serving import BundleError, Retriever
from goat_dist.serving.bundle import COLD_START, EMBEDDINGS, MANIFEST, TRAIN_ITEMS


def tiny_cfg(tmp_path, *extra):
    return load_config(None, [
        f"data.path={tmp_path / 'data'}", "data.generate_if_missing=true",
        "data.synth={users: 150, items: 80, interactions: 2500, modalities: {image: 12, text: 8}, "
        "user_profiles: 8, seed: 1}",
        f"graph.cache_dir={tmp_path / 'cache'}", "graph.item_knn_k=5", "graph.user_knn_k=5",
        "sampling.fanouts={user_item: [5, 5], item_item: [4], user_user: [4]}",
        "model.dim=16", "model.id_layers=2", "train.batch_size=256", "log.tensorboard=false", "ot.max_iter=50",
        *extra])


def train_steps(trainer: Trainer, steps: int) -> None:
    it = iter(trainer.loader)
    for _ in range(steps):
        trainer.train_step(next(it))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny RecGOAT (OAT fusion, two item modalities, user branch, 2 GAT heads) after 6 steps."""
    tmp = tmp_path_factory.mktemp("trained")
    trainer = Trainer(tiny_cfg(tmp, "model.gat_heads=2"), tmp / "run").build()
    train_steps(trainer, 6)
    trainer.model.eval()
    yield trainer
    trainer.close()


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "export"
    manifest = export_model(trained.model, trained, trained.cfg, str(out), faiss_kind="flat",
                            metrics={"note": "test"})
    return out, manifest


def reference_topk(trainer: Trainer, users: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation's ranking: the trainer's scorer, training items at -inf, torch.topk."""
    scores = trainer._scorer()(users).float()
    pos, cols = csr_rows_coo(trainer._train_csr, users)
    scores[pos, cols] = -torch.inf
    val, idx = torch.topk(scores, k, dim=1)
    return idx, val


def test_exact_topk_equals_trainer_evaluation(trained, bundle):
    out, manifest = bundle
    r = Retriever.load(str(out))
    users = torch.arange(trained.dataset.n_users)
    items, scores = r.recommend(users.numpy(), k=20)
    ref_idx, ref_val = reference_topk(trained, users, 20)
    assert items.shape == (len(users), 20) and items.dtype == np.int64
    np.testing.assert_array_equal(items, ref_idx.numpy())
    np.testing.assert_allclose(scores, ref_val.numpy(), rtol=1e-6, atol=1e-6)
    # no training item is ever recommended
    pos, cols = csr_rows_coo(trained._train_csr, users)
    assert not np.isin(cols.numpy() + pos.numpy() * 10_000, items + np.arange(len(users))[:, None] * 10_000).any()
    # the test metrics computed from the retriever's lists are the trainer's own test metrics
    heldout = trained._split_csr("test")
    hits, n = 0.0, 0
    for u in range(len(users)):
        truth = set(heldout.indices[heldout.indptr[u]:heldout.indptr[u + 1]].tolist())
        if truth:
            hits += len(truth & set(items[u].tolist())) / len(truth)
            n += 1
    assert hits / n == pytest.approx(trained.evaluate("test")["recall@20"], abs=1e-12)
    assert manifest["model"]["n_items"] == trained.dataset.n_items and manifest["metrics"] == {"note": "test"}
    assert manifest["ids"] == {"user": "identity", "item": "identity"}


def test_faiss_flat_equals_exact_and_ivf_with_all_lists(trained, bundle, tmp_path):
    out, _ = bundle
    r = Retriever.load(str(out))
    users = np.arange(trained.dataset.n_users)
    exact_items, exact_scores = r.recommend(users, k=15)
    approx_items, approx_scores = r.recommend(users, k=15, exact=False)
    np.testing.assert_array_equal(approx_items, exact_items)
    np.testing.assert_allclose(approx_scores, exact_scores, rtol=1e-5, atol=1e-5)
    # IVF searching every list is exhaustive, hence equal to exact too
    manifest = export_model(trained.model, trained, trained.cfg, str(tmp_path / "ivf"), faiss_kind="ivf", nlist=4,
                            nprobe=4)
    assert manifest["faiss"]["nlist"] == 4
    ivf = Retriever.load(str(tmp_path / "ivf"))
    np.testing.assert_array_equal(ivf.recommend(users, k=15, exact=False)[0], exact_items)
    # re-exporting into the same folder without an index leaves no stale index behind
    export_model(trained.model, trained, trained.cfg, str(tmp_path / "ivf"))
    assert not (tmp_path / "ivf" / "items.faiss").exists() and Retriever.load(str(tmp_path / "ivf")).index is None


def test_approximate_pads_when_too_few_candidates(trained, bundle):
    """An IVF index probing one list of a few items cannot fill k: the row is padded, never filled
    with training items."""
    out, _ = bundle
    r = Retriever.load(str(out))
    r.index = build_faiss_index(r.item_reps.numpy(), "ivf", nlist=8)
    r.index.nprobe = 1
    items, scores = r.recommend(np.arange(30), k=70, exact=False)
    pad = items == -1
    assert pad.any() and np.isneginf(scores[pad]).all() and np.isfinite(scores[~pad]).all()
    train = trained._train_csr
    for u in range(30):
        got = set(items[u][items[u] >= 0].tolist())
        assert not got & set(train.indices[train.indptr[u]:train.indptr[u + 1]].tolist())


def test_original_string_ids_in_and_out(trained, tmp_path):
    ds = trained.dataset
    saved = ds.user_ids, ds.item_ids
    try:
        ds.user_ids = np.asarray([f"user-{(7 * u) % ds.n_users:04d}x" for u in range(ds.n_users)], dtype=object)
        ds.item_ids = np.asarray([f"B0{i:05d}" for i in range(ds.n_items)], dtype=object)
        manifest = export_model(trained.model, trained, trained.cfg, str(tmp_path / "ids"))
        r = Retriever.load(str(tmp_path / "ids"))
        users = [3, 141, 0]
        items, _ = r.recommend([ds.user_ids[u] for u in users], k=10)
        ref_idx, _ = reference_topk(trained, torch.tensor(users), 10)
        assert items.dtype == object
        np.testing.assert_array_equal(items, ds.item_ids[ref_idx.numpy()])
        with pytest.raises(KeyError, match="unknown user id.*'nobody'"):
            r.recommend(["user-0000x", "nobody"], k=5)
        with pytest.raises(KeyError, match="unknown user id"):
            r.recommend([3], k=5)  # contiguous indices are not original ids here
    finally:
        ds.user_ids, ds.item_ids = saved
    assert manifest["ids"] == {"user": "user_ids.tsv", "item": "item_ids.tsv"}


def test_unknown_integer_user_and_bad_k(bundle, trained):
    r = Retriever.load(str(bundle[0]))
    n = trained.dataset.n_users
    with pytest.raises(KeyError, match=f"unknown user id.*{n}.*ids 0..{n - 1}"):
        r.recommend([0, n], k=5)
    with pytest.raises(KeyError, match="'abc'"):
        r.recommend(["abc"], k=5)
    with pytest.raises(ValueError, match="k must be in"):
        r.recommend([0], k=0)
    items, _ = r.recommend(["5"], k=5)  # integer ids may come as text
    np.testing.assert_array_equal(items, r.recommend([5], k=5)[0])


def test_memory_url_round_trip(trained):
    url = "memory://goat-test-export/run1"
    export_model(trained.model, trained, trained.cfg, url, faiss_kind="flat")
    r = Retriever.load(url)
    users = torch.arange(0, trained.dataset.n_users, 7)
    np.testing.assert_array_equal(r.recommend(users.numpy(), k=10)[0], reference_topk(trained, users, 10)[0].numpy())


def _copy_bundle(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize("target", [EMBEDDINGS, TRAIN_ITEMS, COLD_START, "items.faiss"])
def test_tampered_file_is_detected(bundle, tmp_path, target):
    out = tmp_path / "b"
    _copy_bundle(bundle[0], out)
    data = bytearray((out / target).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    (out / target).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{target}: sha256 .* does not match the manifest"):
        Retriever.load(str(out))


def test_tampered_or_missing_manifest_is_detected(bundle, tmp_path):
    out = tmp_path / "b"
    _copy_bundle(bundle[0], out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["model"]["dim"] = 8
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="manifest_sha256 does not match"):
        Retriever.load(str(out))
    (out / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest"):
        Retriever.load(str(out))
    _copy_bundle(bundle[0], tmp_path / "c")
    (tmp_path / "c" / EMBEDDINGS).unlink()
    with pytest.raises(BundleError, match="embeddings.safetensors: missing"):
        Retriever.load(str(tmp_path / "c"))


def _isolated(n: int) -> CSR:
    """The kNN graph of n nodes that only have their self-loop (no neighbourhood)."""
    return CSR(torch.arange(n + 1, dtype=torch.int64), torch.arange(n, dtype=torch.int32), n)


def reference_cold_items(model, feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own modules on isolated items: GAT encoders over a self-loop-only graph, the OAT
    plan from the training EMA, the ID view imputed from the aligned views, then ``fusion.fuse``."""
    n = next(iter(feats.values())).shape[0]
    xs = torch.stack([model.item_encoders[m].full_graph(_isolated(n), feats[m], n) for m in model.modalities])
    plan, _, _ = model.fusion.solve(model.fusion.ema_statistics())
    _, aligned = model.fusion.fuse(torch.zeros(n, model.dim), xs, plan)
    w = model.fusion.weights()
    x_id = (w[1:].view(-1, 1, 1) * aligned).sum(0) / w[1:].sum()
    return model.fusion.fuse(x_id, xs, plan)[0]


@pytest.mark.parametrize("normalize", [False, True])
def test_embed_items_matches_torch_reference(tmp_path, normalize):
    cfg = tiny_cfg(tmp_path, "model.gat_heads=3", "model.gat_layers=2",
                   "sampling.fanouts={user_item: [5, 5], item_item: [4, 4], user_user: [4, 4]}",
                   f"model.fusion_normalize={str(normalize).lower()}")
    trainer = Trainer(cfg, tmp_path / "run").build()
    try:
        train_steps(trainer, 3)
        with torch.no_grad():  # make Delta non-zero so the test sees it
            trainer.model.fusion.delta.add_(0.05 * torch.randn_like(trainer.model.fusion.delta))
        trainer.model.eval()
        export_model(trainer.model, trainer, trainer.cfg, str(tmp_path / "b"))
        r = Retriever.load(str(tmp_path / "b"))
        g = torch.Generator().manual_seed(0)
        feats = {m: torch.randn(9, int(f.shape[1]), generator=g) for m, f in trainer.item_features.items()}
        got = r.embed_items({m: v.numpy() for m, v in feats.items()})
        with torch.no_grad():
            ref = reference_cold_items(trainer.model, feats)
        assert got.shape == (9, 16) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)
        # calibration: the least-squares scale of the existing items' embeddings onto their trained rows
        every = r.embed_items({m: np.asarray(f, dtype=np.float32) for m, f in trainer.item_features.items()})
        trained = r.item_reps.numpy().astype(np.float64)
        scale = (every * trained).sum() / (every.astype(np.float64) ** 2).sum()
        assert r.manifest["cold_start"]["calibration_scale"] == pytest.approx(scale, rel=1e-5)
        np.testing.assert_allclose(r.embed_items({m: v.numpy() for m, v in feats.items()}, calibrated=True),
                                   got * np.float32(scale), rtol=1e-5, atol=1e-6)
    finally:
        trainer.close()


def test_embed_items_input_errors(bundle):
    r = Retriever.load(str(bundle[0]))
    good = {"image": np.zeros((2, 12), np.float32), "text": np.zeros((2, 8), np.float32)}
    assert r.embed_items(good).shape == (2, 16)
    with pytest.raises(ValueError, match=r"missing \['text'\]"):
        r.embed_items({"image": good["image"]})
    with pytest.raises(ValueError, match=r"unknown \['audio'\]"):
        r.embed_items({**good, "audio": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"features\['text'\] has shape \(2, 9\)"):
        r.embed_items({**good, "text": np.zeros((2, 9))})
    bad = good["image"].copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"features\['image'\] row 1 is not finite"):
        r.embed_items({**good, "image": bad})


def test_id_only_model_exports_without_cold_start(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.use_item_modalities=false", "model.use_user_branch=false", "model.fusion=none")
    trainer = Trainer(cfg, tmp_path / "run").build()
    try:
        train_steps(trainer, 2)
        manifest = export_model(trainer.model, trainer, trainer.cfg, str(tmp_path / "b"))
        assert manifest["cold_start"] is None and COLD_START not in manifest["files"]
        r = Retriever.load(str(tmp_path / "b"))
        with pytest.raises(BundleError, match="no cold-start parameters"):
            r.embed_items({})
        users = torch.arange(20)
        np.testing.assert_array_equal(r.recommend(users.numpy(), 10)[0], reference_topk(trainer, users, 10)[0].numpy())
        with pytest.raises(ValueError, match="needs a FAISS index"):
            r.recommend([0], 5, exact=False)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------------------------
# From a checkpoint (CheckpointStore, the engine's layout: "model", "best_model", extra config/metrics)

def test_goat_export_from_checkpoint_root_and_step(tmp_path, capsys):
    import copy

    from goat_dist.checkpoint import CheckpointStore
    from goat_dist.cli import main
    from goat_dist.config import to_dict

    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg, tmp_path / "run").build()
    try:
        train_steps(trainer, 2)
        best = copy.deepcopy(trainer.model.state_dict())
        train_steps(trainer, 4)
        last = copy.deepcopy(trainer.model.state_dict())
        store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
        extra = {"config": to_dict(cfg), "metrics": {"valid": {"recall@20": 0.5}}}
        step6 = store.save(6, {"model": last, "best_model": best}, extra=extra)
        users = torch.arange(trainer.dataset.n_users)
        trainer.model.eval()
        ref_last = reference_topk(trainer, users, 20)[0].numpy()
        trainer.model.load_state_dict(best)
        ref_best = reference_topk(trainer, users, 20)[0].numpy()
        assert (ref_last != ref_best).any()  # the two weight sets are distinguishable

        assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out",
                     str(tmp_path / "exp_best"), "--faiss"]) == 0
        assert "exported 150 users, 80 items (d=16)" in capsys.readouterr().out
        r = Retriever.load(str(tmp_path / "exp_best"))
        np.testing.assert_array_equal(r.recommend(users.numpy(), 20)[0], ref_best)
        np.testing.assert_array_equal(r.recommend(users.numpy(), 20, exact=False)[0], ref_best)
        assert r.manifest["metrics"] == extra["metrics"] and r.manifest["checkpoint"]["weights"] == "best_model"
        assert r.manifest["checkpoint"]["url"] == step6 and r.manifest["config"] == to_dict(cfg)
        assert len(r.manifest["dataset"]["fingerprint"]) == 40 and r.manifest["code_version"] != "unknown"

        assert main(["export", "--checkpoint", step6, "--out", str(tmp_path / "exp_last"), "--weights", "last"]) == 0
        r = Retriever.load(str(tmp_path / "exp_last"))
        np.testing.assert_array_equal(r.recommend(users.numpy(), 20)[0], ref_last)

        # a checkpoint with only "model" (no valid selection yet) exports "model"
        step7 = store.save(7, {"model": last}, extra=extra)
        assert main(["export", "--checkpoint", step7, "--out", str(tmp_path / "exp_model")]) == 0
        r = Retriever.load(str(tmp_path / "exp_model"))
        assert r.manifest["checkpoint"]["weights"] == "model"
        np.testing.assert_array_equal(r.recommend(users.numpy(), 20)[0], ref_last)
    finally:
        trainer.close()

    (tmp_path / "empty").mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no complete, verified checkpoint" in capsys.readouterr().err


def test_train_with_checkpoints_then_export_run_dir(tmp_path, capsys):
    """The whole path: ``Trainer.fit`` saving checkpoints every 3 steps -> ``goat export --checkpoint
    RUN_DIR/checkpoints`` -> Retriever: its top-20 is the selected model's evaluation top-20 and
    its lists reproduce the run's test Recall@20 (final.json)."""
    from goat_dist.cli import main

    cfg = tiny_cfg(tmp_path, "train.epochs=1", "checkpoint.every_steps=3")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.build()
    try:
        final = trainer.fit()
        if not any((tmp_path / "run" / "checkpoints").glob("step-*")):
            pytest.skip("this tree's Trainer writes no checkpoints (engine checkpointing not merged)")
        users = torch.arange(trainer.dataset.n_users)
        ref = reference_topk(trainer, users, 20)[0].numpy()  # fit() leaves the selected model in place
    finally:
        trainer.close()
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "exp")]) == 0
    r = Retriever.load(str(tmp_path / "exp"))
    items, _ = r.recommend(users.numpy(), 20)
    np.testing.assert_array_equal(items, ref)
    test = CSR.from_edges(torch.from_numpy(trainer.dataset.splits["test"].users.astype(np.int64)),
                          torch.from_numpy(trainer.dataset.splits["test"].items.astype(np.int64)),
                          trainer.dataset.n_users, trainer.dataset.n_items)
    recall = [len(set(test.indices[test.indptr[u]:test.indptr[u + 1]].tolist()) & set(items[u].tolist()))
              / int(test.indptr[u + 1] - test.indptr[u]) for u in range(len(users)) if test.indptr[u + 1] > test.indptr[u]]
    assert np.mean(recall) == pytest.approx(final["test"]["recall@20"], abs=1e-12)
