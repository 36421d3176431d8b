"""CheckpointStore under real gloo process groups: world-2 round trip with per-rank keys and a
row-sharded DTensor, resharding 2 -> 1 (no process group) and 2 -> 3, agreement on refusals."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo  # noqa: F401  (DTensor imports it on first use: ~5-10 s per forked rank otherwise)
import torch.distributed as dist
from dist_utils import run_distributed
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from goat_dist.checkpoint import CheckpointError, CheckpointStore

ROWS, DIM = 11, 4   # 11 rows: uneven shards for both 2 and 3 ranks


def full_table() -> torch.Tensor:
    return torch.arange(ROWS * DIM, dtype=torch.float32).reshape(ROWS, DIM) / 7


def row_sharded(full: torch.Tensor, rank: int, world: int) -> DTensor:
    """``full`` split by rows over ``world`` ranks (DTensor Shard(0): torch.chunk sizes)."""
    mesh = init_device_mesh("cpu", (world,))
    return DTensor.from_local(full.chunk(world)[rank].clone(), mesh, [Shard(0)], shape=full.shape,
                              stride=full.stride())


def rank_state(rank: int, world: int) -> dict:
    return {
        "emb": row_sharded(full_table(), rank, world),                  # row-wise sharded table
        "dense": {"w": torch.linspace(-1, 1, 6).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)},
        f"rng/rank{rank}": torch.Generator().manual_seed(100 + rank).get_state(),   # per-rank keys
        f"cursor/rank{rank}": 1000 + rank,
        "step": 42, "name": "run",
    }


def zero_state(rank: int, world: int) -> dict:
    return {
        "emb": row_sharded(torch.zeros(ROWS, DIM), rank, world),
        "dense": {"w": torch.zeros(2, 3), "b": torch.zeros(2, dtype=torch.int64)},
        f"rng/rank{rank}": torch.zeros_like(torch.Generator().get_state()),
        f"cursor/rank{rank}": -1, "step": -1, "name": "",
    }


def save_body(rank: int, world: int, root: str) -> str:
    store = CheckpointStore(root, keep=2)
    return store.save(9, rank_state(rank, world), extra={"saved_by": world})


def load_body(rank: int, world: int, root: str, per_rank_from: int | None) -> dict:
    store = CheckpointStore(root, keep=2)
    target = zero_state(rank, world)
    source = rank if per_rank_from is None else per_rank_from
    if per_rank_from is not None:  # a new world reads another rank's per-rank keys
        target.pop(f"rng/rank{rank}"), target.pop(f"cursor/rank{rank}")
        target[f"rng/rank{source}"] = torch.zeros_like(torch.Generator().get_state())
        target[f"cursor/rank{source}"] = -1
    extra = store.load(None, target)
    emb = target["emb"]
    return {"extra": extra, "emb_full": emb.full_tensor(), "emb_local": emb.to_local().clone(),
            "dense": target["dense"], "rng": target[f"rng/rank{source}"], "cursor": target[f"cursor/rank{source}"],
            "step": target["step"], "name": target["name"]}


@pytest.mark.dist
def test_world2_round_trip_per_rank_keys(tmp_path):
    root = f"file://{tmp_path}/ck"
    urls = run_distributed(save_body, 2, root)
    assert urls[0] == urls[1] == f"{tmp_path}/ck/step-9"
    manifest = CheckpointStore(root).verify(urls[0])
    assert manifest["world_size"] == 2
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "extra.json"} == {f["path"] for f in manifest["files"]}
    out = run_distributed(load_body, 2, root, None)
    for rank, res in enumerate(out):
        assert res["extra"] == {"saved_by": 2}
        assert torch.equal(res["emb_full"], full_table())
        assert torch.equal(res["emb_local"], full_table().chunk(2)[rank])
        assert torch.equal(res["rng"], torch.Generator().manual_seed(100 + rank).get_state())
        assert res["cursor"] == 1000 + rank and res["step"] == 42 and res["name"] == "run"
        assert torch.equal(res["dense"]["w"], torch.linspace(-1, 1, 6).reshape(2, 3))


@pytest.mark.dist
def test_reshard_2_to_1_and_3(tmp_path):
    root = str(tmp_path / "ck")
    run_distributed(save_body, 2, root)
    # one process, no process group: the sharded table loads as one plain tensor
    target = {"emb": torch.zeros(ROWS, DIM), "rng/rank1": torch.zeros_like(torch.Generator().get_state()),
              "cursor/rank0": -1, "cursor/rank1": -1, "dense": {"b": torch.zeros(2, dtype=torch.int64)}}
    assert not dist.is_initialized()
    assert CheckpointStore(root).load(None, target) == {"saved_by": 2}
    assert torch.equal(target["emb"], full_table())
    assert torch.equal(target["rng/rank1"], torch.Generator().manual_seed(101).get_state())
    assert (target["cursor/rank0"], target["cursor/rank1"]) == (1000, 1001)
    assert torch.equal(target["dense"]["b"], torch.tensor([1, 2]))
    # three ranks: uneven row shards of 4/4/3 rows; rank r reads saved rank (r % 2)'s per-rank keys
    out = run_distributed(load_body_mod2, 3, root)
    for rank, res in enumerate(out):
        assert torch.equal(res["emb_full"], full_table())
        assert torch.equal(res["emb_local"], full_table().chunk(3)[rank])
        assert torch.equal(res["rng"], torch.Generator().manual_seed(100 + rank % 2).get_state())
        assert res["cursor"] == 1000 + rank % 2


def load_body_mod2(rank: int, world: int, root: str) -> dict:
    return load_body(rank, world, root, rank % 2)


def refused_body(rank: int, world: int, root: str) -> str:
    store = CheckpointStore(root)
    try:
        store.load(None, {"step": -1})
    except CheckpointError as e:
        return str(e)
    return "loaded"


@pytest.mark.dist
def test_refusal_is_raised_on_every_rank(tmp_path):
    root = tmp_path / "ck"
    run_distributed(save_body, 2, str(root))
    (root / "step-9" / "extra.json").write_text('{"saved_by": 3}')   # same size, different bytes
    msgs = run_distributed(refused_body, 2, str(root))
    assert msgs[0] == msgs[1] and "no complete checkpoint" in msgs[0] and "extra.json" in msgs[0]


def select_body(rank: int, world: int, root: str):
    store = CheckpointStore(root)
    try:
        return store.select()
    except CheckpointError as e:
        return str(e)


@pytest.mark.dist
def test_hash_shares_cover_every_file(tmp_path):
    """The ranks split the hashing; a corrupt file in the share of rank 1 is still caught, and
    both ranks agree."""
    from goat_dist.checkpoint.store import _assign

    root = tmp_path / "ck"
    url = run_distributed(save_body, 2, str(root))[0]
    assert run_distributed(select_body, 2, str(root)) == [(url, {"saved_by": 2})] * 2
    files = [(f["path"], f["size"]) for f in CheckpointStore(str(root)).verify(url)["files"]]
    shares = _assign(files, 2)
    assert sorted(shares[0] + shares[1]) == sorted(p for p, _ in files) and shares[1]
    victim = root / "step-9" / shares[1][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    msgs = run_distributed(select_body, 2, str(root))
    assert msgs[0] == msgs[1] and f"{shares[1][0]} sha256" in msgs[0]


def diverging_body(rank: int, world: int, root: str, check: bool):
    store = CheckpointStore(root)
    state = {"dense": {"w": torch.full((3,), float(rank))}, "step": 5, "seen": rank, f"rng/rank{rank}": rank}
    try:
        return store.save(1, state, check_replicated=check)
    except CheckpointError as e:
        return str(e)


@pytest.mark.dist
def test_values_differing_across_ranks_under_one_key_are_refused(tmp_path):
    root = tmp_path / "ck"
    msgs = run_distributed(diverging_body, 2, str(root), True)
    assert msgs[0] == msgs[1] and "only one rank's value: dense.w, seen;" in msgs[0]
    assert CheckpointStore(str(root)).select() is None      # nothing was written
    # what the check prevents: without it, DCP keeps ONE rank's value per key (not even the same
    # rank for every key: this run kept w of rank 0 and seen of rank 1); the other is lost
    url = run_distributed(diverging_body, 2, str(root), False)[0]
    t = {"dense": {"w": torch.zeros(3)}, "seen": -1}
    CheckpointStore(str(root)).load(url, t)
    assert t["seen"] in (0, 1) and any(torch.equal(t["dense"]["w"], torch.full((3,), float(r))) for r in (0, 1))


def bad_input_body(rank: int, world: int, root: str, kind: str):
    store = CheckpointStore(root)
    state = {"x": torch.ones(2)}
    step = 3
    if kind == "value" and rank == 1:
        import numpy as np

        state["rng/rank1"] = np.zeros(2)        # only rank 1 has a bad value
    if kind == "step":
        step = 3 + rank
    try:
        return store.save(step, state)
    except CheckpointError as e:
        return str(e)


@pytest.mark.dist
@pytest.mark.parametrize("kind, reason", [("value", "rank 1: .*'rng/rank1': ndarray"),
                                          ("step", r"different steps \[3, 4\]")])
def test_bad_input_on_one_rank_fails_every_rank(tmp_path, kind, reason):
    import re

    msgs = run_distributed(bad_input_body, 2, str(tmp_path / "ck"), kind)   # no hang: both ranks return
    assert msgs[0] == msgs[1] and re.search(reason, msgs[0])


def subgroup_body(rank: int, world: int, root: str):
    """Rank 0 alone loads through a one-rank group while rank 1 does something else."""
    groups = [dist.new_group([r]) for r in range(world)]   # collective: every rank creates every group
    out = None
    if rank == 0:
        store = CheckpointStore(root)
        target = {"emb": torch.zeros(ROWS, DIM), "cursor/rank1": -1}
        extra = store.load(None, target, process_group=groups[0])
        out = (extra, target["emb"], target["cursor/rank1"])
    dist.barrier()
    return out


@pytest.mark.dist
def test_load_on_one_rank_through_a_subgroup(tmp_path):
    root = str(tmp_path / "ck")
    run_distributed(save_body, 2, root)
    extra, emb, cursor = run_distributed(subgroup_body, 2, root)[0]
    assert extra == {"saved_by": 2} and torch.equal(emb, full_table()) and cursor == 1001
