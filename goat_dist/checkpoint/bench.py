"""Checkpoint store throughput: save (DCP write + hashing + manifest), verified select, load.

    python -m goat_dist.checkpoint.bench --mb 256 --world 1 2 --root /tmp/ck_bench --out bench.json

W gloo processes (one torch thread each) each hold ``mb / W`` MB of float32 table rows under
per-rank keys plus a small replicated part; every phase is timed between barriers on rank 0. A fresh
store does the select (so the deep verification really reads every byte); the load that follows
re-uses it (unchanged local files). Results: one JSON object per world size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from goat_dist.checkpoint.store import CheckpointStore
from goat_dist.log import get_logger, setup_logging

log = get_logger("goat_dist.checkpoint.bench")


def _state(rank: int, world: int, mb: float) -> dict:
    rows = max(1, int(mb * 2**20 / 4 / 64 / world))
    g = torch.Generator().manual_seed(rank)
    return {f"table/rank{rank}": torch.randn(rows, 64, generator=g), "dense": torch.ones(256, 256), "step": 7}


def _worker(rank: int, world: int, port: int, mb: float, root: str, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)

    def barrier() -> float:
        if world > 1:
            dist.barrier()
        return time.perf_counter()

    try:
        state = _state(rank, world, mb)
        t0 = barrier()
        url = CheckpointStore(root, keep=1).save(1, state, extra={"bench": True})
        t1 = barrier()
        store = CheckpointStore(root, keep=1)
        store.select(url)
        t2 = barrier()
        target = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}
        store.load(url, target)
        t3 = barrier()
        ok = all(torch.equal(target[k], v) if isinstance(v, torch.Tensor) else target[k] == v for k, v in state.items())
        if rank == 0:
            size = sum(f["size"] for f in store.verify(url)["files"])
            with open(out, "w") as f:
                json.dump({"world": world, "mb": size / 2**20, "save_s": t1 - t0, "select_verify_s": t2 - t1,
                           "load_s": t3 - t2, "save_mb_s": size / 2**20 / (t1 - t0),
                           "verify_mb_s": size / 2**20 / (t2 - t1), "bit_exact": ok}, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(mb: float, world: int, root: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    shutil.rmtree(root, ignore_errors=True)
    mp.start_processes(_worker, args=(world, port, mb, root, out), nprocs=world, start_method="fork")
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    shutil.rmtree(root, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=256, help="total table size in MiB (split over the ranks)")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "goat_ck_bench"))
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    setup_logging("INFO")
    results = []
    for world in args.world:
        res = run(args.mb, world, args.root)
        res["load_avg_1m"] = os.getloadavg()[0]
        log.info("world %d: %s", world, json.dumps(res))
        results.append(res)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
