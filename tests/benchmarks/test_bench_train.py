"""The training benchmark's measuring pieces: phase timers installed from the outside on a real tiny
Trainer (and removed again), the per-case aggregation, the comm comparison and the plots."""
from __future__ import annotations

import json
import statistics
import time

import pytest

from benchmarks import bench_comm, bench_train
from benchmarks.harness import plot_grouped, plot_stacked
from goat_dist.config import load_config
from goat_dist.parallel.cost_model import StepShape, predict_bytes


def tiny_cfg(root):
    return load_config(None, [
        f"data.path={root}/data", "data.generate_if_missing=true",
        "data.synth={users: 60, items: 40, interactions: 900, modalities: {image: 6, text: 5}, user_profiles: 4, "
        "seed: 3}", f"graph.cache_dir={root}/cache", "graph.item_knn_k=3", "graph.user_knn_k=3",
        "sampling.fanouts={user_item: [3, 3], item_item: [3], user_user: [3]}", "model.dim=8", "model.id_layers=2",
        "train.batch_size=32", "loss.cmcl_weight=0.5", "log.tensorboard=false"])


def test_instrument_times_each_phase_and_undo_restores(tmp_path):
    import goat_dist.model.recgoat as recgoat_mod
    from goat_dist.engine.trainer import Trainer

    tr = Trainer(tiny_cfg(tmp_path), tmp_path / "run").build()
    before_nce, before_step = recgoat_mod.InfoNCE, tr.sparse_opt.step
    timer = bench_train.PhaseTimer()
    undo = bench_train.instrument(tr, timer)
    batch = next(iter(tr.loader))
    totals = []
    for _ in range(2):
        timer.reset()
        t0 = time.perf_counter()
        tr.train_step(batch)
        totals.append(time.perf_counter() - t0)
        for phase in ("lookup", "ot", "infonce", "optimiser"):
            assert timer.acc.get(phase, 0.0) > 0.0, phase
        assert sum(timer.acc.values()) < totals[-1]
    # 5 InfoNCE terms (user-item, 3 item-view pairs, user views) all went through the timed class
    assert recgoat_mod.InfoNCE is not before_nce
    undo()
    assert recgoat_mod.InfoNCE is before_nce and tr.sparse_opt.step == before_step
    assert "_solve" not in vars(tr.model.fusion)
    timer.reset()
    tr.train_step(batch)
    assert timer.acc == {}                                         # nothing is timed any more
    stats = bench_train.batch_stats(batch)
    assert stats["edges"] > 0 and stats["lookup_users"] >= stats["unique_users"]
    tr.close()


def _rank(walls, triples=32, rss=100.0):
    steps = [{"wall": w, "triples": triples, "edges": 10, "lookup_users": 5, "lookup_items": 4,
              **{p: w / 6 for p in bench_train.PHASES}} for w in walls]
    return {"steps": steps, "peak_rss_mb": rss, "rss_after_build_mb": rss - 1, "build_s": 1.0, "n_dense": 7,
            "n_users": 60, "n_items": 40, "n_train": 700}


def test_summarise_uses_the_slowest_rank_per_step():
    out = bench_train.summarise([_rank([1.0, 3.0, 2.0]), _rank([2.0, 1.0, 2.5], rss=120.0)])
    assert out["step_wall_s"] == statistics.median([2.0, 3.0, 2.5])
    assert out["triples_per_s"] == pytest.approx(64 / 2.5)
    assert out["peak_rss_mb_per_rank"] == [100.0, 120.0]
    assert out["breakdown_s"]["sampling"] == pytest.approx(statistics.median([2.0 / 6, 2.0 / 6]))


def test_compare_reports_relative_error_summed_over_ranks():
    model = {"dim": 8, "n_modalities": 2, "user_branch": True, "cmcl": True, "w_term": False, "oat_fusion": True,
             "zero_stage": 2}
    step = {"triples": 16, "lookup_users": 30, "lookup_items": 20, "remote_fraction": 0.5, "loss_parts": 5}
    ranks = []
    for _ in range(2):
        s = StepShape(world_size=2, batch=16, dim=8, n_modalities=2, user_branch=True, n_dense=100, user_ids=30,
                      item_ids=20, remote_fraction=0.5, infonce_rows=16)
        pred = predict_bytes(s)
        # "measured": the prediction, except the embedding output all-to-all moved twice the bytes
        summary = {t: {"calls": v["calls"], "payload_bytes": v["payload_bytes"] * (2 if t == "emb_a2a_out" else 1),
                       "sent_bytes": v["sent_bytes"] * (2 if t == "emb_a2a_out" else 1)} for t, v in pred.items()}
        ranks.append({"model": model, "n_dense": 100, "checks": {"nonfinite_flags": False,
                                                                 "zero_overflow_check": False},
                      "steps": [step], "comm": {"summary": summary}})
    rows, shapes = bench_comm.compare(ranks)
    assert len(shapes) == 2
    assert rows["emb_a2a_out"]["sent_err"] == pytest.approx(-0.5)
    assert rows["emb_a2a_out"]["sent"] == 2 * 2 * 0.5 * 4 * 8 * 50
    assert all(abs(r["sent_err"]) < 1e-12 for t, r in rows.items() if t != "emb_a2a_out")


def test_plots_write_png(tmp_path):
    p1 = plot_stacked(tmp_path / "a.png", ["x", "y"], {"p": [1.0, 2.0], "q": [0.5, 0.1]}, ylabel="s", title="t")
    p2 = plot_grouped(tmp_path / "b.png", ["x", "y"], {"m": [1.0, 1e6], "p": [2.0, 1e5]}, ylabel="B", title="t",
                      log_y=True)
    for p in (p1, p2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_all_lists_every_benchmark():
    from goat_dist import cli

    assert cli.BENCHMARKS == ("sampler", "sinkhorn", "train", "comm")
    args, rest = cli.build_parser().parse_known_args(["bench", "all", "--quick"])
    assert args.name == "all" and rest == ["--quick"]


@pytest.mark.slow
def test_bench_train_quick_end_to_end(tmp_path):
    """``goat bench train --quick`` in fresh processes: every case ran and reported each phase."""
    out = tmp_path / "bt.json"
    assert bench_train.main(["--quick", "--json", str(out), "--workdir", str(tmp_path / "work")]) == 0
    cases = json.loads(out.read_text())["cases"]
    assert {(c["trainer"], c["world_size"]) for c in cases} >= {("Trainer", 1), ("DistributedTrainer", 2)}
    for c in cases:
        assert c["triples_per_s"] > 0 and all(c["breakdown_s"][p] >= 0 for p in bench_train.PHASES)
        assert all(r > 0 for r in c["peak_rss_mb_per_rank"])
    assert out.with_suffix(".png").exists()


def test_quick_runs_never_overwrite_full_results():
    from goat_dist import cli

    argv = cli._bench_argv("sinkhorn", ["--quick"])
    assert argv[:2] == ["--quick", "--json"] and argv[2].endswith("results/bench_sinkhorn_quick.json")
    assert cli._bench_argv("sampler", ["--quick", "--json", "x.json"]) == ["--quick", "--json", "x.json"]
    assert cli._bench_argv("train", ["--steps", "3"]) == ["--steps", "3"]


def test_a_failed_case_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """A case whose rank dies (e.g. the OOM killer's SIGKILL) becomes a ``failed`` entry; the size's
    other cases are still measured and summarised (nothing measured before it is lost)."""
    import argparse

    rank = {"steps": [{"wall": 1.0, "triples": 8, "edges": 10, "lookup_users": 1, "lookup_items": 1,
                       **{p: 0.1 for p in bench_train.PHASES}}], "peak_rss_mb": 1.0, "build_s": 1.0,
            "n_users": 3, "n_items": 2, "n_train": 5}
    prep = {"build_s": 1.0, "peak_rss_mb": 1.0, "n_users": 3, "n_items": 2, "n_train": 5}

    def fake_launch(trainer, W, *a, **kw):
        if trainer == "prepare":
            return [prep]
        if trainer == "dist" and W == 2:
            raise RuntimeError("bench case dist W=2 failed (exit 1); log x:\nSignal 9 (SIGKILL) received by PID 7")
        return [dict(rank) for _ in range(W)]

    monkeypatch.setattr(bench_train, "launch", fake_launch)
    args = argparse.Namespace(batch=8, set=None, steps=1, warmup=0, full_fanout_baseline="")
    cases = bench_train.run_size("quick", args, tmp_path)
    assert [(c["trainer"], c["world_size"]) for c in cases] == [("Trainer", 1), ("DistributedTrainer", 1),
                                                                  ("DistributedTrainer", 2)]
    assert "failed" not in cases[0] and cases[1]["triples_per_s"] == 8.0
    assert "SIGKILL" in cases[2]["failed"] and "ratio" not in cases[2]
