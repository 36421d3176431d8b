"""Cold-start items: how well do items embedded from their modality features alone
(``Retriever.embed_items``) retrieve, compared with the items' trained representations?

Protocol (``--holdout`` fraction of items, drawn with ``--seed``, is the "cold" set C):

1. Train on the normal data (``goat train`` semantics: valid-selected model), export, load the bundle.
2. Test users = users with at least one TEST interaction on an item of C; relevant items H_u = their
   test items in C. Recall@20 of H_u, the user's training items excluded, in two catalogues:
   - ``full``: all items; C's rows are (a) the trained representations or (b) ``embed_items``;
   - ``cold_only``: only the items of C are ranked (scale-free: compares directions only);
   and ``all_test_items``: Recall@20 of ALL test items in the full catalogue, i.e. what swapping
   C's rows does to the whole ranking (over-promoted cold items push warm relevant items out).
   (b) comes as the model's computation (``embed_items``), calibrated (``calibrated=True``: times
   the export's least-squares scale onto the trained items) and with the ID view set to 0.
3. ``--strict``: train a second model on data whose training split has NO interaction with C (C is
   held out from training entirely; its features are still known), embed C from features with that
   model and rank in the same catalogues (training items of the ORIGINAL split excluded throughout,
   so every variant ranks the same candidate set). Its own full-graph representation of C (kNN
   neighbourhood, untrained ID rows) is reported as ``graph_path``.

Every Recall@20 is the framework's evaluation (``eval.metrics.rank_metrics``).

    python -m benchmarks.bench_cold_start -c configs/synthetic.yaml --run-dir runs/cold_start [--strict]
        [--set key=value ...] [--holdout 0.1] [--json benchmarks/results/cold_start.json]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS_DIR, machine_info, write_json
from goat_dist.checkpoint.export import build_for_inference, export_model
from goat_dist.config import Config, load_config
from goat_dist.engine.trainer import Trainer
from goat_dist.eval.metrics import rank_metrics
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger, setup_logging
from goat_dist.serving import Retriever

log = get_logger(__name__)
K = 20
KEYS = ("full", "cold_only", "all_test_items", "cold_norm_over_warm_norm")


def train_and_export(cfg: Config, run_dir: Path, reuse: bool = False) -> tuple[Retriever, Trainer, dict, float | None]:
    """Train (valid-selected model), export to ``run_dir/export`` and load it; with ``reuse`` an
    existing export of an earlier run of this script is loaded instead (no training)."""
    if reuse and (run_dir / "export" / "manifest.json").is_file():
        r = Retriever.load(str(run_dir / "export"))
        log.info("reusing %s (trained earlier)", run_dir / "export")
        return r, build_for_inference(cfg), r.manifest["metrics"], None
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir).build()
    final = trainer.fit()
    seconds = time.perf_counter() - t0
    export_model(trainer.model, trainer, cfg, str(run_dir / "export"), metrics=final)
    return Retriever.load(str(run_dir / "export")), trainer, final, seconds


def restricted(u: np.ndarray, i: np.ndarray, keep: np.ndarray, remap: np.ndarray, n_users: int, n_cols: int) -> CSR:
    """CSR of the (u, i) pairs whose item is in ``keep`` (bool [n_items]), items renumbered by ``remap``."""
    m = keep[i]
    return CSR.from_edges(torch.from_numpy(u[m].astype(np.int64)), torch.from_numpy(remap[i[m]].astype(np.int64)),
                          n_users, n_cols)


def recalls(user_reps: np.ndarray, item_reps: np.ndarray, cold: np.ndarray, ds) -> dict[str, float]:
    """Recall@20 of the test items in ``cold`` in the full and the cold-only catalogues."""
    n_users, n_items = ds.n_users, ds.n_items
    tr, te = ds.splits["train"], ds.splits["test"]
    is_cold = np.zeros(n_items, bool)
    is_cold[cold] = True
    ident = np.arange(n_items)
    to_cold = np.full(n_items, -1)
    to_cold[cold] = np.arange(cold.size)
    tu, ti = tr.users.astype(np.int64), tr.items.astype(np.int64)
    eu, ei = te.users.astype(np.int64), te.items.astype(np.int64)
    users_t, items_t = torch.from_numpy(user_reps), torch.from_numpy(item_reps)
    full = rank_metrics(users_t, items_t, restricted(eu, ei, is_cold, ident, n_users, n_items),
                        [restricted(tu, ti, np.ones(n_items, bool), ident, n_users, n_items)], [K])
    only = rank_metrics(users_t, items_t[torch.from_numpy(cold)],
                        restricted(eu, ei, is_cold, to_cold, n_users, cold.size),
                        [restricted(tu, ti, is_cold, to_cold, n_users, cold.size)], [K])
    every = rank_metrics(users_t, items_t, restricted(eu, ei, np.ones(n_items, bool), ident, n_users, n_items),
                         [restricted(tu, ti, np.ones(n_items, bool), ident, n_users, n_items)], [K])
    norms = np.linalg.norm(item_reps, axis=1)
    return {"full": full[f"recall@{K}"], "cold_only": only[f"recall@{K}"], "n_test_users": full["n_users"],
            "all_test_items": every[f"recall@{K}"], "cold_norm_over_warm_norm":
            float(norms[is_cold].mean() / norms[~is_cold].mean())}


def features_of(trainer: Trainer, rows: np.ndarray) -> dict[str, np.ndarray]:
    return {m: np.asarray(f[rows], dtype=np.float32) for m, f in trainer.item_features.items()}


def strict_dataset(src: Path, dst: Path, cold: np.ndarray) -> int:
    """Copy of the goat-format folder ``src`` whose train.txt has no interaction with ``cold``;
    other files are copied (feature discovery lists regular files only). Returns the number of removed training interactions."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    cold_set = set(int(c) for c in cold)
    removed = 0
    for f in src.iterdir():
        if f.name == "train.txt":
            lines = []
            for line in f.read_text().splitlines():
                toks = line.split()
                if not toks:
                    continue
                kept = [t for t in toks[1:] if int(t) not in cold_set]
                removed += len(toks) - 1 - len(kept)
                lines.append(" ".join([toks[0], *kept]))
            (dst / "train.txt").write_text("\n".join(lines) + "\n")
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    return removed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default="configs/synthetic.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", default="runs/cold_start")
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--reuse", action="store_true", help="load the exports of an earlier run in --run-dir")
    p.add_argument("--json", default=str(RESULTS_DIR / "cold_start.json"))
    args = p.parse_args(argv)
    setup_logging("INFO")
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    cfg = load_config(args.config, args.set)
    if not cfg.model.score_fused:
        p.error(f"{args.config}: model.score_fused is false (items score with their ID view), so the export "
                "has no cold-start parameters; pass --set model.score_fused=true")
    load_before = os.getloadavg()

    retriever, trainer, final, train_s = train_and_export(cfg, run_dir / "normal", args.reuse)
    ds = trainer.dataset
    rng = np.random.default_rng(args.seed)
    cold = np.sort(rng.choice(ds.n_items, size=max(1, int(round(args.holdout * ds.n_items))), replace=False))
    users = retriever.user_reps.numpy()
    trained_items = retriever.item_reps.numpy()
    embedded = trained_items.copy()
    embedded[cold] = retriever.embed_items(features_of(trainer, cold))
    a = recalls(users, trained_items, cold, ds)
    b = recalls(users, embedded, cold, ds)
    calibrated = trained_items.copy()
    calibrated[cold] = retriever.embed_items(features_of(trainer, cold), calibrated=True)
    b_cal = recalls(users, calibrated, cold, ds)
    zero = None
    cs = retriever.manifest["cold_start"]
    if not cs["normalize"]:
        # the alternative "ID view = 0": w_0 * 0 + sum_m w_m a_m = (sum_m w_m) * (the imputed item)
        w = retriever._cold[0]["fusion/weights"]
        scaled = trained_items.copy()
        scaled[cold] = embedded[cold] * float(w[1:].sum())
        zero = recalls(users, scaled, cold, ds)
    result = {
        "dataset": cfg.data.path, "config": args.config, "overrides": args.set, "n_users": ds.n_users,
        "n_items": ds.n_items, "cold_items": int(cold.size), "holdout": args.holdout, "seed": args.seed,
        "steps": final["steps"], "epochs_run": final["epochs_run"], "best_epoch": final["best_epoch"],
        "train_seconds": None if train_s is None else round(train_s, 1), "model_test_recall@20": (final["test"] or {}).get("recall@20"),
        "metric": f"Recall@{K} of the test interactions with cold items (train items excluded)",
        "n_test_users": a["n_test_users"],
        "normal": {
            "a_trained": {k: a[k] for k in KEYS},
            "b_embed_items": {k: b[k] for k in KEYS},
            "b_embed_items_calibrated": {k: b_cal[k] for k in KEYS},
            "calibration_scale": retriever.manifest["cold_start"]["calibration_scale"],
            "b_zero_id_view": None if zero is None else {k: zero[k] for k in KEYS},
            "ratio_b_over_a": {k: (b[k] / a[k] if a[k] else None) for k in ("full", "cold_only", "all_test_items")},
            "ratio_b_calibrated_over_a": {k: (b_cal[k] / a[k] if a[k] else None)
                                          for k in ("full", "cold_only", "all_test_items")},
            "random_cold_only": min(1.0, K / cold.size),
        },
    }
    trainer.close()
    log.info("normal protocol: %s", result["normal"])

    if args.strict:
        src = Path(cfg.data.path)
        dst = run_dir / "data_without_cold"
        removed = strict_dataset(src, dst, cold) if not (args.reuse and dst.is_dir()) else None
        cfg_b = load_config(args.config, [*args.set, f"data.path={dst}", "data.generate_if_missing=false"])
        retriever_b, trainer_b, final_b, train_b_s = train_and_export(cfg_b, run_dir / "strict", args.reuse)
        users_b = retriever_b.user_reps.numpy()
        items_b = retriever_b.item_reps.numpy()
        graph_path = recalls(users_b, items_b, cold, ds)
        emb_b = items_b.copy()
        emb_b[cold] = retriever_b.embed_items(features_of(trainer_b, cold))
        c = recalls(users_b, emb_b, cold, ds)
        emb_b[cold] = retriever_b.embed_items(features_of(trainer_b, cold), calibrated=True)
        c_cal = recalls(users_b, emb_b, cold, ds)
        result["strict"] = {
            "removed_train_interactions": removed, "steps": final_b["steps"], "train_seconds": None if train_b_s is None else round(train_b_s, 1),
            "b_embed_items": {k: c[k] for k in KEYS},
            "b_embed_items_calibrated": {k: c_cal[k] for k in KEYS},
            "graph_path": {k: graph_path[k] for k in KEYS},
            "ratio_b_over_normal_a": {k: (c[k] / a[k] if a[k] else None)
                                      for k in ("full", "cold_only", "all_test_items")},
            "ratio_b_calibrated_over_normal_a": {k: (c_cal[k] / a[k] if a[k] else None)
                                                 for k in ("full", "cold_only", "all_test_items")},
        }
        trainer_b.close()
        log.info("strict protocol: %s", result["strict"])
    result["command"] = "python -m benchmarks.bench_cold_start " + " ".join(sys.argv[1:] if argv is None else argv)
    result["machine"] = {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    write_json(args.json, result)
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
