"""``goat export``: a trained model -> a serving bundle (format: ``goat_dist/serving/bundle.py``).

    goat export --checkpoint RUN_DIR/checkpoints --out exports/run1 [--faiss [flat|ivf]]

Steps: resolve the checkpoint (a checkpoint root -> its newest complete checkpoint, or one
checkpoint URL), rebuild the dataset, graphs and model from the checkpoint's config exactly as the
trainer does (``Trainer._build_inputs`` / ``_new_model``), load the weights, compute the scoring
representations of every user and item once (``RecGOAT.compute_all_representations``, the tensors
evaluation ranks with) and write them with the training-item CSR, the id maps back to the dataset's
original ids, the cold-start parameters, an optional FAISS inner-product index and a manifest with
the sha256 of every file.

Design choices:
- One code path for building inputs: the export borrows a ``Trainer`` (in a throw-away run directory,
  so the run's own ``metrics.jsonl`` is never touched) rather than re-implementing data/graph/feature
  selection, so the exported tables are those the trainer evaluates with.
- Nothing is pickled: safetensors, JSON, TSV and FAISS's own serialisation.
- The manifest is written last: a folder without ``manifest.json`` is an incomplete export and the
  reader refuses it.
"""
from __future__ import annotations

import copy
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from goat_dist.config import Config, ConfigError, from_dict, parse_override, to_dict
from goat_dist.data.dataset import RecDataset
from goat_dist.data.fsio import basename, exists, fs_and_path, join
from goat_dist.graph.cache import content_hash
from goat_dist.log import get_logger
from goat_dist.model.fusion import OATFusion
from goat_dist.model.recgoat import RecGOAT
from goat_dist.serving import cold_start
from goat_dist.serving.bundle import (COLD_START, EMBEDDINGS, FAISS_INDEX, FORMAT, IDENTITY, ITEM_IDS, MANIFEST,
                                      TRAIN_ITEMS, USER_IDS, write_file, write_manifest)

log = get_logger(__name__)

FAISS_KINDS = ("flat", "ivf")


# ----------------------------------------------------------------------------------------------
# Pieces of the bundle

def code_version() -> str:
    """``git describe --always --dirty`` of the package's checkout, else the installed version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"goat_dist=={version('goat_dist')}"
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def dataset_fingerprint(ds: RecDataset) -> str:
    """Content hash (``graph.cache.content_hash``, blake2b-160) of every split's (users, items) arrays
    and every feature matrix, independent of the on-disk format."""
    return content_hash({s: (v.users, v.items) for s, v in ds.splits.items()}, dict(ds.item_features),
                        dict(ds.user_features), ds.n_users, ds.n_items)


def _id_map_bytes(ids: np.ndarray) -> bytes:
    """The data layer's id-map format (``data.table.write_id_map``): header, then ``index<TAB>id``."""
    return ("index\tid\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(ids))).encode("utf-8")


def cold_start_params(model: RecGOAT) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The tensors and description ``serving.cold_start.embed_items`` needs, or None when the model
    cannot embed items from features alone (no OAT fusion, or an untrained OAT without a plan).

    The GAT layers are stored as the linear maps they reduce to on an isolated node (heads averaged:
    attention over the single self-loop is 1), the alignment as T_m + Delta_m with T from the
    training EMA of the OAT statistics (the plan evaluation uses)."""
    fusion = model.fusion
    if not isinstance(fusion, OATFusion):
        log.info("no cold-start parameters: they need OAT fusion over item modalities (model.fusion=%r, "
                 "modalities %s)", model.cfg.fusion, model.modalities or "none")
        return None
    if not model.cfg.score_fused:
        log.info("no cold-start parameters: model.score_fused is false (items score with their ID view, "
                 "which features alone do not give)")
        return None
    flat = fusion.ema_statistics()
    if flat is None:
        log.warning("the OAT fusion was never trained (no EMA statistics): no cold-start parameters written")
        return None
    with torch.no_grad():
        plan, _, _ = fusion.solve(flat)
        tensors: dict[str, torch.Tensor] = {}
        for k, m in enumerate(model.modalities):
            enc = model.item_encoders[m]
            tensors[f"{m}/proj.weight"] = enc.proj.weight
            tensors[f"{m}/proj.bias"] = enc.proj.bias
            for layer, conv in enumerate(enc.convs):
                if conv.lin is None or conv.res is not None or conv.concat or conv.bias is None:
                    raise ValueError(f"cold-start export: GAT layer {layer} of {m!r} is not a shared-linear, "
                                     "head-averaged GATConv with bias")
                w = conv.lin.weight.view(conv.heads, conv.out_channels, -1).mean(0)
                tensors[f"{m}/gat{layer}.weight"] = w
                tensors[f"{m}/gat{layer}.bias"] = conv.bias
            tensors[f"{m}/align"] = plan[k] + fusion.delta[k]
        tensors["fusion/weights"] = fusion.weights()
        norm = fusion.drop.norm
        if norm is not None:
            tensors["fusion/ln.weight"] = norm.weight
            tensors["fusion/ln.bias"] = norm.bias
    arrays = {k: v.detach().to("cpu", torch.float32).contiguous().numpy() for k, v in tensors.items()}
    meta = {"modalities": list(model.modalities), "dim": model.dim,
            "feature_dims": {m: int(model.item_encoders[m].proj.in_features) for m in model.modalities},
            "gat_layers": len(model.item_encoders[model.modalities[0]].convs),
            "normalize": norm is not None, "ln_eps": float(norm.eps) if norm is not None else 0.0,
            "id_view": "imputed: sum_m w_m aligned_m / sum_m w_m", "file": COLD_START}
    return arrays, meta


def calibration_scale(params: Mapping[str, np.ndarray], meta: Mapping[str, Any], item_features: Mapping[str, Any],
                      item_reps: np.ndarray, chunk_size: int = 65536) -> float:
    """Least-squares scale s = <E, I> / <E, E> between the cold-start embeddings E of the EXISTING
    items (from their features) and their trained representations I, over all exported items.

    ``embed_items`` reproduces the model's computation, whose vectors are on the modality views'
    scale, not the trained items' (norms several times larger on the synthetic data; see
    benchmarks/results/cold_start.json); multiplying by s puts new items on the catalogue's scale.
    Fitted on trained items only, so no held-out information enters it."""
    num = den = 0.0
    n = item_reps.shape[0]
    for s0 in range(0, n, chunk_size):
        rows = np.arange(s0, min(s0 + chunk_size, n))
        e = cold_start.embed_items(params, meta, {m: np.asarray(item_features[m][rows], dtype=np.float32)
                                                  for m in meta["modalities"]}).astype(np.float64)
        num += float((e * item_reps[rows]).sum())
        den += float((e * e).sum())
    return num / den if den > 0 else 1.0


def build_faiss_index(items: np.ndarray, kind: str = "flat", nlist: int = 0, seed: int = 0):
    """FAISS inner-product index over ``items`` [n, d]: ``flat`` (IndexFlatIP, exact) or ``ivf``
    (IndexIVFFlat with ``nlist`` lists, default ~4 sqrt(n), trained on the items)."""
    import faiss

    if kind not in FAISS_KINDS:
        raise ValueError(f"unknown FAISS index kind {kind!r} (expected {', '.join(FAISS_KINDS)})")
    items = np.ascontiguousarray(items, dtype=np.float32)
    n, d = items.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(nlist) or max(1, min(n // 39, int(4 * np.sqrt(n))))
        if nlist > n:
            raise ValueError(f"--nlist {nlist} > {n} items")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(items)
    index.add(items)
    return index


# ----------------------------------------------------------------------------------------------
# Writing a bundle

def export_model(model: RecGOAT, inputs: Any, cfg: Config, out_url: str, *, faiss_kind: str | None = None,
                 nlist: int = 0, nprobe: int = 0, metrics: Mapping[str, Any] | None = None,
                 checkpoint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the serving bundle of ``model`` to ``out_url`` and return its manifest.

    Args:
        model: the trained model (any device; evaluated in eval mode).
        inputs: what the trainer built (a ``Trainer`` after ``_build_inputs``): ``dataset``,
            ``graphs``, ``item_features``, ``user_features``.
        cfg: the resolved config (stored in the manifest).
        faiss_kind: None (no index), ``flat`` or ``ivf`` (``nlist`` lists, searched with ``nprobe``,
            default min(nlist, 16)).
        metrics / checkpoint: recorded in the manifest as they are (JSON-serialisable).
    """
    t0 = time.perf_counter()
    old = join(out_url, MANIFEST)
    if exists(old):  # readers must see an incomplete bundle, not an old manifest over new files
        log.warning("%s already holds an export: replacing it", out_url)
        fs, path = fs_and_path(old)
        fs.rm(path)
    ds: RecDataset = inputs.dataset
    g = inputs.graphs
    user_reps, item_reps = model.compute_all_representations(g.ui.user_items, g.ui.item_users, inputs.item_features,
                                                             inputs.user_features, g.item_item, g.user_user)
    user_np = user_reps.detach().to("cpu", torch.float32).contiguous().numpy()
    item_np = item_reps.detach().to("cpu", torch.float32).contiguous().numpy()
    if not (np.isfinite(user_np).all() and np.isfinite(item_np).all()):
        raise ValueError("export: the model's representations contain NaN/Inf; refusing to export them")
    t_reps = time.perf_counter()

    from safetensors.numpy import save

    files: dict[str, dict[str, Any]] = {}
    write_file(out_url, EMBEDDINGS, save({"user": user_np, "item": item_np}), files)
    train = g.ui.user_items  # the training interactions evaluation masks (Trainer._train_csr)
    write_file(out_url, TRAIN_ITEMS, save({"indptr": train.indptr.to(torch.int64).contiguous().numpy(),
                                           "indices": train.indices.contiguous().numpy()}), files)
    ids = {}
    for side, arr, name in (("user", ds.user_ids, USER_IDS), ("item", ds.item_ids, ITEM_IDS)):
        if arr is None:
            ids[side] = IDENTITY
        else:
            write_file(out_url, name, _id_map_bytes(arr), files)
            ids[side] = name
    cold = cold_start_params(model)
    if cold is not None:
        cold[1]["calibration_scale"] = calibration_scale(cold[0], cold[1], inputs.item_features, item_np)
        write_file(out_url, COLD_START, save(cold[0]), files)
    faiss_meta = None
    if faiss_kind:
        import faiss

        index = build_faiss_index(item_np, faiss_kind, nlist, seed=cfg.train.seed)
        faiss_meta = {"kind": faiss_kind, "metric": "inner_product", "file": FAISS_INDEX}
        if faiss_kind == "ivf":
            faiss_meta.update(nlist=int(index.nlist), nprobe=int(nprobe or min(index.nlist, 16)))
        write_file(out_url, FAISS_INDEX, faiss.serialize_index(index).tobytes(), files)

    manifest = {
        "format": FORMAT,
        "created_unix": round(time.time(), 3),
        "code_version": code_version(),
        "model": {"dim": int(user_np.shape[1]), "n_users": int(user_np.shape[0]), "n_items": int(item_np.shape[0]),
                  "modalities": list(model.modalities), "fusion": cfg.model.fusion,
                  "user_branch": bool(model.use_user_branch), "score": "inner product user @ item"},
        "config": to_dict(cfg),
        "metrics": None if metrics is None else dict(metrics),
        "checkpoint": None if checkpoint is None else dict(checkpoint),
        "dataset": {"source": ds.source, "n_users": ds.n_users, "n_items": ds.n_items,
                    "interactions": {s: len(v) for s, v in ds.splits.items()},
                    "fingerprint": dataset_fingerprint(ds),
                    "fingerprint_method": "goat_dist.graph.cache.content_hash (blake2b-160) of split arrays "
                                          "and feature matrices"},
        "ids": ids,
        "train_items": {"file": TRAIN_ITEMS, "nnz": int(train.indices.numel())},
        "cold_start": None if cold is None else cold[1],
        "faiss": faiss_meta,
        "files": files,
    }
    for name in (USER_IDS, ITEM_IDS, COLD_START, FAISS_INDEX):  # left over from an earlier export here
        if name not in files and exists(join(out_url, name)):
            fs, path = fs_and_path(join(out_url, name))
            fs.rm(path)
    manifest = write_manifest(out_url, manifest)
    log.info("exported %d users, %d items (d=%d) to %s in %.1fs (representations %.1fs); files: %s",
             user_np.shape[0], item_np.shape[0], user_np.shape[1], out_url, time.perf_counter() - t0, t_reps - t0,
             ", ".join(sorted(files)))
    return manifest


# ----------------------------------------------------------------------------------------------
# From a checkpoint

def build_for_inference(cfg: Config, device: torch.device | str = "cpu"):
    """A ``Trainer`` whose inputs (data, graphs, features) and freshly initialised model are built
    exactly as for training; it writes nothing (no run directory survives, no checkpoints)."""
    from goat_dist.engine.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.log.tensorboard = False
    cfg.checkpoint.every_steps, cfg.checkpoint.dir = 0, ""  # this trainer never trains nor saves
    with tempfile.TemporaryDirectory(prefix="goat_export_") as run_dir:
        trainer = Trainer(cfg, run_dir, device=device)
        trainer.close()  # it never logs: release a run logger it may have opened, before its folder goes
    trainer._build_inputs()
    trainer.model = trainer._new_model(trainer.device)
    trainer.model.eval()
    return trainer


def apply_overrides(values: dict, overrides: list[str] | tuple[str, ...], source: str) -> Config:
    """``--set section.key=value`` on a config dict (e.g. ``data.path`` when the dataset moved)."""
    values = copy.deepcopy(values)
    for text in overrides:
        parts, value = parse_override(text)
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part} is not a section")
        node[parts[-1]] = value
    return from_dict(values, source if not overrides else f"{source} with --set {' '.join(overrides)}")


CHECKPOINT_NAME = re.compile(r"^step-\d+(?:\.\d+)?$")
WEIGHTS = {"best": "best_model", "last": "model"}


def resolve_checkpoint(checkpoint_url: str):
    """``(store, checkpoint URL)`` for a checkpoint root (its newest complete, verified checkpoint)
    or for one checkpoint directory ``<root>/step-<N>``. Raises CheckpointError when there is none."""
    from goat_dist.checkpoint import CheckpointError, CheckpointStore, resolve_url

    url = resolve_url(checkpoint_url)
    name = basename(url)
    if CHECKPOINT_NAME.match(name) and exists(join(url, "MANIFEST.json")):
        parent = url[: len(url) - len(name)].rstrip("/\\")
        return CheckpointStore(parent, keep=0), url
    store = CheckpointStore(url, keep=0)
    latest = store.latest()
    if latest is None:
        raise CheckpointError(f"{checkpoint_url}: no complete, verified checkpoint under it (and it is not a "
                              "checkpoint directory step-<N> itself)")
    return store, latest


def load_checkpoint_model(checkpoint_url: str, overrides: list[str] | tuple[str, ...] = (),
                          device: torch.device | str = "cpu", weights: str = "best"):
    """(trainer with the checkpoint's model loaded, config, checkpoint info, metrics).

    Args:
        checkpoint_url: a checkpoint root (its newest complete checkpoint is used) or one checkpoint.
        overrides: ``--set`` overrides applied to the checkpoint's config (e.g. a moved ``data.path``).
        weights: ``best`` = the valid-selected snapshot (``best_model``; the weights ``final.json``'s
            test metrics belong to), falling back to ``model`` when the checkpoint has none;
            ``last`` = the weights at the checkpoint's step (``model``).
    """
    from goat_dist.checkpoint import CheckpointError

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    store, ckpt = resolve_checkpoint(checkpoint_url)
    meta = store.load(ckpt, {})  # verified extra only: the config to rebuild the model from
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{ckpt}: extra.json has no 'config' object; cannot rebuild the model")
    cfg = apply_overrides(meta["config"], overrides, f"{ckpt} config")
    trainer = build_for_inference(cfg, device)
    try:
        state = trainer.model.state_dict()
        key = WEIGHTS[weights]
        try:
            extra = store.load(ckpt, {key: state})
        except CheckpointError as exc:
            if key != "best_model":
                raise
            log.warning("%s: no valid-selected 'best_model' weights (%s); exporting 'model'", ckpt, exc)
            key = "model"
            extra = store.load(ckpt, {key: state})
        trainer.model.load_state_dict(state)
    except BaseException:
        trainer.close()
        raise
    info = {"url": ckpt, "weights": key}
    if isinstance(extra.get("trainer"), dict):
        info["trainer"] = extra["trainer"]
    metrics = extra.get("metrics")
    log.info("loaded %r weights of %s", key, ckpt)
    return trainer, cfg, info, metrics


def export_main(checkpoint_url: str, out_url: str, *, faiss_kind: str | None = None, nlist: int = 0,
                nprobe: int = 0, overrides: list[str] | tuple[str, ...] = (), weights: str = "best") -> dict[str, Any]:
    """``goat export``: checkpoint -> serving bundle at ``out_url``; returns the manifest."""
    trainer, cfg, info, metrics = load_checkpoint_model(checkpoint_url, overrides, weights=weights)
    try:
        return export_model(trainer.model, trainer, cfg, out_url, faiss_kind=faiss_kind, nlist=nlist, nprobe=nprobe,
                            metrics=metrics, checkpoint=info)
    finally:
        trainer.close()


__all__ = ["build_faiss_index", "build_for_inference", "cold_start_params", "code_version", "dataset_fingerprint",
           "export_main", "export_model", "load_checkpoint_model", "resolve_checkpoint"]
