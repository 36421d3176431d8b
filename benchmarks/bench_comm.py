"""Communication per training step at world size 2, MEASURED with ``goat_dist.parallel.comm_meter``
and PREDICTED by ``goat_dist.parallel.cost_model`` (same run), plus PROJECTIONS to 8, 64 and 512 GPUs.

The DistributedTrainer (gloo, TorchRec row-wise tables, DeepSpeed ZeRO-2) trains ``--size`` (default
the 10M-interaction synthetic dataset of ``bench_train``) for ``--warmup`` + ``--steps`` steps; the
measured steps run inside ``comm_meter``. Per collective (tag) and per step, summed over both ranks:
calls, payload bytes and bytes sent to the other rank, measured vs predicted. The prediction is fed
the MEASURED per-step shapes (triples, ids each rank looked up, the share of them owned by the other
rank: the data-dependent part); the analytic estimate of the lookups from fanouts and degrees
(``cost_model.expected_lookups``) is reported next to the measured counts.

Projection (NOT a measurement; no GPU was used): the same per-rank step (batch, lookups, model) at
W = 8, 64, 512 on ``cost_model.Network()`` (8 GPUs/node, NVLink 450 GB/s per direction per GPU, 8 x 400
Gb/s NICs per node = 50 GB/s per GPU, latency 5/15 us x log2 W per collective, ring all-reduce /
all-gather, all-to-all spread evenly over peers, no overlap of communication with compute).
Compute per GPU step = (measured CPU step time at world size 1 minus its InfoNCE forward) / ``--gpu-speedup``
(ASSUMED speed-up of one H100 over one core of this shared CPU for this step; default 50) + the InfoNCE
logits' FLOPs (which grow with W: global negatives) / ``--gpu-flops`` (ASSUMED sustained rate,
default 20 TFLOP/s). The CPU time comes from ``bench_train.json`` (DistributedTrainer, world size 1,
same size) when present, else from this run's rank 0 (under the meter and two ranks on two cores:
pessimistic).

    goat bench comm [--quick] [--size 10m] [--steps 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks.bench_train import ROOT, SIZES, case_overrides, dataset_for, launch
from benchmarks.harness import RESULTS_DIR, append_result_row, machine_info, plot_grouped, write_json
from goat_dist.log import get_logger, setup_logging
from goat_dist.parallel.cost_model import Network, StepShape, predict_bytes, project, shape_at

log = get_logger(__name__)

GROUPS = {"embedding all-to-all": ("emb_a2a_ids", "emb_a2a_out", "emb_a2a_grad"),
          "InfoNCE all-gather": ("infonce_allgather", "infonce_sizes", "infonce_allgather_grad"),
          "OAT statistics all-reduce": ("oat_stats", "oat_stats_grad"),
          "dense ZeRO": ("zero_grad_reduce", "zero_param_allgather", "zero_grad_norm", "zero_overflow_check"),
          "loss scalars and checks": ("loss_scalars", "nonfinite_flags")}


def _shape(rank_json: dict[str, Any], step: dict[str, Any], world: int, infonce_rows: int) -> StepShape:
    m = rank_json["model"]
    return StepShape(world_size=world, batch=step["triples"], dim=m["dim"], n_modalities=m["n_modalities"],
                     user_branch=m["user_branch"], n_dense=rank_json["n_dense"], user_ids=step["lookup_users"],
                     item_ids=step["lookup_items"], cmcl=m["cmcl"], w_term=m["w_term"], oat_fusion=m["oat_fusion"],
                     zero_stage=m["zero_stage"], nonfinite_parts=step["loss_parts"] if rank_json["checks"][
                         "nonfinite_flags"] else 0, zero_overflow_check=rank_json["checks"]["zero_overflow_check"],
                     remote_fraction=step.get("remote_fraction"), infonce_rows=infonce_rows)


def compare(ranks: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float]], list[StepShape]]:
    """Per tag: measured and predicted calls / payload / sent per step, summed over ranks."""
    W = len(ranks)
    n = min(len(r["steps"]) for r in ranks)
    rows: dict[str, dict[str, float]] = {}
    for r in ranks:
        for tag, v in r["comm"]["summary"].items():
            row = rows.setdefault(tag, {k: 0.0 for k in ("calls", "payload", "sent", "pred_calls", "pred_payload",
                                                         "pred_sent")})
            row["calls"] += v["calls"]
            row["payload"] += v["payload_bytes"]
            row["sent"] += v["sent_bytes"]
    shapes = []
    for k in range(n):
        n_max = max(r["steps"][k]["triples"] for r in ranks)
        for r in ranks:
            s = _shape(r, r["steps"][k], W, n_max)
            shapes.append(s)
            for tag, v in predict_bytes(s).items():
                row = rows.setdefault(tag, {k2: 0.0 for k2 in ("calls", "payload", "sent", "pred_calls",
                                                               "pred_payload", "pred_sent")})
                row["pred_calls"] += v["calls"] / n
                row["pred_payload"] += v["payload_bytes"] / n
                row["pred_sent"] += v["sent_bytes"] / n
    for row in rows.values():
        for k in ("payload", "sent"):
            row[f"{k}_err"] = (row[f"pred_{k}"] - row[k]) / row[k] if row[k] else (0.0 if not row[f"pred_{k}"]
                                                                                  else math.inf)
    return rows, shapes


def cpu_compute_s(size: str, ranks: list[dict[str, Any]]) -> tuple[float, str]:
    """Measured CPU step time minus InfoNCE forward, per rank at world size 1 (see the docstring)."""
    path = RESULTS_DIR / "bench_train.json"
    if path.exists():
        for c in json.loads(path.read_text()).get("cases", []):
            if c.get("size") == size and c.get("trainer") == "DistributedTrainer" and c.get("world_size") == 1:
                b = c["breakdown_s"]
                return c["step_wall_s"] - b["infonce"], f"bench_train.json {size} DistributedTrainer W=1"
    steps = ranks[0]["steps"]
    return (statistics.median(s["wall"] - s["infonce"] for s in steps),
            "this run's rank 0 at W=2 under the meter (no bench_train.json case)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="goat bench comm")
    ap.add_argument("--quick", action="store_true", help="the small dataset, 3 steps")
    ap.add_argument("--size", default="10m")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--gpu-speedup", type=float, default=50.0, help="ASSUMED H100 / CPU-core speed-up (projection)")
    ap.add_argument("--gpu-flops", type=float, default=20e12, help="ASSUMED sustained GPU FLOP/s for InfoNCE")
    ap.add_argument("--set", action="append")
    ap.add_argument("--json", default=str(RESULTS_DIR / "bench_comm.json"))
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench_comm"))
    args = ap.parse_args(argv)
    setup_logging("INFO")
    if args.quick:
        args.size, args.steps, args.warmup = "quick", 3, 1
        if args.json == str(RESULTS_DIR / "bench_comm.json"):
            args.json = str(RESULTS_DIR / "bench_comm_quick.json")
    machine, load_start = machine_info(), os.getloadavg()
    if args.size not in SIZES:
        raise SystemExit(f"goat bench comm: --size must be one of {', '.join(SIZES)} (world size 2 holds the "
                         f"dataset twice; the external 200M dataset does not fit twice in this machine's memory)")
    where = dataset_for(args.size)
    if where is None:
        raise SystemExit(f"goat bench comm: dataset for {args.size} not ready")
    sets = case_overrides(args.size, where[0], where[1], args.batch, args.set or [])
    work = Path(args.workdir) / args.size
    launch("prepare", 1, sets, work / "prepare", 0, 0)
    ranks = launch("dist", 2, sets, work / "dist_w2_meter", args.steps, args.warmup, meter=True)
    rows, shapes = compare(ranks)
    tot = {k: sum(r[k] for r in rows.values()) for k in ("payload", "sent", "pred_payload", "pred_sent")}
    groups = {}
    for g, tags in GROUPS.items():
        sel = [rows[t] for t in tags if t in rows]
        if sel:
            gm, gp = sum(r["sent"] for r in sel), sum(r["pred_sent"] for r in sel)
            groups[g] = {"sent_measured": gm, "sent_predicted": gp, "err": (gp - gm) / gm if gm else float("nan")}
    # the same prediction with less measured input: (a) uniform remote share (W-1)/W, (b) lookups from
    # cost_model.expected_lookups (fanouts + degrees) instead of the measured counts
    exp = ranks[0]["expected_lookups"]
    from dataclasses import replace as _replace

    analytic = {}
    for name, f in (("uniform_remote_share", lambda s: _replace(s, remote_fraction=None)),
                    ("analytic_lookups", lambda s: _replace(s, remote_fraction=None, user_ids=exp["user_ids"],
                                                            item_ids=exp["item_ids"]))):
        n = len(shapes) / len(ranks)
        pred = sum(v["sent_bytes"] for s in shapes for v in predict_bytes(f(s)).values()) / n
        analytic[name] = {"sent_predicted": pred, "err": (pred - tot["sent"]) / tot["sent"]}
    lookups = {"measured_per_rank": [statistics.mean(s["lookup_users"] + s["lookup_items"] for s in r["steps"])
                                     for r in ranks],
               "expected_analytic": ranks[0]["expected_lookups"]}
    # projection from the mean per-rank shape of this run
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    base = shapes[0]
    from dataclasses import replace

    mshape = replace(base, batch=int(round(mean([s.batch for s in shapes]))), user_ids=mean([s.user_ids for s in shapes]),
                     item_ids=mean([s.item_ids for s in shapes]), infonce_rows=None, remote_fraction=None)
    cpu_s, cpu_src = cpu_compute_s(args.size, ranks)
    other = cpu_s / args.gpu_speedup
    net = Network()
    projections = [project(shape_at(mshape, w), other, net, args.gpu_flops) for w in (8, 64, 512)]
    payload = {"benchmark": "comm", "projection_is_not_a_measurement": True,
               "inputs": {"size": args.size, "steps": args.steps, "warmup": args.warmup, "batch_per_rank": args.batch,
                          "world_size": 2, "backend": "gloo", "overrides": args.set or []},
               "machine": machine, "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
               "per_tag_per_step_sum_over_ranks": rows, "groups": groups, "totals_per_step_sum_over_ranks": tot,
               "total_sent_with_less_measured_input": analytic,
               "lookups": lookups, "projection": {
                   "assumptions": {"network": net.__class__.__name__ + str(vars(net)) if hasattr(net, "__dict__")
                                   else str(net), "gpu_speedup_over_cpu_core": args.gpu_speedup,
                                   "gpu_flops_infonce": args.gpu_flops, "cpu_compute_s": cpu_s,
                                   "cpu_compute_source": cpu_src, "per_rank_shape": vars(mshape) if hasattr(
                                       mshape, "__dict__") else {f: getattr(mshape, f) for f in mshape.__slots__},
                                   "overlap": "none", "algorithms": "ring all-reduce/all-gather; all-to-all spread "
                                                                   "evenly over peers"},
                   "rows": projections},
               "note": "bytes are algorithm-level (see comm_meter); sum over both ranks per step"}
    path = write_json(args.json, payload)
    tags = [t for t in rows if rows[t]["sent"] or rows[t]["pred_sent"]]
    plot_grouped(Path(path).with_suffix(".png"), tags, {"measured sent": [max(rows[t]["sent"], 1) for t in tags],
                                                        "predicted sent": [max(rows[t]["pred_sent"], 1) for t in tags]},
                 ylabel="bytes per step (both ranks, log)", title=f"{args.size} W=2: measured vs cost model",
                 log_y=True)
    for t in tags:
        r = rows[t]
        log.info("%-24s calls %5.1f/%5.1f  payload %12.0f / %12.0f (%+.1f%%)  sent %12.0f / %12.0f (%+.1f%%)", t,
                 r["calls"], r["pred_calls"], r["payload"], r["pred_payload"], 100 * r["payload_err"], r["sent"],
                 r["pred_sent"], 100 * r["sent_err"])
    log.info("total sent per step (both ranks): measured %.4g, predicted %.4g; uniform remote share %.4g (%+.1f%%); "
             "analytic lookups %.4g (%+.1f%%); lookups per rank measured %s vs analytic %.0f", tot["sent"], tot["pred_sent"],
             analytic["uniform_remote_share"]["sent_predicted"], 100 * analytic["uniform_remote_share"]["err"],
             analytic["analytic_lookups"]["sent_predicted"], 100 * analytic["analytic_lookups"]["err"],
             [round(x) for x in lookups["measured_per_rank"]], exp["user_ids"] + exp["item_ids"])
    for p in projections:
        log.info("PROJECTION W=%d: step %.4fs (compute %.4fs, comm %.4fs), %.3g bytes sent per GPU, %.0f triples/s",
                 p["world_size"], p["step_s"], p["compute_s"], p["comm_s"], p["sent_bytes_per_gpu"],
                 p["triples_per_s_global"])
    if not args.quick:
        la = load_start[0]
        for g, v in groups.items():
            append_result_row("comm", f"{args.size} W=2 {g}, bytes sent/step (both ranks), load {la:.1f}",
                              f"measured {v['sent_measured']:.4g} B", f"cost model {v['sent_predicted']:.4g} B",
                              v["sent_predicted"] / v["sent_measured"] if v["sent_measured"] else None, machine)
        for p in projections:
            append_result_row("comm", f"PROJECTION W={p['world_size']} (8 GPU/node, NVLink 450 GB/s, 50 GB/s/GPU "
                              f"inter-node, assumed GPU speed-up {args.gpu_speedup:g}x)",
                              f"step {p['step_s'] * 1e3:.1f} ms, {p['sent_bytes_per_gpu'] / 1e6:.1f} MB sent/GPU",
                              "-", None, machine)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
