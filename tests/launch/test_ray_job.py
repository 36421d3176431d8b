"""A real Ray job survives a killed worker: `ray job submit` of launch/ray_job.py against a private
loopback head (token authentication on), one Ray Train worker killed with SIGKILL mid-training, the
job SUCCEEDS, the restarted worker group resumed from a checkpoint, and the final metrics equal those
of an uninterrupted run of the same engine and config (torchrun, world size 2, no Ray)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import tiny_problem
from goat_dist.config import load_config, save_config
from goat_dist.engine.trainer import prepare_dataset
from launch.ray_job import RAY_CHECKPOINT_FILE, WORKERS_FILE
from ray_head import RayHead, dashboard_deps_missing

REPO = Path(__file__).resolve().parents[2]
EVERY = 10      # checkpoint every EVERY steps
KILL_AFTER = 35  # kill once the run has logged a step >= this: the checkpoint at step 30 exists by then and
                 # holds model-selection state (epoch 0 ends at step 23 with a validation)


def tiny_cfg(root: Path, *extra: str):
    """A tiny synthetic problem (60 users, 40 items), full fanout, dropout 0: 23 steps/epoch at world size 2."""
    return load_config(None, [*tiny_problem(root), "train.batch_size=16", *extra])


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return out


def _wait_then_kill(head: RayHead, run_dir: Path, submit: subprocess.Popen, timeout: float,
                    stall: float) -> tuple[int, int]:
    """Once rank 0 logged a training step >= KILL_AFTER, SIGKILL the rank-1 Ray Train worker.
    Fails when no new step was logged for ``stall`` seconds (the first one included) or after ``timeout``
    seconds in all: a loaded 2-core machine makes the job slow (26 steps in 8 min seen), not stuck.
    Returns (killed pid, step seen)."""
    start = last_progress = time.monotonic()
    last_step = -1
    while time.monotonic() - start < timeout:
        if submit.poll() is not None:
            raise AssertionError(f"the job ended (exit {submit.returncode}) before a worker could be killed")
        step = max((e["step"] for e in _records(run_dir / "metrics.jsonl") if e.get("event") == "train"), default=-1)
        if step > last_step:
            last_step, last_progress = step, time.monotonic()
        elif time.monotonic() - last_progress > stall:
            raise AssertionError(f"no new training step for {stall:.0f}s (last step {last_step})")
        starts = [s for s in _records(run_dir / WORKERS_FILE) if s["rank"] == 1]
        if step >= KILL_AFTER and starts:
            pid = starts[-1]["pid"]
            assert head.owns(pid), f"pid {pid} is not a process of our Ray head"
            os.kill(pid, signal.SIGKILL)
            return pid, step
        time.sleep(0.05)
    raise AssertionError(f"no training step >= {KILL_AFTER} within {timeout:.0f}s (last step {last_step})")


def _torchrun(cfg_path: Path, run_dir: Path, *extra: str) -> list[str]:
    """The reference: the same engine and config through torchrun, world size 2, never interrupted."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "goat_dist.train", "-c", str(cfg_path), "--run-dir", str(run_dir), *extra]


@pytest.mark.dist
def test_ray_job_survives_a_killed_worker(tmp_path):
    missing = dashboard_deps_missing()
    if missing:
        pytest.skip(missing)
    # 23 steps/epoch x 4 epochs; checkpoints every EVERY steps; one validation per epoch (model selection
    # state must survive the restart too)
    cfg = tiny_cfg(tmp_path, "train.max_steps=0", "train.epochs=4", f"checkpoint.every_steps={EVERY}",
                   "log.every_steps=1")
    cfg_path = tmp_path / "tiny.yaml"
    save_config(cfg, cfg_path)
    prepare_dataset(cfg.data)  # once, before two runs read it

    run_dir, ref_dir = tmp_path / "ray_run", tmp_path / "reference"
    with RayHead() as head, open(tmp_path / "submit.log", "w") as out, open(tmp_path / "ref.log", "w") as ref_out:
        t1 = time.perf_counter()
        submit = subprocess.Popen(
            [head.ray, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(REPO), "--",
             sys.executable, "launch/ray_job.py", "-c", str(cfg_path), "--num-workers", "2",
             "--max-failures", "1", "--run-dir", str(run_dir)],
            env=head.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        # the reference runs meanwhile (own graph cache: two runs never write one cache at once)
        ref_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        ref_env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
        reference = subprocess.Popen(_torchrun(cfg_path, ref_dir, "--set", f"graph.cache_dir={tmp_path}/cache_ref"),
                                     env=ref_env, cwd=REPO, stdout=ref_out, stderr=subprocess.STDOUT)
        try:
            killed, seen = _wait_then_kill(head, run_dir, submit, timeout=1500, stall=420)
            t_kill, kill_wall = time.perf_counter() - t1, time.time()
            rc = submit.wait(timeout=900)
            t_job = time.perf_counter() - t1
            ref_rc = reference.wait(timeout=600)
        finally:
            for proc in (submit, reference):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    text = (tmp_path / "submit.log").read_text()
    assert rc == 0 and "succeeded" in text, text[-6000:]
    assert ref_rc == 0, (tmp_path / "ref.log").read_text()[-4000:]
    reference_final = json.loads((ref_dir / "final.json").read_text())

    # the worker group was restarted once, and the new one resumed from a checkpoint (not from step 0)
    starts = _records(run_dir / WORKERS_FILE)
    rank0 = [s for s in starts if s["rank"] == 0]
    assert len(rank0) == 2 and {s["rank"] for s in starts} == {0, 1}, starts
    print(f"head start {head.start_seconds:.1f}s; job {t_job:.1f}s; killed rank 1 (pid {killed}) at step {seen}, "
          f"{t_kill:.1f}s after submit; new worker group resumed {rank0[1]['time'] - kill_wall:.1f}s after the kill, "
          f"from step {rank0[1]['step']}")
    assert rank0[0]["resumed"] is False and rank0[0]["step"] == 0
    assert rank0[1]["resumed"] is True and rank0[1]["step"] >= EVERY and rank0[1]["step"] % EVERY == 0, rank0
    assert rank0[1]["step"] <= seen + EVERY and killed != [s for s in starts if s["rank"] == 1][-1]["pid"]
    # Ray recorded our checkpoints: each Ray checkpoint holds the URL and step of ours
    ray_ckpts = sorted((run_dir / "ray").rglob(RAY_CHECKPOINT_FILE))
    assert ray_ckpts, "no checkpoint was reported to Ray"
    final = json.loads((run_dir / "final.json").read_text())
    assert max(json.loads(p.read_text())["step"] for p in ray_ckpts) == final["steps"]

    # same final metrics as the uninterrupted run
    for key in ("steps", "epochs_run", "best_epoch", "valid", "test"):
        assert final[key] == reference_final[key], (key, final[key], reference_final[key])
