"""Run a function in W real gloo processes on this machine and collect what each rank returns.

    def body(rank, world_size, x):          # module-level (picklable, for start_method="spawn")
        ...
        return {"loss": loss.detach()}      # anything torch.save can write

    results = run_distributed(body, 2, x)   # [result of rank 0, result of rank 1]

Each child (forked by default, spawned on request) initialises the default process group (gloo,
``tcp://127.0.0.1:<free port>``), runs ``fn(rank, world_size, *args)`` with one intra-op thread, writes the result with ``torch.save`` to
a temporary file, and destroys the group. An exception in any child fails the call with that
child's traceback (torch.multiprocessing re-raises it). Ranks still running after ``timeout_s``
are killed and the call raises ``TimeoutError``: a stuck collective (or a JIT build waiting on a
stale lock) fails the test instead of hanging the suite.
"""
from __future__ import annotations

import os
import socket
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tiny_problem(root) -> list[str]:
    """``--set`` overrides of the tiny synthetic problem the multi-process tests share (60 users,
    40 items, full fanout, dropout 0, so world sizes are comparable); callers add batch size, run
    length, logging and checkpoint keys."""
    return [
        f"data.path={root}/data", "data.generate_if_missing=true",
        "data.synth={users: 60, items: 40, interactions: 900, modalities: {image: 6, text: 5}, "
        "user_profiles: 4, seed: 3}",
        f"graph.cache_dir={root}/cache", "graph.item_knn_k=3", "graph.user_knn_k=3",
        "sampling.fanouts=-1", "model.dim=8", "model.id_layers=2", "model.dropout=0.0", "ot.max_iter=60",
        "ot.tol=0.0", "train.sparse_lr=0.05", "train.dense_lr=0.01", "loss.cmcl_weight=0.5", "loss.l2=0.01",
        "log.tensorboard=false", "eval.ks=[5, 10]", "eval.metric=recall@10", "eval.batch_size=16"]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


DEFAULT_TIMEOUT_S = 1800.0


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, start_method: str = "fork",
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Start ``world_size`` gloo processes running ``fn(rank, world_size, *args)``; return their results.

    ``start_method="fork"`` (default) skips re-importing torch in every child (seconds each on a busy
    machine); use ``"spawn"`` when the parent holds state that must not be forked (CUDA, threads in
    a collective). ``timeout_s``: wall-clock limit of the whole call (generous: the slowest healthy
    call, a first DeepSpeed JIT build on a loaded 2-core machine, takes minutes).
    """
    with tempfile.TemporaryDirectory(prefix="goat_dist_test_") as out_dir:
        ctx = mp.start_processes(_child, args=(fn, world_size, free_port(), out_dir, args), nprocs=world_size,
                                 join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):   # re-raises a child's error
            if time.monotonic() >= deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for r in alive:
                    ctx.processes[r].kill()
                    ctx.processes[r].join(10)
                raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}, world_size={world_size}): "
                                   f"ranks {alive} still running after {timeout_s:.0f} s, killed (a stuck "
                                   f"collective, or a JIT build waiting on a stale lock in ~/.cache/torch_extensions)")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
