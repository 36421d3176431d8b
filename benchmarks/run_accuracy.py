"""Issue 5's accuracy table: train every (config, seed, ablation) with ``goat train`` in a subprocess,
measure its wall time and peak RSS (``/usr/bin/time -v`` when present, else ``getrusage``), read
``final.json`` and write ``benchmarks/results/accuracy.json``.

    .venv/bin/python -m benchmarks.run_accuracy                 # the whole table (hours on 2 cores)
    .venv/bin/python -m benchmarks.run_accuracy --only baby     # rows whose name starts with "baby"
    .venv/bin/python -m benchmarks.run_accuracy --collect       # only re-read existing run dirs
    .venv/bin/python -m benchmarks.run_accuracy --only tiktok_recgoat --jobs 3   # 3 seeds at once

With ``--jobs N`` up to N rows train at the same time (each is its own process); wall times then
include the contention, so compare rows' wall times only within one ``--jobs`` setting.

Every row is valid-selected: ``final.json`` holds the test metrics of the epoch chosen on the
validation split. The same ``run_one`` drives the slow tests in ``tests/accuracy/``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "accuracy.json"
ML100K = ROOT / "data" / "ml100k"


@dataclass(frozen=True)
class Row:
    name: str
    config: str
    dataset: str
    seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def run_dir(self) -> Path:
        return ROOT / "runs" / "accuracy" / self.name


SEEDS = (0, 1, 2)
ML_ABLATIONS = {"no_oat_sum": ("model.fusion=sum",), "no_cmcl": ("loss.cmcl_weight=0.0",),
                "no_user_branch": ("model.use_user_branch=false",), "concat": ("model.fusion=concat",)}


def table() -> list[Row]:
    rows = [Row("baby_lightgcn", "configs/baby_lightgcn.yaml", "amazon_baby")]
    for s in SEEDS:
        rows.append(Row(f"tiktok_lightgcn_s{s}", "configs/tiktok_lightgcn.yaml", "tiktok", s))
        rows.append(Row(f"tiktok_recgoat_s{s}", "configs/tiktok.yaml", "tiktok", s))
    rows.append(Row("ml100k_lightgcn", "configs/ml100k_lightgcn.yaml", "ml-100k"))
    rows.append(Row("ml100k_recgoat", "configs/ml100k.yaml", "ml-100k"))
    for name, ov in ML_ABLATIONS.items():
        rows.append(Row(f"ml100k_recgoat_{name}", "configs/ml100k.yaml", "ml-100k", 0, ov))
    return rows


def ensure_ml100k() -> Path:
    """``data/ml100k`` (goat format + MiniLM text features and user profiles), made from
    ``../shared/data/ml-100k`` when missing."""
    if not (ML100K / "user_profile.npy").exists():
        py = sys.executable
        subprocess.run([py, "-m", "goat_dist.cli", "data", "movielens", str(SHARED / "ml-100k"), "--out", str(ML100K)],
                       cwd=ROOT, check=True)
        subprocess.run([py, "-m", "goat_dist.cli", "data", "profiles", str(ML100K), "--text", "item_text.tsv"],
                       cwd=ROOT, check=True)
    return ML100K


def _peak_rss_mb(time_log: str) -> float | None:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log)
    return round(int(m.group(1)) / 1024, 1) if m else None


def run_one(row: Row, *, extra: tuple[str, ...] = (), fresh: bool = True) -> dict:
    """Train ``row`` (``goat train`` in a subprocess); return its final.json plus wall time and peak RSS."""
    if row.dataset == "ml-100k":
        ensure_ml100k()
    if fresh and row.run_dir.exists():
        shutil.rmtree(row.run_dir)
    row.run_dir.parent.mkdir(parents=True, exist_ok=True)
    sets = [f"train.seed={row.seed}", *row.overrides, *extra]
    cmd = [sys.executable, "-m", "goat_dist.cli", "train", "-c", row.config, "--run-dir", str(row.run_dir)]
    for s in sets:
        cmd += ["--set", s]
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    log_path = row.run_dir.parent / f"{row.name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        if timer:
            proc = subprocess.run([timer, "-v", *cmd], cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        else:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{row.name} failed (exit {proc.returncode}); see {log_path}:\n{text[-3000:]}")
    peak = _peak_rss_mb(text)
    if peak is None:
        peak = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return collect(row, wall_s=round(wall, 1), peak_rss_mb=peak, command="goat train -c " + row.config
                   + "".join(f" --set {s}" for s in sets))


def collect(row: Row, **extra) -> dict:
    final = json.loads((row.run_dir / "final.json").read_text())
    test, valid = final.get("test") or {}, final.get("valid") or {}
    return {"name": row.name, "config": row.config, "dataset": row.dataset, "seed": row.seed,
            "overrides": list(row.overrides), "best_epoch": final["best_epoch"], "epochs_run": final["epochs_run"],
            "train_seconds": final.get("train_seconds"),
            "valid_recall@20": valid.get("recall@20"), "test_recall@20": test.get("recall@20"),
            "test_ndcg@20": test.get("ndcg@20"), **extra}


def summarise(results: list[dict]) -> dict:
    """Mean and std over seeds of the tiktok rows, per config."""
    out = {}
    for cfg in ("tiktok_lightgcn", "tiktok_recgoat"):
        rs = [r for r in results if r["name"].startswith(cfg + "_s")]
        if rs:
            for k in ("test_recall@20", "test_ndcg@20"):
                vals = [r[k] for r in rs]
                out[f"{cfg} {k}"] = {"mean": statistics.mean(vals),
                                     "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run rows whose name starts with this")
    ap.add_argument("--collect", action="store_true", help="re-read existing run directories, train nothing")
    ap.add_argument("--jobs", type=int, default=1, help="train up to this many rows at once (default 1)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    record = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old = {r["name"]: r for r in record.get("rows", [])}
    todo = [row for row in table() if row.name.startswith(args.only)]
    if args.collect:
        for row in todo:
            if (row.run_dir / "final.json").exists():
                old[row.name] = {**old.get(row.name, {}), **collect(row)}
    else:
        def train(row: Row) -> dict:
            print(f"== {row.name}", flush=True)
            res = run_one(row)
            if args.jobs > 1:
                res["parallel_jobs"] = args.jobs
            print(json.dumps(res), flush=True)
            return res

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for row, res in zip(todo, pool.map(train, todo)):
                old[row.name] = res
    rows = list(old.values())
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    # the other keys (the tuning history, the machine) are kept
    RESULTS.write_text(json.dumps({**record, "rows": rows, "summary": summarise(rows)}, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
