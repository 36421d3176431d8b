"""Tampered checkpoints are refused with CheckpointError BEFORE anything is unpickled.

Every case starts from a booby-trapped checkpoint: its DCP ``.metadata`` is replaced by a pickle
whose loading creates a marker file, and the manifest is rewritten (and re-signed with the right
key) to match it, so verification of the untouched trap passes. The control test shows that plain
DCP does execute it. Each tamper case then changes one thing; the load must fail with
CheckpointError and the marker must not exist.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from goat_dist.checkpoint import CheckpointError, CheckpointStore
from goat_dist.checkpoint.store import _hmac

KEY = b"test-key"


class _Trap:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _resign(ckpt: Path, key: bytes | None, edit=None) -> None:
    """Recompute every file entry of ``ckpt``'s manifest from disk (as an attacker who can write the
    directory would), apply ``edit(manifest)``, and sign with ``key`` (None: no HMAC)."""
    mpath = ckpt / "MANIFEST.json"
    manifest = json.loads(mpath.read_text())
    manifest["files"] = [{"path": p.name, "size": p.stat().st_size,
                          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                         for p in sorted(ckpt.iterdir()) if p.name != "MANIFEST.json"]
    if edit is not None:
        edit(manifest)
    manifest["hmac_sha256"] = _hmac(key, manifest) if key is not None else None
    mpath.write_text(json.dumps(manifest))


@pytest.fixture
def trapped(tmp_path):
    """(store, checkpoint dir, marker path) of a booby-trapped checkpoint signed with KEY."""
    import pickle

    store = CheckpointStore(str(tmp_path / "ck"), hmac_key=KEY)
    url = store.save(1, {"x": torch.arange(6.0), "n": 3}, extra={"a": 1})
    ckpt = Path(url)
    marker = tmp_path / "PWNED"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Trap(str(marker))))
    _resign(ckpt, KEY)
    store.verify(url)  # the trap itself passes verification: only the unpickler guard stops it
    return store, ckpt, marker


def test_control_plain_dcp_executes_the_trap(trapped):
    _, ckpt, marker = trapped
    with pytest.raises(BaseException):
        dcp.load({"x": torch.zeros(6)}, storage_reader=dcp.FileSystemReader(str(ckpt)), no_dist=True)
    assert marker.exists(), "the crafted .metadata should run code under plain DCP (test is void otherwise)"


def test_restricted_unpickler_refuses_the_trap_even_when_the_manifest_matches(trapped):
    store, ckpt, marker = trapped
    with pytest.raises(CheckpointError, match=r"builtins|io.*open.*not allowed"):
        store.load(str(ckpt), {"x": torch.zeros(6)})
    assert not marker.exists()


def _flip(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _edit_manifest(ckpt: Path, fn) -> None:
    """Edit the manifest WITHOUT re-signing (the attacker lacks the key)."""
    mpath = ckpt / "MANIFEST.json"
    manifest = json.loads(mpath.read_text())
    fn(manifest)
    mpath.write_text(json.dumps(manifest))


def _entry(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["files"] if e["path"] == name)


CASES = {
    # file contents
    "flip byte in .distcp": (lambda c: _flip(c / "__0_0.distcp", 100), "__0_0.distcp sha256"),
    "flip byte in .metadata": (lambda c: _flip(c / ".metadata", 5), ".metadata sha256"),
    "flip byte in extra.json": (lambda c: _flip(c / "extra.json", 1), "extra.json sha256"),
    "truncate .distcp": (lambda c: (c / "__0_0.distcp").write_bytes((c / "__0_0.distcp").read_bytes()[:-1]),
                         "__0_0.distcp has"),
    "add a file": (lambda c: (c / "__0_1.distcp").write_bytes(b"x"), "not listed in the manifest"),
    "remove a file": (lambda c: (c / "extra.json").unlink(), "missing"),
    # manifest edits, not re-signed
    "manifest size": (lambda c: _edit_manifest(c, lambda m: _entry(m, ".metadata").update(size=1)), "HMAC"),
    "manifest hash": (lambda c: _edit_manifest(c, lambda m: _entry(m, ".metadata").update(sha256="0" * 64)), "HMAC"),
    "manifest drops a file": (lambda c: _edit_manifest(c, lambda m: m["files"].pop()), "HMAC"),
    "manifest adds a file": (lambda c: _edit_manifest(c, lambda m: m["files"].append(
        {"path": "more", "size": 0, "sha256": "0" * 64})), "HMAC"),
    "manifest HMAC removed": (lambda c: _edit_manifest(c, lambda m: m.update(hmac_sha256=None)), "no HMAC"),
    "manifest HMAC wrong": (lambda c: _edit_manifest(c, lambda m: m.update(hmac_sha256="ab" * 32)),
                            "HMAC does not match"),
    "manifest HMAC not hex": (lambda c: _edit_manifest(c, lambda m: m.update(hmac_sha256="é" * 64)),
                              "not 64 hex digits"),
    "manifest deeply nested": (lambda c: (c / "MANIFEST.json").write_text("[" * 100000 + "]" * 100000),
                               "not valid JSON"),
    "manifest re-signed with another key": (lambda c: _resign(c, b"attacker"), "HMAC does not match"),
    "manifest not JSON": (lambda c: (c / "MANIFEST.json").write_bytes(b"\x80\x04K\x01."), "not valid JSON"),
    "manifest missing": (lambda c: (c / "MANIFEST.json").unlink(), "no MANIFEST.json"),
    "manifest path escapes": (lambda c: _resign(c, KEY, lambda m: m["files"].append(
        {"path": "../x", "size": 0, "sha256": "0" * 64})), "bad or repeated path"),
    "copied from another step": (lambda c: _resign(c, KEY, lambda m: m.update(name="step-2", step=2)),
                                 "names directory 'step-2'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tamper_refused_before_unpickling(trapped, case):
    store, ckpt, marker = trapped
    tamper, reason = CASES[case]
    tamper(ckpt)
    with pytest.raises(CheckpointError, match=reason) as info:
        store.load(str(ckpt), {"x": torch.zeros(6), "n": 0})
    assert str(ckpt) in str(info.value)  # names the checkpoint
    with pytest.raises(CheckpointError):
        store.verify(str(ckpt))
    assert store.list_complete(deep=True) == [] and store.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.load("latest", {"x": torch.zeros(6)})
    assert not marker.exists()


def test_unkeyed_store_still_checks_hashes_and_refuses_trap(trapped, caplog):
    """Without the key a store cannot authenticate the manifest (a warning says so) but still
    checks every hash and never runs the trap."""
    _, ckpt, marker = trapped
    store = CheckpointStore(str(ckpt.parent))
    assert os.environ.get("GOAT_CHECKPOINT_HMAC_KEY") is None
    _flip(ckpt / "__0_0.distcp", 100)
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(str(ckpt), {"x": torch.zeros(6)})
    assert "authenticity is NOT checked" in caplog.text
    assert not marker.exists()


def test_non_plain_value_in_distcp_is_refused(tmp_path):
    """A pickled object smuggled into a .distcp value (with a consistent, unsigned manifest) is
    refused by the weights-only load of non-tensor values."""
    import io
    import pickle

    store = CheckpointStore(str(tmp_path / "ck"))
    url = store.save(1, {"x": torch.arange(3.0), "note": "hello"})
    marker = tmp_path / "PWNED2"
    ckpt = Path(url)
    # rebuild the data file with the 'note' value replaced by a trap of the same byte layout
    buf = io.BytesIO()
    torch.save(_Trap(str(marker)), buf)
    trap_bytes = buf.getvalue()
    from goat_dist.checkpoint.store import _MetadataUnpickler

    meta = _MetadataUnpickler(io.BytesIO((ckpt / ".metadata").read_bytes())).load()
    index, info = next((k, v) for k, v in meta.storage_data.items() if k.fqn == "note")
    data = (ckpt / info.relative_path).read_bytes()
    new = data[:info.offset] + trap_bytes + data[info.offset + info.length:]
    delta = len(trap_bytes) - info.length
    for k, v in list(meta.storage_data.items()):  # items after it in the same file shift
        if v.relative_path == info.relative_path and v.offset > info.offset:
            meta.storage_data[k] = dataclasses.replace(v, offset=v.offset + delta)
    meta.storage_data[index] = dataclasses.replace(info, length=len(trap_bytes))
    (ckpt / "__0_0.distcp").write_bytes(new)
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    _resign(ckpt, None)
    store.verify(url)
    with pytest.raises(CheckpointError, match="'note': not a plain value"):
        store.load(url, {"note": ""})
    assert not marker.exists()
    # control: DCP's own planner unpickles the value with weights_only=False and runs the trap
    dcp.load({"note": ""}, storage_reader=dcp.FileSystemReader(url), no_dist=True)
    assert marker.exists()
