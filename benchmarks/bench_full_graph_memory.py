"""Peak memory of full-graph LightGCN: the memory-lean ``full_graph_lightgcn`` against the previous
implementation (kept below, verbatim, as ``previous_full_graph_lightgcn``), on a synthetic uniform
random graph. Modes: ``previous``, ``lean`` (all users), ``lean_user_subset`` (``user_ids=``: one
[n_users, d] layer buffer) and ``streamed_user_subset`` (``user_ids=, stream_users=True``: none).

    .venv/bin/python -m benchmarks.bench_full_graph_memory --users 2000000 --items 200000 --edges 20000000

The graph (both CSRs with LightGCN weights) and the two ID tables are built once and saved; each
contender then runs in its own fresh process that loads them, records its RSS (``baseline``), runs
the pass and reports ``ru_maxrss`` (peak) and ``extra = peak - baseline``. The outputs are compared
(max abs difference) in the parent. Writes ``benchmarks/results/full_graph_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import RESULTS_DIR, machine_info
from goat_dist.graph.csr import CSR
from goat_dist.model.lightgcn import csr_norm_values, full_graph_lightgcn


def previous_csr_spmm(csr: CSR, h, chunk_size: int = 65536, values=None):
    """``csr_spmm`` before the memory-lean change (commit 6616f74)."""
    vals = csr_norm_values(csr) if values is None else values
    out = h.new_zeros((csr.n_rows, h.shape[1]))
    indptr = csr.indptr
    for r0 in range(0, csr.n_rows, chunk_size):
        r1 = min(r0 + chunk_size, csr.n_rows)
        e0, e1 = int(indptr[r0]), int(indptr[r1])
        if e1 == e0:
            continue
        cols = csr.indices[e0:e1].to(torch.int64).to(h.device)
        crow = (indptr[r0:r1 + 1] - e0).to(h.device)
        a = torch.sparse_csr_tensor(crow, cols, vals[e0:e1].to(h.device, h.dtype), (r1 - r0, csr.n_cols),
                                    check_invariants=False)
        out[r0:r1] = a @ h
    return out


def previous_full_graph_lightgcn(user_items, item_users, lookup, num_layers, dim, device="cpu", chunk_size=65536):
    """``full_graph_lightgcn`` before the memory-lean change (commit 6616f74)."""
    n_users, n_items = user_items.n_rows, item_users.n_rows

    def table(node_type, n):
        out = torch.empty((n, dim), device=device)
        for s in range(0, n, chunk_size):
            ids = torch.arange(s, min(s + chunk_size, n), device=device)
            out[s:s + ids.numel()] = lookup(node_type, ids).to(out.dtype)
        return out

    h_u, h_i = table("user", n_users), table("item", n_items)
    vu, vi = csr_norm_values(user_items), csr_norm_values(item_users)
    acc_u, acc_i = h_u.clone(), h_i.clone()
    for _ in range(num_layers):
        h_u, h_i = previous_csr_spmm(user_items, h_i, chunk_size, vu), previous_csr_spmm(item_users, h_u, chunk_size, vi)
        acc_u += h_u
        acc_i += h_i
    return acc_u / (num_layers + 1), acc_i / (num_layers + 1)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(mode: str, data_dir: str, layers: int, user_sample: int, out_path: str) -> None:
    """Child process: load graph + tables, run one contender, write its figures and outputs."""
    torch.set_num_threads(1)
    with torch.serialization.safe_globals([CSR]):  # graph.pt holds CSR objects; nothing else may unpickle
        d = torch.load(Path(data_dir) / "graph.pt", weights_only=True)
    ui, iu, tu, ti = d["ui"], d["iu"], d["table_u"], d["table_i"]
    lookup = lambda t, ids: (tu if t == "user" else ti).index_select(0, ids)  # noqa: E731
    users = torch.randperm(ui.n_rows, generator=torch.Generator().manual_seed(0))[:user_sample].sort().values
    base = _rss_bytes()
    t0 = time.perf_counter()
    if mode == "previous":
        u, i = previous_full_graph_lightgcn(ui, iu, lookup, layers, tu.shape[1])
        u = u[users]
    elif mode == "lean":
        u, i = full_graph_lightgcn(ui, iu, lookup, layers, tu.shape[1])
        u = u[users]
    elif mode == "lean_user_subset":
        u, i = full_graph_lightgcn(ui, iu, lookup, layers, tu.shape[1], user_ids=users)
    elif mode == "streamed_user_subset":
        u, i = full_graph_lightgcn(ui, iu, lookup, layers, tu.shape[1], user_ids=users, stream_users=True)
    else:
        raise ValueError(mode)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"mode": mode, "baseline_rss_gb": base / 1e9, "peak_rss_gb": peak / 1e9,
                "extra_gb": (peak - base) / 1e9, "wall_s": round(wall, 1), "users": u, "items": i}, out_path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=2_000_000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--edges", type=int, default=20_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--user-sample", type=int, default=100_000)
    p.add_argument("--out", default=str(RESULTS_DIR / "full_graph_memory.json"))
    p.add_argument("--child", nargs=3, metavar=("MODE", "DATA_DIR", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        run_one(a.child[0], a.child[1], a.layers, a.user_sample, a.child[2])
        return
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fg_mem_") as tmp:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        u = rng.integers(0, a.users, a.edges, dtype=np.int64).astype(np.int32)
        i = rng.integers(0, a.items, a.edges, dtype=np.int64).astype(np.int32)
        ui = CSR.from_edges(u, i, a.users, a.items)
        iu = CSR.from_edges(i, u, a.items, a.users)
        del u, i
        ui.values, iu.values = csr_norm_values(ui), csr_norm_values(iu)
        g = torch.Generator().manual_seed(0)
        torch.save({"ui": ui, "iu": iu, "table_u": torch.randn(a.users, a.dim, generator=g) * 0.1,
                    "table_i": torch.randn(a.items, a.dim, generator=g) * 0.1}, Path(tmp) / "graph.pt")
        n_edges = int(ui.indptr[-1])
        del ui, iu
        build_s = time.perf_counter() - t0
        res = {}
        for mode in ("previous", "lean", "lean_user_subset", "streamed_user_subset"):
            out = str(Path(tmp) / f"{mode}.pt")
            subprocess.run([sys.executable, "-m", "benchmarks.bench_full_graph_memory", "--layers", str(a.layers),
                            "--user-sample", str(a.user_sample), "--child", mode, tmp, out], check=True)
            res[mode] = torch.load(out, weights_only=True)
            os.unlink(out)
    ref = res["previous"]
    table_gb = (a.users + a.items) * a.dim * 4 / 1e9
    report = {"benchmark": "full_graph_memory", "users": a.users, "items": a.items, "edges_distinct": n_edges,
              "dim": a.dim, "layers": a.layers, "user_sample": a.user_sample, "graph_build_s": round(build_s, 1),
              "one_table_gb": round(table_gb, 3), "load_avg": os.getloadavg(), "machine": machine_info(), "results": {}}
    for mode, r in res.items():
        err_u = float((r["users"] - ref["users"]).abs().max())
        err_i = float((r["items"] - ref["items"]).abs().max())
        report["results"][mode] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                   if k not in ("users", "items", "mode")}
        report["results"][mode].update(max_abs_diff_vs_previous=max(err_u, err_i),
                                       extra_in_tables=round(r["extra_gb"] / table_gb, 2))
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=2))


if __name__ == "__main__":
    main()
