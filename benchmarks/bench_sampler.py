"""Neighbour-sampling throughput: ours (``goat_dist.sampling.NeighborSampler``) against PyG's
``torch_geometric.sampler.NeighborSampler`` backed by torch-sparse (``make bench-deps``), same graph,
same seed batches, same process.

Case ``homogeneous``: a seeded power-law graph (default 1,000,000 nodes, 20,000,000 edges; both
endpoints drawn as ``floor(n * u**3)`` through a random relabelling, so degrees follow a Zipf-like
law with hubs of ~10^4 neighbours), batches of 1,024 uniformly drawn seeds, fanouts [10, 10], both
samplers without replacement. Throughput = sampled edges (all hops) / wall seconds, median over
repeats. Our blocks re-sample the seeds at hop 2 (every destination node of a block gets a sample,
as exact L-layer propagation needs), so we sample slightly more edges per batch than PyG does;
both counts are reported.

Ours runs with one intra-op thread (the headline; PyG's sampler is single-threaded C++ too) and
again with the default thread count. On a shared machine, compare numbers from one run only.

Case ``hetero`` (ours only; PyG has no torch-sparse hetero path here we could compare like for like):
user-item in both directions plus an item-item kNN relation, seeds = 1,024 users + 1,024 items.

    goat bench sampler [--json FILE] [--quick] [--repeats N] [--batches N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import RESULTS_DIR, append_result_row, machine_info, plot_bars, write_json
from goat_dist.graph.csr import CSR
from goat_dist.log import get_logger
from goat_dist.sampling.blocks import ITEM, ITEM_TO_USER, USER, USER_TO_ITEM, item_item_relation
from goat_dist.sampling.neighbor import NeighborSampler

log = get_logger(__name__)
REL = ("node", "to", "node")


def power_law_ids(n: int, m: int, g: torch.Generator, exponent: float = 3.0) -> torch.Tensor:
    """``m`` ids in ``[0, n)`` with a power-law popularity (rank r drawn with density ~ r^(1/e - 1)),
    scattered over the id range by a random permutation."""
    perm = torch.randperm(n, generator=g)
    u = torch.rand(m, generator=g, dtype=torch.float64)
    return perm[(u.pow(exponent) * n).to(torch.int64).clamp_(max=n - 1)]


def power_law_csr(n_rows: int, n_cols: int, n_edges: int, seed: int) -> CSR:
    g = torch.Generator().manual_seed(seed)
    rows = power_law_ids(n_rows, n_edges, g)
    cols = power_law_ids(n_cols, n_edges, g)
    return CSR.from_edges(rows, cols, n_rows, n_cols)


def knn_csr(n: int, k: int, seed: int) -> CSR:
    """A kNN-like graph: every row has exactly ``k`` distinct random neighbours (plus duplicates merged)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(n).repeat_interleave(k)
    cols = torch.randint(0, n, (n * k,), generator=g)
    return CSR.from_edges(rows, cols, n, n, torch.rand(n * k, generator=g))


def seed_batches(n: int, batch: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:batch] for _ in range(count)]


def edges_of(sg) -> int:
    return sum(int(ei.shape[1]) for b in sg.blocks for ei in b.edge_index.values())


class Runner:
    """One timed configuration: ``run()`` samples every seed batch once and returns the edge count."""

    def __init__(self, name: str, run, threads: int | None = None, device: str = "cpu") -> None:
        self.name, self.run, self.threads, self.device = name, run, threads, device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.edges: list[int] = []

    def once(self, record: bool = True) -> None:
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            w0, c0 = time.perf_counter(), time.thread_time()
            edges = self.run()
            if self.device == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        finally:
            torch.set_num_threads(before)
        if record:
            self.wall.append(wall)
            self.cpu.append(cpu)
            self.edges.append(edges)

    def summary(self, n_batches: int) -> dict:
        edges = statistics.mean(self.edges)
        wall, cpu = statistics.median(self.wall), statistics.median(self.cpu)
        return {"median_s": wall, "min_s": min(self.wall), "max_s": max(self.wall), "repeats": len(self.wall),
                "edges_per_batch": edges / n_batches, "ms_per_batch": 1e3 * wall / n_batches,
                "edges_per_s": edges / wall, "median_thread_cpu_s": cpu, "cpu_edges_per_s": edges / cpu,
                "threads": self.threads}


def interleaved(runners: list[Runner], repeats: int) -> None:
    """Warm up each runner, then time them in turn, ``repeats`` rounds: on a shared machine every
    configuration sees the same mix of load (``harness.time_fn`` would time them back to back)."""
    for r in runners:
        r.once(record=False)
    for _ in range(repeats):
        for r in runners:
            r.once()


def ours_runner(name: str, sampler: NeighborSampler, seeds: list[dict], device: str, threads: int | None
                ) -> Runner:
    g = torch.Generator(device=device)
    g.manual_seed(0)

    def run() -> int:
        return sum(edges_of(sampler.sample(s, g)) for s in seeds)

    return Runner(name, run, threads, device)


def pyg_runner(csr: CSR, seeds: list[torch.Tensor], fanouts: list[int]) -> tuple[Runner | None, dict]:
    """PyG's NeighborSampler on the same graph, or ``(None, {"available": False, "reason"})``."""
    try:
        import torch_geometric.typing as pyg_typing
        from torch_geometric.data import Data
        from torch_geometric.sampler import NeighborSampler as PygNeighborSampler
        from torch_geometric.sampler import NodeSamplerInput
    except Exception as exc:  # pragma: no cover - torch_geometric is a dependency
        return None, {"available": False, "reason": f"torch_geometric not importable: {exc}"}
    if pyg_typing.WITH_PYG_LIB:
        backend = "pyg-lib"
    elif pyg_typing.WITH_TORCH_SPARSE:
        backend = "torch-sparse"
    else:
        return None, {"available": False, "reason": "neither pyg-lib nor torch-sparse is importable "
                                                    "(run `make bench-deps` to build torch-sparse)"}
    # PyG's edge_index is [src; dst] and it samples each seed's incoming edges: our CSR row = dst.
    dst = torch.searchsorted(csr.indptr, torch.arange(csr.nnz), right=True) - 1
    data = Data(edge_index=torch.stack([csr.indices.to(torch.int64), dst]), num_nodes=csr.n_rows)
    t0 = time.perf_counter()
    sampler = PygNeighborSampler(data, num_neighbors=fanouts, replace=False)
    build_s = time.perf_counter() - t0
    del data, dst

    def run() -> int:
        return sum(int(sampler.sample_from_nodes(NodeSamplerInput(input_id=None, node=s)).row.numel())
                   for s in seeds)

    # torch-sparse's sampler is single-threaded C++; 1 thread keeps its small torch ops off OpenMP too.
    return Runner("pyg", run, 1), {"available": True, "backend": backend, "build_s": build_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="goat bench sampler", description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(RESULTS_DIR / "bench_sampler.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: next to --json)")
    p.add_argument("--quick", action="store_true", help="small graph (50k nodes, 1M edges), no results row")
    p.add_argument("--nodes", type=int, default=None)
    p.add_argument("--edges", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--fanouts", type=int, nargs="+", default=[10, 10])
    p.add_argument("--batches", type=int, default=20, help="batches per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    n = args.nodes or (50_000 if args.quick else 1_000_000)
    m = args.edges or (1_000_000 if args.quick else 20_000_000)
    dev = args.device
    machine = machine_info()
    log.info("building power-law graph: %d nodes, %d edges (seed %d)", n, m, args.seed)
    t0 = time.perf_counter()
    csr = power_law_csr(n, n, m, args.seed)
    build_s = time.perf_counter() - t0
    deg = csr.degrees()
    seeds = seed_batches(n, args.batch_size, args.batches, args.seed + 1)

    ours_sampler = NeighborSampler({REL: csr.to(dev)}, {REL: list(args.fanouts)})
    ours_seeds = [{"node": s.to(dev)} for s in seeds]
    threads = torch.get_num_threads()
    # Headline: one intra-op thread, like PyG's single-threaded C++ sampler and like a DataLoader
    # worker (PyTorch sets 1 thread there); the default thread count is timed beside it.
    runners = [ours_runner("ours", ours_sampler, ours_seeds, dev, 1 if dev == "cpu" else None)]
    if dev == "cpu" and threads > 1:
        runners.append(ours_runner("ours_mt", ours_sampler, ours_seeds, dev, threads))
    base: dict = {"available": False, "reason": "--no-baseline"}
    if not args.no_baseline:
        pyg, base = pyg_runner(csr, seeds, list(args.fanouts))
        if pyg is not None:
            runners.append(pyg)
    log.info("timing %s: %d rounds of %d batches", [r.name for r in runners], args.repeats, args.batches)
    interleaved(runners, args.repeats)
    res = {r.name: r.summary(len(seeds)) for r in runners}
    ours, ours_mt = res["ours"], res.get("ours_mt")
    if "pyg" in res:
        base.update(res["pyg"])
    base_eps = base.get("edges_per_s")
    ratio = (ours["edges_per_s"] / base_eps) if base_eps else None
    ratio_cpu = (ours["cpu_edges_per_s"] / base["cpu_edges_per_s"]) if base_eps else None

    # Heterogeneous three-relation case (ours only).
    n_users, n_items = (30_000, 20_000) if args.quick else (600_000, 400_000)
    m_ui = m // 2
    ui = power_law_csr(n_users, n_items, m_ui, args.seed + 2)
    ii = knn_csr(n_items, 10, args.seed + 3)
    rel_ii = item_item_relation("image")
    graphs = {ITEM_TO_USER: ui, USER_TO_ITEM: ui.transpose(), rel_ii: ii}
    hetero_sampler = NeighborSampler({r: c.to(dev) for r, c in graphs.items()},
                                     {r: list(args.fanouts) for r in graphs})
    hseeds = [{USER: u.to(dev), ITEM: i.to(dev)} for u, i in
              zip(seed_batches(n_users, args.batch_size, args.batches, args.seed + 4),
                  seed_batches(n_items, args.batch_size, args.batches, args.seed + 5))]
    h = ours_runner("hetero", hetero_sampler, hseeds, dev, 1 if dev == "cpu" else None)
    interleaved([h], args.repeats)
    hetero = h.summary(len(hseeds))

    payload = {
        "benchmark": "sampler",
        "ours_edges_per_s": ours["edges_per_s"],
        "baseline": (f"torch_geometric.sampler.NeighborSampler ({base['backend']})" if base["available"]
                     else f"unavailable: {base['reason']}"),
        "baseline_edges_per_s": base_eps,
        "ratio": ratio,
        "ratio_thread_cpu": ratio_cpu,
        "hetero_edges_per_s": hetero["edges_per_s"],
        "ours_threads": 1 if dev == "cpu" else None,
        "ours_default_threads_edges_per_s": None if ours_mt is None else ours_mt["edges_per_s"],
        "default_threads": threads,
        "load_average": list(os.getloadavg()),
        "machine": machine,
        "inputs": {"nodes": n, "edges": m, "nnz_after_dedup": csr.nnz, "max_degree": int(deg.max()),
                   "mean_degree": float(deg.float().mean()), "batch_size": args.batch_size,
                   "fanouts": list(args.fanouts), "batches_per_repeat": args.batches, "repeats": args.repeats,
                   "device": dev, "seed": args.seed, "graph_build_s": build_s, "quick": args.quick,
                   "hetero": {"users": n_users, "items": n_items, "user_item_edges": ui.nnz,
                              "item_item_edges": ii.nnz, "relations": [list(r) for r in graphs],
                              "seeds": {"user": args.batch_size, "item": args.batch_size}}},
        "ours": ours, "ours_default_threads": ours_mt, "baseline_detail": base, "hetero": hetero,
    }
    out = write_json(args.json, payload)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    labels = ["ours (1 thread)" if dev == "cpu" else "ours (cuda)"] + ([f"ours ({threads} threads)"] if ours_mt else []) \
        + (["PyG+" + base["backend"]] if base_eps else []) + ["ours hetero (3 rel.)"]
    values = [ours["edges_per_s"] / 1e6] + ([ours_mt["edges_per_s"] / 1e6] if ours_mt else []) \
        + ([base_eps / 1e6] if base_eps else []) + [hetero["edges_per_s"] / 1e6]
    plot_bars(plot_path, labels, values, ylabel="M sampled edges / s",
              title=f"Neighbour sampling, {n:,} nodes / {m:,} edges, batch {args.batch_size}, "
                    f"fanouts {args.fanouts} ({dev})")
    if not args.quick:
        case = f"{n // 1000}k nodes/{m // 10**6}M edges, {args.batch_size} seeds, {args.fanouts} ({dev})"
        append_result_row("sampler", case, f"{ours['edges_per_s'] / 1e6:.1f} M edges/s",
                          f"{base_eps / 1e6:.2f} M edges/s" if base_eps else "unavailable",
                          ratio if ratio is not None else float("nan"), machine)
        append_result_row("sampler", f"hetero 3 relations, {args.batch_size}+{args.batch_size} seeds, "
                          f"{args.fanouts} ({dev})", f"{hetero['edges_per_s'] / 1e6:.1f} M edges/s",
                          "n/a", float("nan"), machine)
    print(f"ours (1 thread): {ours['edges_per_s'] / 1e6:.2f} M edges/s ({ours['ms_per_batch']:.1f} ms/batch, "
          f"{ours['edges_per_batch']:.0f} edges/batch)")
    if ours_mt:
        print(f"ours, {threads} threads: {ours_mt['edges_per_s'] / 1e6:.2f} M edges/s")
    if base_eps:
        print(f"baseline {payload['baseline']}: {base_eps / 1e6:.2f} M edges/s ({base['ms_per_batch']:.1f} "
              f"ms/batch, {base['edges_per_batch']:.0f} edges/batch); ratio {ratio:.2f} "
              f"(thread-CPU-time ratio {ratio_cpu:.2f})")
    else:
        print(f"baseline {payload['baseline']}")
    print(f"hetero (3 relations): {hetero['edges_per_s'] / 1e6:.2f} M edges/s ({hetero['ms_per_batch']:.1f} ms/batch)")
    print(f"load average during the run: {payload['load_average']} on {machine['cores']} cores")
    print(f"wrote {out} and {plot_path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
