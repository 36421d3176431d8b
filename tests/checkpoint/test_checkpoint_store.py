"""CheckpointStore in one process: round trips on memory:// / file:// / plain paths, unique names,
keep-last-k, stale incomplete directories, fallback to the newest valid checkpoint, input errors."""
from __future__ import annotations

import json
import logging
import os
import uuid

import fsspec
import pytest
import torch

from goat_dist.checkpoint import CheckpointError, CheckpointStore


def mixed_state(step: int) -> dict:
    """A state dict of several dtypes, nesting and plain values, deterministic in ``step``."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g).double(),
                  "half": torch.randn(4, generator=g).half(), "bf": torch.randn(3, 2, generator=g).bfloat16()},
        "optim": {"step": torch.tensor(step, dtype=torch.int64), "mask": torch.rand(6, generator=g) > 0.5,
                  "counts": torch.randint(0, 1 << 40, (4,), generator=g)},
        "step": step, "lr": 0.125 * step, "tag": f"run-{step}", "blob": bytes([step % 256, 0, 255]),
        "hist": [1, 2, (3, "x")], "none": None,
    }


def zeros_like_state(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = zeros_like_state(v)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = None
    return out


def assert_same(a: dict, b: dict, path: str = "") -> None:
    assert set(a) == set(b), path
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k], f"{path}{k}.")
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{path}{k}"
        else:
            assert a[k] == b[k] and type(a[k]) is type(b[k]), f"{path}{k}: {a[k]!r} != {b[k]!r}"


@pytest.fixture
def memory_root():
    root = f"memory://ck-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["memory", "file", "path"])
def any_root(request, tmp_path, memory_root):
    return {"memory": memory_root, "file": f"file://{tmp_path}/ck", "path": str(tmp_path / "ck")}[request.param]


def test_round_trip(any_root):
    store = CheckpointStore(any_root, keep=3)
    state = mixed_state(5)
    url = store.save(5, state, extra={"config": {"dim": 8}, "valid": 0.5})
    assert url.endswith("/step-5")
    target = zeros_like_state(state)
    extra = store.load(url, target)
    assert extra == {"config": {"dim": 8}, "valid": 0.5}
    assert_same(target, state)
    manifest = store.verify(url)
    assert manifest["step"] == 5 and manifest["world_size"] == 1 and manifest["hmac_sha256"] is None
    assert {f["path"] for f in manifest["files"]} == {".metadata", "__0_0.distcp", "extra.json"}
    assert manifest["code_version"]["torch"] == torch.__version__


def test_load_in_place_subset_and_missing_key(memory_root):
    store = CheckpointStore(memory_root)
    state = mixed_state(1)
    store.save(1, state)
    w = torch.zeros(7, 5)
    target = {"model": {"w": w}, "tag": None}
    store.load("latest", target)
    assert target["model"]["w"] is w and torch.equal(w, state["model"]["w"])  # in place
    assert target["tag"] == "run-1"
    with pytest.raises(CheckpointError, match=r"step-1.*(absent|Missing key).*not_saved|not_saved"):
        store.load(None, {"not_saved": torch.zeros(2)})


def test_unique_names_never_overwrite(memory_root):
    store = CheckpointStore(memory_root, keep=0)
    urls = [store.save(3, {"x": torch.full((2,), float(i))}) for i in range(3)]
    assert [u.rsplit("/", 1)[1] for u in urls] == ["step-3", "step-3.1", "step-3.2"]
    # an incomplete directory holding the name is not overwritten either
    fsspec.filesystem("memory").makedirs(f"{memory_root}/step-4")
    assert store.save(4, {"x": torch.ones(2)}).endswith("/step-4.1")
    for i, url in enumerate(urls):
        t = {"x": torch.zeros(2)}
        store.load(url, t)
        assert torch.equal(t["x"], torch.full((2,), float(i)))
    assert store.list_complete() == urls + [f"{memory_root}/step-4.1"]


def test_keep_last_k_and_stale_incomplete(tmp_path):
    root = tmp_path / "ck"
    store = CheckpointStore(str(root), keep=2)
    store.save(1, {"x": torch.ones(3)})
    (root / "step-2").mkdir()                       # a killed save: no manifest
    (root / "step-2" / "__0_0.distcp").write_bytes(b"partial")
    (root / "step-9").mkdir()                       # newer than anything complete: may be in progress
    (root / "notes").mkdir()                        # not ours: never touched
    for step in (3, 4, 5):
        store.save(step, {"x": torch.full((3,), float(step))})
    names = sorted(p.name for p in root.iterdir())
    assert names == ["notes", "step-4", "step-5", "step-9"]
    assert store.list_complete() == [str(root / "step-4"), str(root / "step-5")]
    assert store.latest() == str(root / "step-5")
    store.save(10, {"x": torch.zeros(3)})
    assert sorted(p.name for p in root.iterdir()) == ["notes", "step-10", "step-5"]


def test_tampered_checkpoint_is_not_pruned(tmp_path):
    root = tmp_path / "ck"
    store = CheckpointStore(str(root), keep=1)
    store.save(1, {"x": torch.ones(3)})
    (root / "step-1" / "stray").write_bytes(b"added later")   # manifest present but does not verify
    store.save(2, {"x": torch.ones(3)})
    store.save(3, {"x": torch.ones(3)})
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-3"]


def test_latest_falls_back_to_newest_valid(tmp_path, caplog):
    root = tmp_path / "ck"
    store = CheckpointStore(str(root), keep=0)
    for step in (1, 2, 3):
        store.save(step, {"x": torch.full((4,), float(step))}, extra={"step": step})
    blob = root / "step-3" / "__0_0.distcp"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    assert store.latest(deep=False) == str(root / "step-3")   # sizes still match
    assert store.latest() == str(root / "step-2")              # the sha256 does not
    t = {"x": torch.zeros(4)}
    with caplog.at_level(logging.WARNING, logger="goat_dist"):
        extra = store.load(None, t)
    assert extra == {"step": 2} and torch.equal(t["x"], torch.full((4,), 2.0))
    assert "step-3" in caplog.text and "sha256" in caplog.text
    with pytest.raises(CheckpointError, match="step-3.*sha256"):
        store.load(str(root / "step-3"), t)                    # an explicit URL never falls back


def test_empty_root(tmp_path):
    store = CheckpointStore(str(tmp_path / "none"))
    assert store.list_complete() == [] and store.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.load(None, {"x": torch.zeros(1)})


def test_bad_inputs(memory_root, tmp_path):
    store = CheckpointStore(memory_root)
    with pytest.raises(CheckpointError, match="step must be an integer >= 0"):
        store.save(-1, {})
    with pytest.raises(CheckpointError, match="step must be an integer"):
        store.save(True, {})
    with pytest.raises(CheckpointError, match="extra is not JSON-serialisable"):
        store.save(1, {"x": torch.ones(1)}, extra={"f": object()})
    with pytest.raises(CheckpointError, match="'opt.rng': ndarray is not a tensor or plain value"):
        import numpy as np

        store.save(1, {"opt": {"rng": np.zeros(3)}})
    assert store.list_complete() == []
    with pytest.raises(CheckpointError, match="keep must be"):
        CheckpointStore(memory_root, keep=-1)
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        store.load(str(tmp_path / "step-1"), {})
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        store.load(f"{memory_root}/notes", {})
    with pytest.raises(CheckpointError, match="'::'"):
        CheckpointStore("simplecache::memory://x")


def test_bare_name_is_under_root(memory_root):
    store = CheckpointStore(memory_root)
    store.save(7, {"x": torch.arange(3.0)})
    t = {"x": torch.zeros(3)}
    store.load("step-7", t)
    assert torch.equal(t["x"], torch.arange(3.0))


def test_hmac_key_from_environment(monkeypatch, memory_root):
    monkeypatch.setenv("GOAT_CHECKPOINT_HMAC_KEY", "s3cret")
    store = CheckpointStore(memory_root)
    url = store.save(1, {"x": torch.ones(2)})
    manifest = store.verify(url)
    assert isinstance(manifest["hmac_sha256"], str) and len(manifest["hmac_sha256"]) == 64
    assert CheckpointStore(memory_root, hmac_key=b"s3cret").verify(url) == manifest
    with pytest.raises(CheckpointError, match="HMAC does not match"):
        CheckpointStore(memory_root, hmac_key=b"other").verify(url)
    monkeypatch.delenv("GOAT_CHECKPOINT_HMAC_KEY")
    # without a key the file hashes still verify (with a warning that authenticity is unchecked)
    assert CheckpointStore(memory_root).verify(url)["step"] == 1


def test_manifest_is_json_with_every_file(tmp_path):
    store = CheckpointStore(str(tmp_path), hmac_key=b"k")
    url = store.save(2, {"x": torch.ones(2)}, extra={"a": 1})
    manifest = json.loads((tmp_path / "step-2" / "MANIFEST.json").read_text())
    on_disk = sorted(p for p in os.listdir(url) if p != "MANIFEST.json")
    assert sorted(f["path"] for f in manifest["files"]) == on_disk
    assert all(f["size"] == os.path.getsize(os.path.join(url, f["path"])) for f in manifest["files"])
    assert manifest["name"] == "step-2" and manifest["created"] and manifest["created_unix"] > 0


def test_select_returns_verified_extra(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=0)
    assert store.select() is None
    (tmp_path / "ck" / "step-5").mkdir(parents=True)   # no manifest: not a candidate
    assert store.select("latest") is None
    url1 = store.save(1, {"x": torch.ones(2)}, extra={"layout": {"world_size": 1}})
    assert store.select() == (url1, {"layout": {"world_size": 1}})
    assert store.load(url1, {}) == {"layout": {"world_size": 1}}   # extra only, no tensors
    (tmp_path / "ck" / "step-1" / "extra.json").write_text('{"layout": {"world_size": 9}}')
    with pytest.raises(CheckpointError, match="no complete checkpoint verifies.*extra.json"):
        store.select()
    with pytest.raises(CheckpointError, match="extra.json has"):
        store.select(url1)


def test_deep_verification_is_reused_only_while_files_are_unchanged(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "ck"))
    url = store.save(1, {"x": torch.arange(100.0)})
    hashed = []
    real = CheckpointStore._sha256
    monkeypatch.setattr(CheckpointStore, "_sha256", lambda self, n, rel: hashed.append(rel) or real(self, n, rel))
    assert store.latest() == url and len(hashed) == 3
    t = {"x": torch.zeros(100)}
    store.load(None, t)                                  # unchanged: not hashed again
    assert len(hashed) == 3 and torch.equal(t["x"], torch.arange(100.0))
    assert store.verify(url) and len(hashed) == 6        # verify() always reads every byte
    # same size, original mtime restored: the ctime still changes, so the load re-hashes and refuses
    blob = tmp_path / "ck" / "step-1" / "__0_0.distcp"
    st = blob.stat()
    data = bytearray(blob.read_bytes())
    data[-20] ^= 1
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CheckpointError, match="__0_0.distcp sha256"):
        store.load(url, t)
    assert len(hashed) > 6


def test_symlinks_are_not_checkpoints(tmp_path):
    store = CheckpointStore(str(tmp_path / "ck"), keep=0)
    url = store.save(1, {"x": torch.ones(2)})
    other = CheckpointStore(str(tmp_path / "other"))
    other_url = other.save(5, {"x": torch.zeros(2)})
    os.symlink(other_url, tmp_path / "ck" / "step-5")        # a whole checkpoint elsewhere
    assert store.list_complete() == [url] and store.latest() == url
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        store.load(str(tmp_path / "ck" / "step-5"), {"x": torch.zeros(2)})
    blob = tmp_path / "ck" / "step-1" / "__0_0.distcp"     # a file replaced by a link to a copy
    (tmp_path / "copy").write_bytes(blob.read_bytes())
    blob.unlink()
    os.symlink(tmp_path / "copy", blob)
    with pytest.raises(CheckpointError, match="__0_0.distcp is a symlink"):
        store.verify(url)


def test_prune_never_removes_the_checkpoint_just_saved(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path / "ck"), keep=2)
    for step in (100, 200):
        store.save(step, {"x": torch.ones(1)})          # an earlier run's checkpoints
    with caplog.at_level(logging.WARNING, logger="goat_dist"):
        url = store.save(10, {"x": torch.zeros(1)})     # a new run restarting at a lower step
    assert os.path.isdir(url) and store.verify(url)["step"] == 10
    assert "newer-step checkpoint" in caplog.text and "step-200" in caplog.text
    assert store.latest().endswith("step-200")
