"""DistributedTrainer checkpoints (real gloo processes): exact resume after a SIGKILL, resharding
into other world sizes and sharding types, the non-finite guard across ranks, listeners."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import free_port, run_distributed, tiny_problem
from goat_dist.config import load_config, save_config

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(root, *extra: str):
    """Tiny synthetic problem at full fanout, dropout 0, per-rank batch 16 (global 32 at W=2)."""
    return load_config(None, [*tiny_problem(root), "train.batch_size=16", "train.epochs=2", "log.every_steps=1",
                              "checkpoint.every_steps=4", *extra])


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "train":
            out[e["step"]] = e["loss"]
    return out


def fit_body(rank, world_size, cfg, run_dir, resume=None):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    seen = []
    trainer.add_checkpoint_listener(lambda url, step, metrics: seen.append((url, step, sorted(metrics))))
    try:
        resumed = trainer.resume(resume) if resume else None
        final = trainer.fit()
        return {"final": final, "state": trainer.full_state_dict(), "seen": seen, "resumed": resumed}
    finally:
        trainer.close()


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    """2 ranks of ``python -m goat_dist.train`` are SIGKILLed once the log shows step 6 (a
    checkpoint exists at step 4, the one at 8 may be half written); ``--resume latest`` in a
    fresh 2-process group continues to the end: every per-step loss and the final parameters equal
    those of a run never interrupted."""
    cfg = tiny_cfg(tmp_path, "train.max_steps=14")
    ref = run_distributed(fit_body, 2, cfg, tmp_path / "ref")
    n_steps = ref[0]["final"]["steps"]
    assert n_steps == 14
    # every 4 steps, and at the end of training
    assert [s for _, s, _ in ref[0]["seen"]] == [s for _, s, _ in ref[1]["seen"]] == [4, 8, 12, 14]
    assert "loss" in ref[0]["seen"][0][2]

    config = tmp_path / "cfg.yaml"
    save_config(cfg, config)
    run_dir = tmp_path / "killed"
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "goat_dist.train", "-c", str(config), "--run-dir",
                                       str(run_dir), "--set", "train.num_threads=1"], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= 6:
                break
            if any(p.poll() is not None for p in procs):
                pytest.fail(f"a rank exited early: {procs[0].poll()} / {procs[1].poll()}: "
                            f"{procs[1].stderr.read().decode()[-3000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach step 6 in time")
    finally:
        for p in procs[::-1]:  # rank 1 first: a rank dies mid-training, then the other (stuck in a collective)
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert procs[1].returncode == -signal.SIGKILL
    killed_at = max(train_losses(run_dir))
    assert killed_at < n_steps

    res = run_distributed(fit_body, 2, cfg, run_dir, "latest")
    assert res[0]["resumed"] and res[1]["resumed"]
    a, b = train_losses(tmp_path / "ref"), train_losses(run_dir)
    assert sorted(a) == sorted(b) == list(range(1, n_steps + 1))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst <= 1e-6, [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    for r in range(2):
        for k, v in ref[r]["state"].items():
            err = float((res[r]["state"][k].float() - v.float()).abs().max()) if v.numel() else 0.0
            assert err <= 1e-6, (r, k, err)
    assert res[0]["final"]["test"] == ref[0]["final"]["test"]
