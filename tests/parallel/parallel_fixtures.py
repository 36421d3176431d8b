"""Shared pieces of the distributed-training tests: a tiny config, a single-process reference run
and a per-rank body that trains a DistributedTrainer for a few steps."""
from __future__ import annotations

import os

import torch

from dist_utils import tiny_problem
from goat_dist.config import load_config
from goat_dist.engine.trainer import Trainer

STEPS = 20


def tiny_cfg(root, batch_size: int, *extra: str):
    """A tiny synthetic problem at full fanout and dropout 0 (so world sizes are comparable)."""
    return load_config(None, [*tiny_problem(root), f"train.batch_size={batch_size}", f"train.max_steps={STEPS}",
                              "train.epochs=5", "log.every_steps=1000", *extra])


def steps(trainer, n: int = STEPS) -> list[dict[str, float]]:
    """Run ``n`` training steps (epochs as needed); the loss parts of each step as floats."""
    out = []
    epoch = 0
    while len(out) < n:
        trainer.loader.set_epoch(epoch)
        for batch in trainer.loader:
            out.append({k: float(v) for k, v in trainer.train_step(batch).items()})
            if len(out) == n:
                break
        epoch += 1
    return out


def single_process_run(cfg, run_dir, n: int = STEPS):
    """The reference: the plain single-process Trainer (its own optimisers) for ``n`` steps."""
    trainer = Trainer(cfg, run_dir).build()
    try:
        parts = steps(trainer, n)
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        return parts, state, trainer
    finally:
        trainer.close()


def distributed_body(rank, world_size, cfg, run_dir, n: int = STEPS, evaluate: bool = False):
    """Per-rank body: DistributedTrainer for ``n`` steps; returns parts, full state (and eval)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from goat_dist.engine.distributed import DistributedTrainer

    trainer = DistributedTrainer(cfg, run_dir).build()
    try:
        parts = steps(trainer, n)
        out = {"parts": parts, "state": trainer.full_state_dict()}
        if evaluate:
            out["valid"] = trainer.evaluate("valid")
            out["test"] = trainer.evaluate("test")
        return out
    finally:
        trainer.close()


def max_rel_err(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b)


def assert_states_close(state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 1e-5) -> float:
    """Every parameter/buffer equal to ``atol`` (absolute, on O(0.1..1) values); returns the max error."""
    worst = 0.0
    assert set(state) == set(ref), set(state) ^ set(ref)
    for k, v in ref.items():
        if v.dtype.is_floating_point:
            err = float((state[k].float() - v.float()).abs().max()) if v.numel() else 0.0
            assert err <= atol, f"{k}: max abs error {err:.3g}"
            worst = max(worst, err)
        else:
            assert torch.equal(state[k], v), k
    return worst
