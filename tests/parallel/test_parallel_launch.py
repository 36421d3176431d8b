"""Launch paths: backend choice, ``goat train --nproc`` -> torchrun argv, and (slow) a real
``goat train --nproc 2`` run writing the run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from goat_dist.cli import _torchrun_argv, build_parser
from goat_dist.parallel.process_group import resolve_backend
from parallel_fixtures import tiny_cfg

REPO = Path(__file__).resolve().parents[2]


def test_backend_chosen_in_one_place():
    assert resolve_backend("auto", cuda=False) == "gloo"
    assert resolve_backend("auto", cuda=True) == "nccl"
    assert resolve_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        resolve_backend("nccl", cuda=False)
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("mpi", cuda=False)


def test_nproc_spawns_torchrun_with_the_same_args():
    args = build_parser().parse_args(["train", "-c", "cfg.yaml", "--set", "train.batch_size=8", "--set",
                                      "model.dim=4", "--run-dir", "runs/x", "--nproc", "3"])
    argv = _torchrun_argv(args)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node=3" in argv
    tail = argv[argv.index("goat_dist.train") + 1:]
    assert tail[:2] == ["-c", "cfg.yaml"]
    assert tail[tail.index("--set") + 1] == "train.batch_size=8" and "model.dim=4" in tail
    assert tail[tail.index("--run-dir") + 1] == "runs/x"
    assert build_parser().parse_args(["train", "-c", "c.yaml"]).nproc is None  # single-process trainer


@pytest.mark.slow
def test_goat_train_nproc_2_end_to_end(tmp_path):
    from goat_dist.config import save_config

    cfg = tiny_cfg(tmp_path, 16, "train.max_steps=4")
    save_config(cfg, tmp_path / "tiny.yaml")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "goat_dist.cli", "train", "-c", str(tmp_path / "tiny.yaml"),
                           "--run-dir", str(tmp_path / "run"), "--nproc", "2"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["steps"] == 4 and "recall@10" in final["test"]
