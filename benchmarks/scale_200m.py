"""The one-box scale run (issue #8): RecGOAT on 200M interactions (20M users, 2M items), phase by phase.

    /usr/bin/time -v python -m benchmarks.scale_200m -c configs/scale_200m.yaml --run-dir /work/scale/run200m

Phases, each timed (wall seconds) with the peak RSS seen during it (a thread samples VmRSS every
0.2 s, and its split into anonymous / file-backed / shared memory at that peak; the overall peak is the
kernel's VmHWM, file-backed memory-mapped pages included):

1. ``data``: ``prepare_dataset`` (parse the goat-format text splits; features memory-mapped).
2. ``graph_ui``, ``knn_<modality>``, ``user_user``: ``build_graphs`` (each graph is built once and
   cached on disk by content hash; a re-run memory-maps the cache -- the JSON says which).
3. ``model_build``: the ``Trainer`` over the already built data and graphs (samplers, loader, the
   model on ``meta`` materialised, optimisers).
4. ``train``: ``train.max_steps`` steps of ``Trainer.train_step`` (the engine's step: sampled
   forward, losses, backward, fused sparse optimiser + dense optimiser); the loss every step.
5. ``release_pages`` (with ``eval.release_mapped_pages``): the memory-mapped pages training touched
   are unmapped (``Trainer.release_mapped_pages``; the JSON's ``released_pages``).
6. ``eval``: Recall/NDCG/... @K on ``eval.user_sample`` sampled users (the engine's user sample),
   valid and test splits, train items masked: representations of all items and of the sampled
   users (``compute_all_representations(user_ids=, stream_users=eval.stream_users)``: the memory-lean
   full-graph pass for LightGCN and items -- with ``stream_users`` the users are streamed through the
   layers, no [n_users, d] buffer --, the user GAT on the sampled users' k-hop subgraph), computed
   once, scored for both.

Writes ``--out`` (default ``benchmarks/results/scale_200m.json``). The run's own log lines and
``metrics.jsonl`` (train loss events) go to ``--run-dir``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_knn import PeakRSS
from benchmarks.harness import RESULTS_DIR, machine_info
from goat_dist.config import load_config, save_config, to_dict
from goat_dist.engine.trainer import Trainer, prepare_dataset
from goat_dist.eval.metrics import finalize, metric_sums
from goat_dist.graph import build_graphs
from goat_dist.log import get_logger, progress, setup_logging

log = get_logger(__name__)


class PrebuiltTrainer(Trainer):
    """A ``Trainer`` whose data and graphs were built (and timed) beforehand: its
    ``_rank_zero_first`` hook -- called once for the dataset, once for the graphs -- returns them
    instead of running the builders again."""

    def __init__(self, *args, prebuilt: list, **kwargs):
        super().__init__(*args, **kwargs)
        self._prebuilt = list(prebuilt)

    def _rank_zero_first(self, fn):
        return self._prebuilt.pop(0)


@torch.no_grad()
def loss_summary(losses: list[float], window: int = 50) -> dict:
    """First/last window means, min, and the mean of every ``window`` steps (the curve)."""
    if not losses:
        return {}
    means = [statistics.fmean(losses[s:s + window]) for s in range(0, len(losses), window)]
    return {"first_window_mean": means[0], "last_window_mean": means[-1], "min": min(losses),
            "max": max(losses), "window": window, "window_means": [round(m, 5) for m in means]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", default="configs/scale_200m.yaml")
    ap.add_argument("--run-dir", default="/work/scale/run200m")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS_DIR / "scale_200m.json"))
    ap.add_argument("--check-eval", action="store_true",
                    help="also compute the full-graph representations and report the difference (small data)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    setup_logging(cfg.log.level)
    torch.set_num_threads(cfg.train.num_threads or 1)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    rss = PeakRSS()
    phases: dict[str, float] = {}
    phase_rss: dict[str, float] = {}
    phase_split: dict[str, dict[str, int]] = {}
    result: dict = {"command": " ".join([sys.executable, "-m", "benchmarks.scale_200m", *(argv or sys.argv[1:])]),
                    "config": to_dict(cfg), "load_average_start": list(os.getloadavg())}
    out = Path(args.out)

    def write(status: str) -> None:
        result.update(status=status, phase_seconds={k: round(v, 1) for k, v in phases.items()},
                      phase_peak_rss_gb={k: round(v / 2**30, 2) for k, v in phase_rss.items()},
                      phase_peak_rss_split_gb={k: {n: round(b / 2**30, 2) for n, b in v.items()}
                                               for k, v in phase_split.items()},
                      peak_rss_gb=round(rss.hwm() / 2**30, 2), load_average_now=list(os.getloadavg()),
                      machine=machine_info())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    @contextlib.contextmanager
    def phase(name: str):
        rss.reset()
        t0 = time.perf_counter()
        log.info("phase %s ...", name)
        yield
        phases[name] = time.perf_counter() - t0
        phase_rss[name], phase_split[name] = rss.phase_peak, dict(rss.phase_peak_split)
        log.info("phase %s: %.1fs, peak RSS in phase %.2f GB (%s)", name, phases[name], rss.phase_peak / 2**30,
                 ", ".join(f"{k} {v / 2**30:.2f}" for k, v in rss.phase_peak_split.items()))
        write("running")

    with phase("data"):
        ds = prepare_dataset(cfg.data)
    result.update(interactions=int(sum(len(ds.splits[s]) for s in ds.splits if ds.splits[s] is not None)),
                  train_interactions=len(ds.train), users=ds.n_users, items=ds.n_items)

    mcfg = cfg.model
    modalities = (list(mcfg.modalities) or sorted(ds.item_features)) if mcfg.use_item_modalities else []
    user_feature = sorted(ds.user_features)[0] if (mcfg.use_user_branch and ds.user_features) else None
    graph_t: dict[str, float] = {}
    rss.reset()
    t0 = time.perf_counter()
    graphs = build_graphs(ds, cfg.graph, modalities, user_feature is not None, user_feature, timings=graph_t)
    phases.update(graph_t)
    phase_rss["graphs"], phase_split["graphs"] = rss.phase_peak, dict(rss.phase_peak_split)
    result["graphs"] = {"ui_edges": graphs.ui.nnz, "item_item_edges": {m: g.nnz for m, g in graphs.item_item.items()},
                        "user_user_edges": None if graphs.user_user is None else graphs.user_user.nnz,
                        "seconds_total": round(time.perf_counter() - t0, 1)}
    write("running")

    with phase("model_build"):
        trainer = PrebuiltTrainer(cfg, run_dir, prebuilt=[ds, graphs]).build()
    sparse_ids = {id(p) for p in trainer.model.id_emb.parameters()}
    result["parameters"] = {
        "id_tables": sum(p.numel() for p in trainer.model.id_emb.parameters()),
        "dense": sum(p.numel() for p in trainer.model.parameters() if id(p) not in sparse_ids)}

    losses: list[float] = []
    parts_log: list[dict] = []
    steps = cfg.train.max_steps
    with phase("train"):
        trainer.loader.set_epoch(0)
        it = iter(trainer.loader)
        t_first = None
        for step in progress(range(steps), desc="train", unit="step"):
            parts = trainer.train_step(next(it))
            losses.append(float(parts["loss"]))
            if t_first is None:
                t_first = time.perf_counter()
            if (step + 1) % cfg.log.every_steps == 0:
                row = {k: round(float(v), 5) for k, v in parts.items()}
                parts_log.append({"step": step + 1, **row})
                trainer.logger.log("train", step + 1, epoch=0, **{("loss" if k == "loss" else f"loss_{k}"): v
                                                                   for k, v in row.items()})
                log.info("step %d: %s", step + 1, row)
        steady = (time.perf_counter() - t_first) / max(1, steps - 1) if t_first else None
    result.update(steps=len(losses), batch_size=cfg.train.batch_size, fanouts=cfg.sampling.fanouts,
                  seconds_per_step_after_first=None if steady is None else round(steady, 3),
                  loss=loss_summary(losses), loss_parts=parts_log)

    if cfg.eval.release_mapped_pages:  # its own phase, so that the eval phase's peak starts after it
        with phase("release_pages"):
            result["released_pages"] = trainer.release_mapped_pages()
    with phase("eval"):
        users = trainer._eval_users()
        user_reps, item_reps = trainer.model.compute_all_representations(
            graphs.ui.user_items, graphs.ui.item_users, trainer.item_features, trainer.user_features,
            graphs.item_item, graphs.user_user, user_ids=users, stream_users=bool(cfg.eval.stream_users))
        item_t = item_reps.t().contiguous()
        del item_reps  # the transposed copy is all the scoring needs (512 MB at 2M items)
        score = lambda ub: user_reps[torch.searchsorted(users, ub)] @ item_t  # noqa: E731
        metrics = {}
        for split in ("valid", "test"):
            heldout = trainer._split_csr(split)
            if heldout is not None:
                metrics[split] = finalize(metric_sums(score, users, heldout, [trainer._train_csr],
                                                      list(cfg.eval.ks), cfg.eval.batch_size))
    result["eval"] = {"user_sample": int(users.numel()), "representations": (
        "all items and the sampled users: compute_all_representations(user_ids=sample, stream_users="
        f"{bool(cfg.eval.stream_users)}), whose user branch runs the user GAT over the sampled users' k-hop "
        "user-user subgraph only" + (" and whose LightGCN pass streams the users (no [n_users, d] buffer)"
                                     if cfg.eval.stream_users else "")),
        **metrics}
    if args.check_eval:  # the reference: the model's own full-graph call (all users' user branch)
        full_u, full_i = trainer.model.compute_all_representations(
            graphs.ui.user_items, graphs.ui.item_users, trainer.item_features, trainer.user_features,
            graphs.item_item, graphs.user_user)
        result["eval"]["check_vs_full_graph_max_abs_diff"] = {
            "users": float((full_u[users] - user_reps).abs().max()), "items": float((full_i - item_t.t()).abs().max())}
        log.info("eval check against the full-graph representations: %s", result["eval"]["check_vs_full_graph_max_abs_diff"])
    trainer.close()
    write("done")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
