"""kNN graph backends at scale (issue #2): time, peak RSS and recall of one backend per invocation.

    python -m benchmarks.bench_knn --n 1000000 --d 64 --k 20 --backend ivf
    python -m benchmarks.bench_knn --n 100000 --d 64 --k 20 --backend faiss_flat

Input: ``N x d`` float16 standard gaussian rows (seeded). The timed part is the full
``knn_graph`` (search + symmetrised CSR with self-loops + exact cosine values); its search phase is
timed separately from the log-free ``faiss_topk``/``topk_neighbours`` call made first. Recall@k of an
approximate backend is measured against the EXACT top-k of ``--recall-queries`` sampled rows, found
by brute force (one GEMM of the sampled rows against all N rows, float32) -- no exact N x N run is
needed. One thread everywhere (faiss OpenMP and torch) unless ``--threads``: the machine is shared.
``--graph-only`` times one ``knn_graph`` call (search and CSR phases reported separately) instead.

Each invocation merges its entry (``runs[<backend>@<n>]``) into ``--out`` (a JSON file), so the
backends can run as separate processes under ``/usr/bin/time -v``.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS_DIR, machine_info
from goat_dist.graph.knn import IVFParams, faiss_topk, knn_graph, normalized_rows, resolve_backend
from goat_dist.log import get_logger, setup_logging

log = get_logger(__name__)


class PeakRSS:
    """Peak resident set size of this process: the kernel's high-water mark (VmHWM), plus a sampler
    thread for the peak of a phase (VmRSS maxima since ``reset``)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.phase_peak, self._stop = interval_s, 0, threading.Event()
        self.phase_peak_split: dict[str, int] = {}  # RssAnon / RssFile / RssShmem at the phase peak
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _sample(keys: tuple[str, ...] = ("VmRSS", "RssAnon", "RssFile", "RssShmem")) -> dict[str, int]:
        """Bytes of the given /proc/self/status fields."""
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in keys:
                out[key] = int(line.split()[1]) * 1024
        return out

    def _take(self) -> None:
        s = self._sample()
        if s.get("VmRSS", 0) >= self.phase_peak:
            self.phase_peak = s.get("VmRSS", 0)
            self.phase_peak_split = {k: v for k, v in s.items() if k != "VmRSS"}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            time.sleep(self.interval_s)

    def reset(self) -> None:
        self.phase_peak = 0
        self._take()

    def hwm(self) -> int:
        return self._sample(("VmHWM",)).get("VmHWM", 0)

    def stop(self) -> None:
        self._stop.set()


def gaussian_f16(n: int, d: int, seed: int) -> np.ndarray:
    """[n, d] float16 N(0, 1), generated in row blocks (float32 temporaries stay small)."""
    out = np.empty((n, d), np.float16)
    rng = np.random.default_rng(seed)
    for s in range(0, n, 1 << 18):
        e = min(n, s + (1 << 18))
        out[s:e] = rng.standard_normal((e - s, d), dtype=np.float32)
    return out


def exact_topk_rows(f: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact cosine top-k (self excluded) of the given rows against all rows, brute force.

    **Shape:** [len(rows), k] int64 (ties at the k-th place are irrelevant for continuous data)."""
    n = f.shape[0]
    q = normalized_rows(f[rows], "cpu")
    best_v = torch.full((len(rows), k), -float("inf"))
    best_i = torch.zeros((len(rows), k), dtype=torch.int64)
    step = 1 << 17
    for s in range(0, n, step):
        e = min(n, s + step)
        sim = q @ normalized_rows(f[s:e], "cpu", row_offset=s).T
        own = (torch.from_numpy(rows) >= s) & (torch.from_numpy(rows) < e)
        sim[own.nonzero().flatten(), torch.from_numpy(rows)[own] - s] = -float("inf")
        v = torch.cat([best_v, sim], 1)
        i = torch.cat([best_i, torch.arange(s, e).expand(len(rows), -1)], 1)
        top = torch.topk(v, k, dim=1)
        best_v, best_i = top.values, i.gather(1, top.indices)
    return best_i.numpy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--backend", default="ivf", choices=["exact", "faiss_flat", "ivf"])
    ap.add_argument("--nlist", type=int, default=0, help="ivf lists (0 = round(4 sqrt(N)))")
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--quantizer", default="flat", choices=["flat", "hnsw"])
    ap.add_argument("--codec", default="Flat", choices=["Flat", "SQfp16"])
    ap.add_argument("--recall-queries", type=int, default=2000)
    ap.add_argument("--search-only", action="store_true", help="time the top-k search, skip the graph build")
    ap.add_argument("--graph-only", action="store_true", help="one timed knn_graph call (its search and CSR "
                    "phases reported separately) instead of a separate search first; recall = share of the "
                    "brute-force top-k present in the graph's rows (for hours-long exact runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1 on a shared machine)")
    ap.add_argument("--input", default="", help="an [N, d] .npy (memory-mapped; its first --n rows) instead of "
                    "gaussian rows, e.g. the synthetic user profiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR / "knn_1m.json"))
    args = ap.parse_args(argv)
    setup_logging()
    if args.search_only and args.graph_only:
        ap.error("--search-only and --graph-only exclude each other")
    torch.set_num_threads(args.threads)
    rss = PeakRSS()
    backend = resolve_backend(args.backend, args.n)
    ivf = IVFParams(nlist=args.nlist, nprobe=args.nprobe, quantizer=args.quantizer, codec=args.codec)
    load = os.getloadavg()

    t0 = time.perf_counter()
    if args.input:
        f = np.load(args.input, mmap_mode="r")[:args.n]
        args.n, args.d = int(f.shape[0]), int(f.shape[1])
    else:
        f = gaussian_f16(args.n, args.d, args.seed)
    t_gen = time.perf_counter() - t0
    log.info("input %d x %d %s in %.1fs", args.n, args.d, args.input or "float16 gaussian", t_gen)

    rng = np.random.default_rng(args.seed + 1)
    q = np.sort(rng.choice(args.n, size=min(args.recall_queries, args.n), replace=False))
    graph_s = graph_nnz = csr_s = None
    if args.graph_only:
        rss.reset()
        t0 = time.perf_counter()
        phases: dict = {}
        g = knn_graph(f, args.k, backend=backend, ivf=ivf, device="cpu", threads=args.threads, timings=phases)
        graph_s = time.perf_counter() - t0
        t_search, csr_s, search_peak, graph_nnz = phases["search_s"], phases["graph_s"], rss.phase_peak, g.nnz
        rows = [set(g.indices[g.indptr[i]:g.indptr[i + 1]].tolist()) - {int(i)} for i in q]
        del g
    else:
        rss.reset()
        t0 = time.perf_counter()
        if backend == "exact":
            from goat_dist.graph.knn import GROUP, topk_neighbours

            x = normalized_rows(f, "cpu", pad_to=GROUP)
            cols, _ = topk_neighbours(x, args.n, args.k)
            del x
        else:
            cols, _ = faiss_topk(f, args.k, backend=backend, ivf=ivf, threads=args.threads)
        t_search = time.perf_counter() - t0
        search_peak = rss.phase_peak
        rows = [set(r[r >= 0].tolist()) for r in cols[torch.from_numpy(q)].long().numpy()]
        del cols
    log.info("%s search: %.1fs", backend, t_search)

    t0 = time.perf_counter()
    exact = exact_topk_rows(f, q, args.k)
    t_ref = time.perf_counter() - t0
    hits = sum(len(a & set(b.tolist())) for a, b in zip(rows, exact))
    recall = hits / (len(q) * args.k)
    log.info("recall@%d over %d sampled rows: %.4f (brute-force reference %.1fs)", args.k, len(q), recall, t_ref)

    if not args.search_only and not args.graph_only:
        rss.reset()
        t0 = time.perf_counter()
        g = knn_graph(f, args.k, backend=backend, ivf=ivf, device="cpu", threads=args.threads)
        graph_s = time.perf_counter() - t0
        graph_nnz = g.nnz
        del g
    entry = {
        "backend": backend, "n": args.n, "d": args.d, "k": args.k, "dtype": str(f.dtype),
        "input": f"first {args.n} rows of {args.input}" if args.input else "gaussian N(0,1)",
        "ivf": ivf.key(args.n) if backend == "ivf" else None,
        "search_seconds": round(t_search, 2), "search_ms_per_row": round(1e3 * t_search / args.n, 4),
        "search_peak_rss_gb": round(search_peak / 2**30, 3),
        "knn_graph_seconds": None if graph_s is None else round(graph_s, 2),
        "knn_graph_nnz": graph_nnz, "csr_build_seconds": None if csr_s is None else round(csr_s, 2),
        "recall_at_k": round(recall, 4), "recall_queries": len(q), "recall_reference": "brute-force exact top-k",
        "peak_rss_gb": round(rss.hwm() / 2**30, 3), "threads": args.threads,
        "mode": "graph-only" if args.graph_only else ("search-only" if args.search_only else "search, then graph"),
        "load_average_start": [round(v, 2) for v in load],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "command": "python -m benchmarks.bench_knn " + " ".join(argv if argv is not None else os.sys.argv[1:]),
    }
    rss.stop()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["machine"] = machine_info()
    name = f"{backend}@{args.n}" + (f"/nprobe{args.nprobe}" if backend == "ivf" else "") + \
        (f"/{Path(args.input).stem}" if args.input else "")
    doc.setdefault("runs", {})[name] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    log.info("wrote %s: %s", out, json.dumps(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
