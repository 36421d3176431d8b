"""End-to-end training throughput of RecGOAT with a step-time breakdown and peak RSS per rank.

Cases: synthetic datasets (two item modalities + user profiles, ``goat_dist.data.synth.generate``)
of 1M and 10M interactions (``--sizes``; ``100m`` and ``200m`` read the scale datasets and their graph
cache read-only with the scale run's config ``configs/scale_200m.yaml`` -- 2 LightGCN layers,
fanouts [10, 5] --, only when the folder holds ``READY``; see ``EXTERNAL``), each trained by

- ``Trainer`` (world size 1, the single-process engine),
- ``DistributedTrainer`` at world size 1 and 2 (torchrun, gloo, TorchRec row-wise tables, DeepSpeed
  ZeRO-2 for the dense parameters),

built from ``configs/synthetic.yaml`` plus the case's overrides. Each case runs in fresh processes:
``--warmup`` steps, then ``--steps`` measured steps. A ``prepare`` process generates the data and
builds the graph cache first, so the measured processes only read them (their peak RSS is training's).

Phases, timed synchronously from the OUTSIDE (the library is not modified; the wrappers are
installed on the built trainer's instances and on ``goat_dist.model.recgoat.InfoNCE``):

    sampling     time for the loader to hand out the next batch (in-process sampling, num_workers 0)
    lookup       forward pre/post hooks on ``model.id_emb`` (TorchRec lookup, incl. its all-to-alls)
    ot           ``model.fusion._solve`` (cost from statistics + batched Sinkhorn; ``forward`` calls
                 ``_solve``, not ``solve``)
    infonce      forward of every InfoNCE term ``compute_loss`` computes (incl. its all-gathers)
    optimiser    ``engine.step`` (DeepSpeed: ZeRO all-gather + update) / the torch optimisers' ``step``
    dense_fwd_bwd  the rest of ``train_step``: GAT/LightGCN/fusion forward, BPR, and the WHOLE backward
                 (incl. the embedding-gradient all-to-all and TorchRec's fused table update, the
                 InfoNCE backward and DeepSpeed's gradient all-reduce)

Throughput: global triples per step / median step wall (sampling + train_step; at world size 2 the
slower rank's wall per step). Sampled edges/s: edges of all the batch's blocks (user-item,
item-item, user-user) summed over ranks / the same wall. Ratios (same run): world size 2 vs 1
(DistributedTrainer; ideal 2.0 — two ranks share this machine's 2 contended cores) and, for the
smallest size, fanouts vs full neighbourhood (``sampling.fanouts=-1``, Trainer).

    goat bench train [--quick] [--sizes 1m,10m] [--steps 20] [--warmup 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR, append_result_row, machine_info, plot_stacked, write_json
from goat_dist.log import get_logger, setup_logging

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT / "data" / "bench"
SIZES: dict[str, dict[str, int]] = {
    "quick": {"users": 4000, "items": 1500, "interactions": 100_000},
    "1m": {"users": 50_000, "items": 10_000, "interactions": 1_000_000},
    "10m": {"users": 100_000, "items": 20_000, "interactions": 10_000_000},
}
SYNTH = {"modalities": {"image": 64, "text": 48}, "user_profiles": 32, "seed": 0}
SCALE_PLAN = [("single", 1), ("dist", 1), ("dist", 2)]
EXTERNAL: dict[str, dict[str, Any]] = {
    # goat data synth --users 10000000 --items 1000000 --interactions 100000000 --out /work/scale/synth100m \
    #     --modalities image:64,text:64 --user-profiles 64
    "100m": {"path": Path("/work/scale/synth100m"), "config": "configs/scale_200m.yaml", "plan": SCALE_PLAN},
    "200m": {"path": Path("/work/scale/synth200m"), "config": "configs/scale_200m.yaml", "plan": SCALE_PLAN}}
"""Datasets made for the scale run (read-only; used when ``READY`` exists in the folder), the config
whose graph settings and cache they were built with (``data.path`` set to the folder), and the
(trainer, world size) cases run on them."""
BASE_CONFIG = "configs/synthetic.yaml"
PHASES = ("sampling", "lookup", "dense_fwd_bwd", "ot", "infonce", "optimiser")


# ------------------------------------------------------------------------------------------------
# Config of a case

def case_overrides(size: str, data_path: Path, cache_dir: Path | None, batch: int, extra: list[str]) -> list[str]:
    synth = {**SIZES.get(size, {}), **SYNTH}
    sets = [f"data.path={data_path}"] + ([f"graph.cache_dir={cache_dir}"] if cache_dir else []) + [
            f"train.batch_size={batch}",
            "train.num_threads=1", "train.epochs=1000", "log.tensorboard=false", "log.every_steps=1000000",
            "sampling.num_workers=0", "dist.backend=gloo"]
    if size in SIZES:
        sets += ["data.generate_if_missing=true", "data.synth=" + json.dumps(synth)]
    return sets + list(extra)


def dataset_for(size: str) -> tuple[Path, Path | None] | None:
    """(data folder, graph cache dir or None = the config's) of a size; None when an external
    dataset is not ready."""
    if size in SIZES:
        return DATA_ROOT / f"synth{size}", DATA_ROOT / "cache"
    ext = EXTERNAL.get(size)
    if ext is None:
        raise ValueError(f"unknown size {size!r} (have {', '.join([*SIZES, *EXTERNAL])})")
    if not (ext["path"] / "READY").exists():
        return None
    return ext["path"], None


# ------------------------------------------------------------------------------------------------
# Worker side: one rank of one case

def _rss_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out.get("VmRSS", float("nan")), "peak_rss_mb": out.get("VmHWM", float("nan"))}


class PhaseTimer:
    """Accumulates wall seconds per phase for the current step (synchronous CPU timing)."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def reset(self) -> None:
        self.acc = {}

    def add(self, phase: str, seconds: float) -> None:
        self.acc[phase] = self.acc.get(phase, 0.0) + seconds

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t0)
        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def hook_module(self, module, phase: str) -> list:
        """Time ``module``'s forward under ``phase``; returns the hooks' removers."""
        pre = module.register_forward_pre_hook(lambda *_: self._start.__setitem__(phase, time.perf_counter()))
        post = module.register_forward_hook(lambda *_: self.add(phase, time.perf_counter() - self._start.pop(phase)))
        return [pre.remove, post.remove]


def instrument(trainer, timer: PhaseTimer):
    """Install the phase timers on a built (Distributed)Trainer (see the module docstring).
    Returns ``undo()``, which removes every hook and wrapper again."""
    import goat_dist.model.recgoat as recgoat_mod

    undo: list = []
    model = trainer.model
    undo += timer.hook_module(model.id_emb, "lookup")
    fusion = model.fusion
    if hasattr(fusion, "_solve"):
        fusion._solve = timer.wrap("ot", fusion._solve)
        undo.append(lambda: fusion.__dict__.pop("_solve", None))
    base = recgoat_mod.InfoNCE

    class TimedInfoNCE(base):  # the name compute_loss looks up at call time
        def forward(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return super().forward(*args, **kwargs)
            finally:
                timer.add("infonce", time.perf_counter() - t0)

    recgoat_mod.InfoNCE = TimedInfoNCE
    undo.append(lambda: setattr(recgoat_mod, "InfoNCE", base))
    owners = [getattr(trainer, "engine", None), getattr(trainer, "sparse_opt", None), getattr(trainer, "dense_opt", None)]
    for owner in owners:
        if owner is not None:
            owner.step = timer.wrap("optimiser", owner.step)
            undo.append(lambda o=owner: o.__dict__.pop("step", None))

    def remove() -> None:
        for fn in reversed(undo):
            fn()
    return remove


def batch_stats(batch) -> dict[str, Any]:
    edges = 0
    subs = [batch.ui, *batch.item_item.values(), batch.user_user]
    for sg in subs:
        if sg is not None:
            edges += sum(int(ei.shape[1]) for b in sg.blocks for ei in b.edge_index.values())
    src = batch.ui.blocks[0].src_nodes if batch.ui is not None and batch.ui.blocks else {
        "user": batch.unique_users, "item": batch.unique_items}
    return {"triples": int(batch.users.numel()), "edges": edges, "unique_users": int(batch.unique_users.numel()),
            "unique_items": int(batch.unique_items.numel()), "lookup_users": int(src["user"].numel()),
            "lookup_items": int(src["item"].numel()), "_src": src}


def comm_checks(trainer) -> dict[str, Any]:
    """Which optional collectives this build of the trainer runs (read from the code/engine, not
    measured): the all-gather of non-finite loss flags, DeepSpeed's overflow all-reduce."""
    from goat_dist.engine.distributed import DistributedTrainer

    engine = getattr(trainer, "engine", None)
    return {"nonfinite_flags": "_nonfinite_flags" in DistributedTrainer.__dict__,
            "zero_overflow_check": bool(getattr(getattr(engine, "optimizer", None), "check_grad_overflow", False))}


def worker(args: argparse.Namespace) -> int:
    """One rank: build, instrument, warm up, measure; write ``<out>/rank<r>.json``."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.config import load_config

    cfg = load_config(str(ROOT / args.config), args.set or [])
    t0 = time.perf_counter()
    if args.trainer == "prepare":
        from goat_dist.engine.trainer import Trainer

        tr = Trainer(cfg, Path(args.out) / "run")
        tr._build_inputs()
        res = {"trainer": "prepare", "rank": 0, "world_size": 1, "build_s": time.perf_counter() - t0,
               "n_users": tr.dataset.n_users, "n_items": tr.dataset.n_items, "n_train": len(tr.dataset.train),
               **_rss_mb()}
        Path(args.out, "rank0.json").write_text(json.dumps(res))
        return 0
    if args.trainer == "single":
        from goat_dist.engine.trainer import Trainer

        tr = Trainer(cfg, Path(args.out) / "run").build()
        rank, world = 0, 1
    else:
        from goat_dist.engine.distributed import DistributedTrainer

        tr = DistributedTrainer(cfg, Path(args.out) / "run").build()
        rank, world = tr.rank, tr.world_size
    build_s = time.perf_counter() - t0
    rss_build = _rss_mb()
    timer = PhaseTimer()
    instrument(tr, timer)
    meter_ctx = None
    if args.meter:
        from goat_dist.parallel.comm_meter import comm_meter
        meter_ctx = comm_meter()
    from goat_dist.parallel.cost_model import remote_fraction

    steps: list[dict[str, Any]] = []
    epoch, total = 0, args.warmup + args.steps
    meter = None
    while len(steps) < total:
        tr.loader.set_epoch(epoch)
        it = iter(tr.loader)
        while len(steps) < total:
            if len(steps) == args.warmup and meter_ctx is not None and meter is None:
                meter = meter_ctx.__enter__()
            timer.reset()
            ts = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            tsample = time.perf_counter() - ts
            t1 = time.perf_counter()
            parts = tr.train_step(batch)
            n_parts = len([k for k in (parts or {}) if k != "grad_norm"])
            tstep = time.perf_counter() - t1
            st = batch_stats(batch)
            src = st.pop("_src")
            if world > 1:
                st["remote_fraction"] = remote_fraction(src["user"], src["item"], tr.dataset.n_users,
                                                        tr.dataset.n_items, world, rank)
            ph = dict(timer.acc)
            named = sum(ph.get(p, 0.0) for p in ("lookup", "ot", "infonce", "optimiser"))
            steps.append({**st, "loss_parts": n_parts, "sampling": tsample, "train_step": tstep, "wall": tsample + tstep,
                          "dense_fwd_bwd": max(0.0, tstep - named),
                          **{p: ph.get(p, 0.0) for p in ("lookup", "ot", "infonce", "optimiser")}})
        epoch += 1
    if meter is not None:
        meter_ctx.__exit__(None, None, None)
    n_dense = (sum(p.numel() for p in tr.engine.module.parameters()) if getattr(tr, "engine", None) is not None
               else sum(p.numel() for g in tr.dense_opt.param_groups for p in g["params"]) if tr.dense_opt else 0)
    res = {"trainer": args.trainer, "rank": rank, "world_size": world, "build_s": build_s,
           "rss_after_build_mb": rss_build["rss_mb"], **_rss_mb(), "n_dense": n_dense,
           "n_users": tr.dataset.n_users, "n_items": tr.dataset.n_items, "n_train": len(tr.dataset.train),
           "warmup": args.warmup, "steps": steps[args.warmup:],
           "comm": None if meter is None else {"summary": meter.summary(args.steps), "records_per_step": len(
               meter.records) / args.steps}}
    if args.meter:
        from goat_dist.parallel.cost_model import expected_lookups
        from goat_dist.sampling.blocks import ITEM_TO_USER

        ui = tr.graphs.ui
        fan = list(tr.sampler.fanouts.get(ITEM_TO_USER, []))
        eu, ei = expected_lookups(cfg.train.batch_size, fan, ui.user_degree, ui.item_degree)
        res["expected_lookups"] = {"user_ids": eu, "item_ids": ei, "fanouts": fan}
        m = tr.model
        res["checks"] = comm_checks(tr)
        res["model"] = {"dim": m.dim, "n_modalities": len(m.modalities), "user_branch": m.use_user_branch,
                        "cmcl": cfg.loss.cmcl_weight > 0, "w_term": cfg.ot.w_weight > 0,
                        "oat_fusion": cfg.model.fusion == "oat",
                        "zero_stage": cfg.dist.zero_stage}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(res))
    tr.close()
    return 0


# ------------------------------------------------------------------------------------------------
# Parent side: launch cases, aggregate

def launch(trainer: str, world: int, sets: list[str], out: Path, steps: int, warmup: int, meter: bool = False,
           timeout: float = 3600.0, config: str = BASE_CONFIG) -> list[dict[str, Any]]:
    """Run one case in fresh processes (torchrun for the DistributedTrainer); return every rank's JSON."""
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    wargs = ["-m", "benchmarks.bench_train", "--worker", "--trainer", trainer, "--out", str(out),
             "--steps", str(steps), "--warmup", str(warmup), "--config", config] + (["--meter"] if meter else [])
    for s in sets:
        wargs += ["--set", s]
    if trainer == "dist":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] + wargs
    else:
        cmd = [sys.executable] + wargs
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with (out / "log.txt").open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = (out / "log.txt").read_text().splitlines()[-30:]
        raise RuntimeError(f"bench case {trainer} W={world} failed (exit {proc.returncode}); log {out/'log.txt'}:\n"
                           + "\n".join(tail))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    log.info("case %s W=%d done in %.0fs", trainer, world, time.perf_counter() - t0)
    return ranks


def summarise(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured steps; per-step wall = the slowest rank's."""
    W = len(ranks)
    n = min(len(r["steps"]) for r in ranks)
    wall = [max(r["steps"][k]["wall"] for r in ranks) for k in range(n)]
    triples = [sum(r["steps"][k]["triples"] for r in ranks) for k in range(n)]
    edges = [sum(r["steps"][k]["edges"] for r in ranks) for k in range(n)]
    med_wall = statistics.median(wall)
    breakdown = {p: statistics.median(statistics.median(s[p] for s in r["steps"]) for r in ranks) for p in PHASES}
    out = {"world_size": W, "steps": n, "step_wall_s": med_wall, "step_wall_min_s": min(wall),
           "step_wall_max_s": max(wall), "triples_per_step": statistics.median(triples),
           "triples_per_s": statistics.median(triples) / med_wall, "edges_per_step": statistics.median(edges),
           "sampled_edges_per_s": statistics.median(edges) / med_wall, "breakdown_s": breakdown,
           "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
           "rss_after_build_mb_per_rank": [round(r.get("rss_after_build_mb", float("nan")), 1) for r in ranks],
           "build_s_per_rank": [round(r["build_s"], 1) for r in ranks], "n_dense": ranks[0].get("n_dense"),
           "lookups_per_rank": [statistics.median(s["lookup_users"] + s["lookup_items"] for s in r["steps"])
                                for r in ranks],
           "n_users": ranks[0]["n_users"], "n_items": ranks[0]["n_items"], "n_train": ranks[0]["n_train"]}
    return out


def run_size(size: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    where = dataset_for(size)
    if where is None:
        log.warning("size %s: %s/READY does not exist yet: skipped", size, EXTERNAL[size]["path"])
        return [{"size": size, "skipped": f"{EXTERNAL[size]['path']}/READY missing"}]
    data, cache = where
    config = EXTERNAL[size]["config"] if size in EXTERNAL else BASE_CONFIG
    sets = case_overrides(size, data, cache, args.batch, args.set or [])
    cases: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    prep = launch("prepare", 1, sets, workdir / size / "prepare", 0, 0, config=config)[0]
    log.info("size %s: data + graphs ready in %.0fs (%d users, %d items, %d train interactions)", size,
             time.perf_counter() - t0, prep["n_users"], prep["n_items"], prep["n_train"])
    plan = EXTERNAL[size]["plan"] if size in EXTERNAL else [("single", 1), ("dist", 1), ("dist", 2)]
    for trainer, W in plan:
        name = "Trainer" if trainer == "single" else "DistributedTrainer"
        case_dir = workdir / size / f"{trainer}_w{W}"
        try:
            ranks = launch(trainer, W, sets, case_dir, args.steps, args.warmup, config=config)
        except RuntimeError as exc:  # e.g. a rank killed by the kernel's OOM killer: record it, go on
            log.error("size %s %s W=%d failed: %s", size, trainer, W, exc)
            cases.append({"size": size, "trainer": name, "world_size": W, "failed": str(exc).splitlines()[0] + (
                              "; a rank received SIGKILL (on this box: the kernel's OOM killer)"
                              if "SIGKILL" in str(exc) else ""), "log": str(case_dir / "log.txt")})
            continue
        c = {"size": size, "trainer": name,
             "fanouts": "config", **summarise(ranks), "prepare": {"seconds": prep["build_s"],
                                                                  "peak_rss_mb": prep["peak_rss_mb"]}}
        cases.append(c)
        log.info("%s %s W=%d: %.0f triples/s, step %.3fs, peak RSS %s MB", size, c["trainer"], W,
                 c["triples_per_s"], c["step_wall_s"], c["peak_rss_mb_per_rank"])
    base = next((c for c in cases if c["trainer"] == "DistributedTrainer" and c["world_size"] == 1), None)
    for c in cases:
        if base is not None and c["trainer"] == "DistributedTrainer" and c["world_size"] == 2 and "failed" not in c:
            c["baseline"] = "DistributedTrainer world size 1, same data and per-rank batch"
            c["ratio"] = c["triples_per_s"] / base["triples_per_s"]
            c["scaling_efficiency"] = c["ratio"] / 2
    if args.full_fanout_baseline and size == args.full_fanout_baseline:
        steps = max(3, args.steps // 4)
        ranks = launch("single", 1, sets + ["sampling.fanouts=-1"], workdir / size / "single_full", steps, 1,
                       config=config)
        c = {"size": size, "trainer": "Trainer", "fanouts": "-1 (full neighbourhood)", **summarise(ranks)}
        sampled = cases[0]
        sampled["baseline"] = "same Trainer at sampling.fanouts=-1 (full neighbourhood)"
        sampled["ratio"] = sampled["triples_per_s"] / c["triples_per_s"]
        cases.append(c)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goat bench train")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trainer", default="single", choices=["single", "dist", "prepare"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--meter", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=BASE_CONFIG, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="one small dataset (100k interactions), 5 steps")
    ap.add_argument("--sizes", default="1m,10m", help="comma list of " + ", ".join([*SIZES, *EXTERNAL]))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1024, help="triples per rank per step")
    ap.add_argument("--full-fanout-baseline", default="1m", help="size at which to also run fanout -1 ('' = none)")
    ap.add_argument("--set", action="append", help="extra config override for every case")
    ap.add_argument("--json", default=str(RESULTS_DIR / "bench_train.json"))
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_train"))
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    setup_logging("INFO")
    if args.quick:
        args.sizes, args.steps, args.warmup = "quick", 5, 2
        args.full_fanout_baseline = "quick"
        if args.json == str(RESULTS_DIR / "bench_train.json"):
            args.json = str(RESULTS_DIR / "bench_train_quick.json")
    machine = machine_info()
    load_start = os.getloadavg()
    cases: list[dict[str, Any]] = []
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        cases += run_size(size, args, Path(args.workdir))
    payload = {"benchmark": "train", "inputs": {"sizes": args.sizes, "steps": args.steps, "warmup": args.warmup,
                                                "batch_per_rank": args.batch, "synth": SYNTH,
                                                "size_table": SIZES, "config": BASE_CONFIG,
                                                "external": {k: {**v, "path": str(v["path"])} for k, v in
                                                             EXTERNAL.items()},
                                                "overrides": args.set or []},
               "machine": machine, "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
               "phases": list(PHASES), "cases": cases,
               "note": "CPU shared with other jobs while measured (2 cores): timings are inflated and noisy; "
                       "world size 2 runs both ranks on the same 2 cores"}
    path = write_json(args.json, payload)
    ran = [c for c in cases if "skipped" not in c and "failed" not in c]
    if ran:
        labels = [f"{c['size']} {'T' if c['trainer'] == 'Trainer' else 'DT'} W{c['world_size']}"
                  + (" fo-1" if str(c['fanouts']).startswith("-1") else "") for c in ran]
        plot_stacked(Path(path).with_suffix(".png"), labels, {p: [c["breakdown_s"][p] for c in ran] for p in PHASES},
                     ylabel="seconds per step (median)",
                     title="RecGOAT step-time breakdown (T = Trainer, DT = DistributedTrainer)")
    if not args.quick:
        la = payload["loadavg_start"][0]
        for c in ran:
            append_result_row("train", f"{c['size']} {c['trainer']} W={c['world_size']} fanouts {c['fanouts']}, "
                              f"load {la:.1f}", f"{c['triples_per_s']:.0f} triples/s, peak RSS "
                              f"{max(c['peak_rss_mb_per_rank']):.0f} MB/rank", c.get("baseline", "-"),
                              c.get("ratio"), machine)
    for c in ran:
        log.info("%s %s W=%d fanouts %s: %.0f triples/s, %.0f edges/s, step %.3fs %s, peak RSS %s MB%s", c["size"],
                 c["trainer"], c["world_size"], c["fanouts"], c["triples_per_s"], c["sampled_edges_per_s"],
                 c["step_wall_s"], {k: round(v, 4) for k, v in c["breakdown_s"].items()}, c["peak_rss_mb_per_rank"],
                 f", ratio {c['ratio']:.2f}" if "ratio" in c else "")
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
