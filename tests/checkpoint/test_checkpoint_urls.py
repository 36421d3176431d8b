"""resolve_url: protocol allow-list, no '::' chaining, no '..', results stay under the root."""
from __future__ import annotations

import os

import pytest

from goat_dist.checkpoint import CheckpointError, resolve_url


def test_local_paths_and_file_urls_normalise_to_absolute_paths(tmp_path):
    assert resolve_url(str(tmp_path / "a" / "." / "b/")) == str(tmp_path / "a" / "b")
    assert resolve_url(f"file://{tmp_path}/a//b") == str(tmp_path / "a" / "b")
    assert resolve_url("rel/dir") == os.path.join(os.getcwd(), "rel", "dir")


def test_remote_urls_normalise():
    assert resolve_url("memory://ck/") == "memory://ck"
    assert resolve_url("memory:///ck/./x") == "memory://ck/x"
    assert resolve_url("S3://bucket//run/ck") == "s3://bucket/run/ck"
    for proto in ("gs", "gcs", "az", "abfs"):
        assert resolve_url(f"{proto}://b/k") == f"{proto}://b/k"


@pytest.mark.parametrize("url, rule", [
    ("http://example.com/ck", "protocol 'http' is not allowed"),
    ("ssh://host/x", "protocol 'ssh' is not allowed"),
    ("hdfs://nn/x", "protocol 'hdfs' is not allowed"),
    ("simplecache::s3://b/k", "'::'"),
    ("zip://x::file:///tmp/a.zip", "'::'"),
    ("data:text/plain,abc", "without '://'"),
    ("/tmp/a/../b", "'..'"),
    ("s3://bucket/../other", "'..'"),
    ("file://host/tmp/x", "no host"),
    ("file://relative/x", "no host"),
    ("memory://", "empty path"),
    ("s3://b/k?versionId=3", "'?' and '#'"),
    ("/tmp/a\x00b", "control character"),
    ("", "empty"),
])
def test_rules(url, rule):
    with pytest.raises(CheckpointError, match=rule) as info:
        resolve_url(url)
    assert repr(url) in str(info.value)  # the error names the URL


def test_allow_list_is_configurable(tmp_path):
    assert resolve_url("hdfs://nn/x", protocols=["hdfs"]) == "hdfs://nn/x"
    with pytest.raises(CheckpointError, match="protocol 'memory' is not allowed"):
        resolve_url("memory://x", protocols=["s3"])
    with pytest.raises(CheckpointError, match="protocol 'file' is not allowed"):
        resolve_url(f"file://{tmp_path}", protocols=["s3"])
    assert resolve_url(str(tmp_path), protocols=[]) == str(tmp_path)  # local paths always allowed


def test_root_containment(tmp_path):
    root = str(tmp_path / "ck")
    assert resolve_url(f"{root}/step-1", root=root) == f"{root}/step-1"
    assert resolve_url(root, root=f"file://{root}") == root
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        resolve_url(str(tmp_path / "ck2" / "step-1"), root=root)  # a prefix is not a parent
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        resolve_url("memory://ck/step-1", root=root)
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        resolve_url("memory://ckx", root="memory://ck")
    assert resolve_url("memory:///ck/step-2", root="memory://ck") == "memory://ck/step-2"


def test_symlink_out_of_root_is_outside(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "ck" / "step-1")
    with pytest.raises(CheckpointError, match="outside the checkpoint root"):
        resolve_url(str(tmp_path / "ck" / "step-1"), root=str(tmp_path / "ck"))


def test_hash_assignment_is_balanced_and_deterministic():
    from goat_dist.checkpoint.store import _assign

    files = [("a", 100), ("b", 60), ("c", 50), ("d", 10), ("e", 0)]
    assert _assign(files, 2) == [["a", "d", "e"], ["b", "c"]]   # 110 / 110 bytes
    assert _assign(files, 1) == [["a", "b", "c", "d", "e"]]
    assert _assign(files[:1], 3) == [["a"], [], []]
    assert _assign(list(reversed(files)), 2) == _assign(files, 2)
