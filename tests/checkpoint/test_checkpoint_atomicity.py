"""SIGKILL at random moments never leaves a checkpoint that looks complete but is not.

A forked child saves checkpoints in a loop (keep=3, so it also prunes) into a root that already
holds checkpoints; the test kills it with SIGKILL at 20 random moments. After every kill: each
directory with a manifest verifies (sha256 of every byte) and the newest loads bit-exact (values
are a function of the step); directories without a manifest are ignored by list_complete/latest; a
checkpoint that was complete before the kill is either byte-identical or gone (pruned, manifest
first). Finally a normal save removes the stale incomplete directories.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import torch

from goat_dist.checkpoint import CheckpointStore

KILLS = 20


def state_for(step: int) -> dict:
    return {"w": torch.arange(4096, dtype=torch.float32) * (step + 0.5),
            "m": {"i": torch.full((3, 5), step, dtype=torch.int64), "h": torch.ones(7).half() * (step % 97)},
            "step": step, "tag": f"s{step}"}


def zeros_state() -> dict:
    return {"w": torch.zeros(4096), "m": {"i": torch.zeros(3, 5, dtype=torch.int64), "h": torch.zeros(7).half()},
            "step": -1, "tag": ""}


def _saver(root: str, first_step: int) -> None:  # runs in the forked child until killed
    torch.set_num_threads(1)
    store = CheckpointStore(root, keep=3)
    step = first_step
    while True:
        store.save(step, state_for(step), extra={"step": step})
        step += 1


def _snapshot(root: Path) -> dict[str, dict[str, str]]:
    """{checkpoint name: {file: sha256}} of every directory that has a manifest."""
    out = {}
    for d in sorted(root.iterdir()):
        if (d / "MANIFEST.json").exists():
            out[d.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}
    return out


def _check_loads(store: CheckpointStore, url: str) -> None:
    target = zeros_state()
    extra = store.load(url, target)
    step = extra["step"]
    want = state_for(step)
    assert target["step"] == step and target["tag"] == want["tag"]
    assert torch.equal(target["w"], want["w"]) and torch.equal(target["m"]["i"], want["m"]["i"])
    assert torch.equal(target["m"]["h"], want["m"]["h"])


def test_sigkill_never_leaves_a_false_complete_checkpoint(tmp_path):
    rng = random.Random(20261123)
    root = tmp_path / "ck"
    store = CheckpointStore(str(root), keep=3)
    for step in (0, 1):
        store.save(step, state_for(step), extra={"step": step})
    before = _snapshot(root)
    ctx = mp.get_context("fork")
    interrupted = 0
    saved = 0
    t0 = time.monotonic()
    for k in range(KILLS):
        child = ctx.Process(target=_saver, args=(str(root), 10 + 1000 * k), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL

        names = sorted(p.name for p in root.iterdir())
        with_manifest = [n for n in names if (root / n / "MANIFEST.json").exists()]
        without = [n for n in names if n not in with_manifest]
        interrupted += bool(without)
        # every directory with a manifest verifies completely; the others are ignored
        for n in with_manifest:
            store.verify(str(root / n))
        complete = store.list_complete()
        assert [os.path.basename(u) for u in complete] == sorted(with_manifest, key=_order)
        assert store.latest() == (complete[-1] if complete else None)
        if complete:
            _check_loads(store, complete[-1])
        # a checkpoint complete before this kill is unchanged, or gone entirely (or mid-prune with
        # its manifest already removed: then it is not complete any more)
        after = _snapshot(root)
        for n, files in before.items():
            if n in after:
                assert after[n] == files, f"kill {k}: complete checkpoint {n} changed"
        saved += len(set(after) - set(before))
        before = after
    for url in store.list_complete():
        _check_loads(store, url)
    # kills landed in the middle of saves/prunes, and the children did complete saves
    assert interrupted >= 1 and saved >= 1, (interrupted, saved)
    # a normal save removes every stale incomplete directory
    store.save(10**6, state_for(10**6), extra={"step": 10**6})
    left = sorted(p.name for p in root.iterdir())
    assert all((root / n / "MANIFEST.json").exists() for n in left), left
    assert len(left) == 3
    assert time.monotonic() - t0 < 120


def _order(name: str) -> tuple[int, int]:
    step, _, k = name[len("step-"):].partition(".")
    return int(step), int(k or 0)
