"""Serving retrieval speed and FAISS recall: ``Retriever.recommend`` exact (torch matmul + topk, the
evaluation's ranking) against the FAISS paths (IndexFlatIP, IndexIVFFlat at several nprobe), on a
synthetic catalogue written and read as a real serving bundle.

Embeddings: items = 64 clusters' centres + noise (d = 64), users = noisy mixtures of centres, each user
with ``--train-items`` random training items to exclude. Reported per method: milliseconds per user
(batches of ``--batch`` users, median of ``--repeats``) and overlap@k with the exact top-k
(|approx ∩ exact| / k, averaged over users). One intra-op thread for torch and FAISS.

    python -m benchmarks.bench_serving [--items 1000000] [--users 1000] [--k 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks.harness import RESULTS_DIR, machine_info, write_json
from goat_dist.checkpoint.export import build_faiss_index
from goat_dist.log import get_logger, setup_logging
from goat_dist.serving import Retriever
from goat_dist.serving.bundle import EMBEDDINGS, FAISS_INDEX, FORMAT, IDENTITY, TRAIN_ITEMS, write_file, write_manifest

log = get_logger(__name__)


def synthetic_bundle(out: str, n_users: int, n_items: int, d: int, train_items: int, nlist: int, seed: int) -> float:
    """Write a bundle with clustered embeddings and an IVF index; returns the index build seconds."""
    from safetensors.numpy import save
    import faiss

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d)).astype(np.float32)
    items = (centres[rng.integers(0, 64, n_items)] + 0.5 * rng.standard_normal((n_items, d))).astype(np.float32)
    mix = rng.dirichlet(np.full(64, 0.3), n_users).astype(np.float32)
    users = (mix @ centres + 0.3 * rng.standard_normal((n_users, d))).astype(np.float32)
    indptr = np.arange(0, (n_users + 1) * train_items, train_items, dtype=np.int64)
    indices = np.sort(rng.integers(0, n_items, (n_users, train_items)), axis=1).astype(np.int32).reshape(-1)
    files: dict = {}
    write_file(out, EMBEDDINGS, save({"user": users, "item": items}), files)
    write_file(out, TRAIN_ITEMS, save({"indptr": indptr, "indices": indices}), files)
    t0 = time.perf_counter()
    index = build_faiss_index(items, "ivf", nlist=nlist, seed=seed)
    build_s = time.perf_counter() - t0
    write_file(out, FAISS_INDEX, faiss.serialize_index(index).tobytes(), files)
    write_manifest(out, {"format": FORMAT, "model": {"n_users": n_users, "n_items": n_items, "dim": d},
                         "ids": {"user": IDENTITY, "item": IDENTITY}, "cold_start": None,
                         "faiss": {"kind": "ivf", "nlist": nlist, "nprobe": 1, "file": FAISS_INDEX}, "files": files})
    return build_s


def timed(fn, repeats: int) -> tuple[float, tuple]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--train-items", type=int, default=50)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(RESULTS_DIR / "serving.json"))
    args = p.parse_args(argv)
    setup_logging("INFO")
    import faiss

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="goat_serving_bench_") as out:
        build_s = synthetic_bundle(out, args.users, args.items, args.dim, args.train_items, args.nlist, args.seed)
        t0 = time.perf_counter()
        r = Retriever.load(out)
        load_s = time.perf_counter() - t0
    users = np.arange(args.users)
    rows = {}
    exact_s, (exact, _) = timed(lambda: r.recommend(users, args.k, batch_size=args.batch), args.repeats)
    rows["exact (torch matmul + topk)"] = {"ms_per_user": 1e3 * exact_s / args.users, "overlap@k": 1.0}
    flat = build_faiss_index(r.item_reps.numpy(), "flat")
    for name, index, nprobe in [("faiss IndexFlatIP", flat, None)] + [
            (f"faiss IVF{args.nlist} nprobe={n}", r.index, n) for n in args.nprobe]:
        r.index = index
        if nprobe is not None:
            index.nprobe = nprobe
        s, (got, _) = timed(lambda: r.recommend(users, args.k, exact=False, batch_size=args.batch), args.repeats)
        overlap = np.mean([np.intersect1d(got[u], exact[u]).size / args.k for u in range(args.users)])
        rows[name] = {"ms_per_user": 1e3 * s / args.users, "overlap@k": float(overlap),
                      "speedup_vs_exact": exact_s / s}
        log.info("%s: %.3f ms/user, overlap@%d %.4f", name, 1e3 * s / args.users, args.k, overlap)
    result = {"items": args.items, "users": args.users, "dim": args.dim, "k": args.k, "batch": args.batch,
              "train_items_per_user": args.train_items, "ivf_build_s": round(build_s, 1),
              "bundle_load_s": round(load_s, 2), "methods": rows,
              "command": "python -m benchmarks.bench_serving " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    write_json(args.json, result)
    log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
