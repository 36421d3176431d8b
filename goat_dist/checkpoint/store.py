"""Atomic, verified, sharded checkpoints on any allow-listed fsspec URL.

Layout of a checkpoint root::

    <root>/step-120/            one checkpoint (``step-120.1`` etc. if the name was taken)
        __0_0.distcp ...        torch.distributed.checkpoint (DCP) data, one file per rank
        .metadata               DCP metadata (a pickle: never read before the manifest verified)
        extra.json              the caller's JSON dict (resolved config, metrics, ...)
        MANIFEST.json           written LAST, by rank 0, through a temporary name and a rename

A directory is a checkpoint if and only if its ``MANIFEST.json`` exists and verifies. The manifest
lists every other file of the directory (relative path, size, sha256), the step, the world size,
the creation time and the code version, and carries an HMAC-SHA256 over its body when a key is set
(``hmac_key=`` or ``GOAT_CHECKPOINT_HMAC_KEY``). Because the manifest is written after every rank's
data is on storage and becomes visible in one rename, a process killed at any moment leaves either
a complete checkpoint or a directory without a manifest, which every reader ignores and the next
save removes. Pruning deletes a checkpoint's manifest first, so a killed prune never leaves a
directory that looks complete but is not.

Loading verifies the checkpoint (HMAC, names, the exact file set, sizes, sha256 of every byte)
before DCP opens anything: the ranks hash size-balanced shares of the files, group rank 0 decides
and broadcasts the verdict, so every rank loads or every rank raises the same CheckpointError. DCP
itself reads its ``.metadata`` with plain pickle and non-tensor values with
``torch.load(weights_only=False)``: a crafted file would execute code, which is why nothing reaches
DCP unverified. Beyond that, the reader used here unpickles ``.metadata`` with an allow-list of
DCP's own metadata classes and loads non-tensor values with ``weights_only=True`` (plain Python
values: numbers, strings, bytes, None and lists/tuples/dicts of them; :meth:`CheckpointStore.save`
refuses anything else up front), so even a checkpoint whose manifest an attacker could rewrite (no
HMAC key) cannot run code at load. Symlinked checkpoint directories or files are refused.

Resharding is DCP's: a checkpoint written by W ranks (plain tensors, ``ShardedTensor``, ``DTensor``)
loads into any world size, or into one process without a process group; loading a subset of the
saved keys works. Plain tensors and non-tensor values are treated as replicated: DCP keeps ONE copy
per key (not even from the same rank for every key), so values that differ per rank must live under
per-rank keys (``rng/rank0``, ...); ``save`` compares them across ranks and refuses otherwise.

The root must be storage that every rank sees (a shared filesystem or an object store): ranks hash
files written by other ranks. One writer per root: pruning removes directories without a manifest
that are older than the newest complete checkpoint. ``memory://`` is per process (tests, one rank).
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import hmac
import io
import json
import os
import pickle
import posixpath
import re
import subprocess
import time
import warnings
from typing import Any, Iterable

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException

from goat_dist.checkpoint.errors import CheckpointError
from goat_dist.checkpoint.urls import join_url, resolve_url, split_url
from goat_dist.log import get_logger

log = get_logger(__name__)

MANIFEST = "MANIFEST.json"
EXTRA = "extra.json"
MANIFEST_FORMAT = "goat_dist.checkpoint.manifest/1"
HMAC_ENV = "GOAT_CHECKPOINT_HMAC_KEY"
MAX_MANIFEST_BYTES = 64 << 20
_NAME = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# Helpers: process groups, hashing, code version.


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast(obj: Any, process_group) -> Any:
    """``obj`` of the group's rank 0 on every rank of the group (identity without a group)."""
    if not _dist_on():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, group=process_group, group_src=0)
    return box[0]


def _body_bytes(manifest: dict) -> bytes:
    """The canonical bytes the HMAC covers: the manifest without its ``hmac_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "hmac_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hmac(key: bytes, manifest: dict) -> str:
    return hmac.new(key, _body_bytes(manifest), hashlib.sha256).hexdigest()


def _assign(files: list[tuple[str, int]], world: int) -> list[list[str]]:
    """Deterministic, size-balanced split of ``(path, size)`` over ``world`` ranks: largest file first,
    each to the rank with the fewest bytes so far (ties: lowest rank)."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for rel, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = min(range(world), key=lambda i: (load[i], i))
        shares[r].append(rel)
        load[r] += size
    return shares


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """Package version, git commit (None outside a checkout) and torch version, for the manifest."""
    try:
        from importlib.metadata import version

        pkg = version("goat_dist")
    except Exception:  # not installed as a distribution (e.g. run from the source tree)
        pkg = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"goat_dist": pkg, "git": commit, "torch": torch.__version__}


# --------------------------------------------------------------------------------------------------
# Hardened DCP reading: .metadata through an allow-list unpickler, non-tensor values weights-only.

_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
    "torch.distributed.checkpoint.storage",
)
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``Metadata`` and nothing else: DCP's dataclasses/enums, torch dtypes, layouts,
    memory formats and sizes. Any other global (``os.system``, ``builtins.open``, ...) is refused."""

    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            obj = super().find_class(module, name)
            # Only classes defined in DCP's metadata modules (dataclasses, enums): constructing them
            # runs no code an attacker chooses. Functions and imported names are refused.
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        elif (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)  # dtypes, layouts, memory formats: constants, not callables
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


class _SafeReaderMixin:
    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
            except Exception as e:
                raise CheckpointError(f"{path}: refused to unpickle DCP metadata: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: DCP metadata is a {type(metadata).__name__}, not Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeFileSystemReader(_SafeReaderMixin, FileSystemReader):
    pass


class _SafeFsspecReader(_SafeReaderMixin, FsspecReader):
    pass


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values load with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint value '{fqn}': not a plain value (weights_only load refused: "
                                  f"{str(e).splitlines()[0]})") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _plain(value: Any) -> bool:
    """Whether a non-tensor value round-trips through ``torch.load(weights_only=True)``."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, bytearray, torch.Size,
                                           torch.dtype)):
        return True
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return isinstance(value, torch.Tensor)


def _check_values(state_dict: dict, prefix: str = "") -> None:
    """Refuse (at save, where the mistake is made) values that a weights-only load cannot read."""
    for key, value in state_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _check_values(value, f"{name}.")
        elif isinstance(value, torch.Tensor) or hasattr(value, "__tensor_flatten__"):
            continue
        elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
            continue  # DCP Stateful: it calls state_dict() itself
        elif not _plain(value):
            raise CheckpointError(f"checkpoint value '{name}': {type(value).__name__} is not a tensor or plain "
                                  "value (numbers, strings, bytes, None, lists/tuples/dicts of those); convert "
                                  "it (e.g. numpy arrays to tensors)")


def _replicated_digests(state_dict: dict, prefix: str = "") -> dict[str, str]:
    """``{dotted key: sha256}`` of every value DCP treats as replicated (everything but DTensor /
    ShardedTensor): plain tensors by dtype, shape and bytes, other values by ``repr``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    out: dict[str, str] = {}
    for key, value in state_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_replicated_digests(value, f"{name}."))
        elif isinstance(value, (DTensor, ShardedTensor)) or hasattr(value, "load_state_dict"):
            continue
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool
                         else t.to(torch.uint8).numpy().tobytes())
            out[name] = h.hexdigest()
        else:
            out[name] = hashlib.sha256(repr(value).encode()).hexdigest()
    return out


def _agree_on_inputs(step: int, state_dict: dict, root: str, process_group, check_replicated: bool) -> None:
    """COLLECTIVE: every rank raises the same CheckpointError if any rank's input is bad (so no rank
    is left waiting in a later collective), if the ranks pass different steps, or (with
    ``check_replicated``) if a key that is not sharded holds different values on different ranks:
    DCP keeps ONE copy of such a key, so the other ranks' values would be lost silently; per-rank
    values belong under per-rank keys (``rng/rank{r}``)."""
    try:
        _check_values(state_dict)
        mine: tuple[str | None, int, dict | None] = (
            None, step, _replicated_digests(state_dict) if check_replicated else None)
    except CheckpointError as e:
        mine = (str(e), step, None)
    if not _dist_on():
        if mine[0] is not None:
            raise CheckpointError(mine[0])
        return
    world = dist.get_world_size(process_group)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=process_group)
    errors = [f"rank {r}: {g[0]}" for r, g in enumerate(gathered) if g[0] is not None]
    if errors:
        raise CheckpointError("; ".join(errors))
    steps = sorted({g[1] for g in gathered})
    if len(steps) > 1:
        raise CheckpointError(f"checkpoint root {root}: the ranks passed different steps {steps}")
    if check_replicated:
        digests = [g[2] for g in gathered]
        differ = sorted(k for k in set().union(*digests) if len({d[k] for d in digests if k in d}) > 1)
        if differ:
            shown = ", ".join(differ[:10]) + (f" (+{len(differ) - 10} more)" if len(differ) > 10 else "")
            raise CheckpointError(f"checkpoint root {root}: these keys are neither sharded (DTensor/ShardedTensor) "
                                  f"nor equal on every rank, and DCP would keep only one rank's value: {shown}; "
                                  "put per-rank values under per-rank keys (e.g. 'rng/rank{r}'), or pass "
                                  "check_replicated=False")


# --------------------------------------------------------------------------------------------------


class CheckpointStore:
    """Checkpoints under one root URL: atomic save, verified load, keep-last-k.

    Args:
        root: directory URL (local path, ``file:///x``, ``memory://ck``, ``s3://bucket/run``, ...),
            validated by :func:`~goat_dist.checkpoint.urls.resolve_url`.
        keep: number of newest complete checkpoints kept after each save (0 = keep all).
        hmac_key: key of the manifest HMAC; default ``os.environ["GOAT_CHECKPOINT_HMAC_KEY"]``
            (utf-8) when set. With a key, a manifest without a valid HMAC is refused.
        protocols: allow-listed URL protocols (default
            :data:`~goat_dist.checkpoint.urls.DEFAULT_PROTOCOLS`).
    """

    def __init__(self, root: str, *, keep: int = 3, hmac_key: bytes | str | None = None,
                 protocols: Iterable[str] | None = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise CheckpointError(f"checkpoint root {root!r}: keep must be an integer >= 0 (0 = keep all), "
                                  f"got {keep!r}")
        self.protocols = None if protocols is None else tuple(protocols)
        self.root = resolve_url(root, protocols=self.protocols)
        self.keep = keep
        if hmac_key is None:
            env = os.environ.get(HMAC_ENV, "")
            hmac_key = env.encode("utf-8") if env else None
        elif isinstance(hmac_key, str):
            hmac_key = hmac_key.encode("utf-8")
        if hmac_key is not None and (not isinstance(hmac_key, bytes) or not hmac_key):
            raise CheckpointError(f"checkpoint root {self.root!r}: hmac_key must be non-empty bytes")
        self._key = hmac_key
        self._local = split_url(self.root)[0] == ""
        self.fs, self._fs_root = fsspec.core.url_to_fs(self.root)
        self._warned_unkeyed = False
        self._verified: dict[str, tuple] = {}  # name -> file signature at its last deep verification

    def __repr__(self) -> str:
        return f"CheckpointStore({self.root!r}, keep={self.keep}, hmac={'on' if self._key else 'off'})"

    # ---------------------------------------------------------------------------------------------- paths

    def _fs_path(self, name: str) -> str:
        return os.path.join(self._fs_root, name) if self._local else posixpath.join(self._fs_root, name)

    def _manifest_path(self, name: str) -> str:
        return os.path.join(self._fs_path(name), MANIFEST) if self._local else self._fs_path(f"{name}/{MANIFEST}")

    def _name_of(self, url: str) -> str:
        """The checkpoint directory name of ``url`` (a URL under the root, or a bare name)."""
        if isinstance(url, str) and url and "/" not in url and "\\" not in url and "://" not in url:
            url = join_url(self.root, url)
        resolved = resolve_url(url, root=self.root, protocols=self.protocols)
        if self._local:
            rel = os.path.relpath(os.path.realpath(resolved), os.path.realpath(self.root))
        else:
            rel = resolved[len(self.root):].lstrip("/")
        if "/" in rel or "\\" in rel or not _NAME.match(rel):
            raise CheckpointError(f"checkpoint URL {url!r}: not a checkpoint directory (step-<N>[.<k>]) directly "
                                  f"under the root {self.root!r}")
        return rel

    def _entries(self) -> list[tuple[tuple[int, int], str]]:
        """``((step, k), name)`` of every checkpoint-named entry under the root, oldest first."""
        try:
            listing = self.fs.ls(self._fs_root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for path in listing:
            name = posixpath.basename(str(path).rstrip("/"))
            m = _NAME.match(name)
            if not m:
                continue
            if self._local and os.path.islink(os.path.join(self._fs_root, name)):
                log.warning("checkpoint root %s: ignoring %s, a symlink (checkpoints are real directories)",
                            self.root, name)
                continue
            out.append(((int(m.group(1)), int(m.group(2) or 0)), name))
        return sorted(out)

    # ---------------------------------------------------------------------------------------------- verify

    def _read_manifest(self, name: str) -> dict:
        url = join_url(self.root, name)
        mpath = self._manifest_path(name)
        try:
            with self.fs.open(mpath, "rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {url}: no {MANIFEST} (incomplete: the save did not finish)") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"checkpoint {url}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
            raise CheckpointError(f"checkpoint {url}: {MANIFEST} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"checkpoint {url}: {MANIFEST} is not a {MANIFEST_FORMAT} manifest")
        # The HMAC first: nothing else in an unauthenticated manifest is worth reading.
        tag = manifest.get("hmac_sha256")
        if self._key is not None:
            if not isinstance(tag, str) or not tag:
                raise CheckpointError(f"checkpoint {url}: {MANIFEST} has no HMAC but a key is set")
            if _HEX64.match(tag) is None:
                raise CheckpointError(f"checkpoint {url}: {MANIFEST} HMAC is not 64 hex digits")
            if not hmac.compare_digest(tag, _hmac(self._key, manifest)):
                raise CheckpointError(f"checkpoint {url}: {MANIFEST} HMAC does not match (tampered, or a "
                                      "different key)")
        elif tag is not None and not self._warned_unkeyed:
            self._warned_unkeyed = True
            log.warning("checkpoint %s: manifest carries an HMAC but no key is set (%s): its authenticity is "
                        "NOT checked, only the file hashes", url, HMAC_ENV)
        m = _NAME.match(name)
        assert m is not None
        if manifest.get("name") != name:
            raise CheckpointError(f"checkpoint {url}: manifest names directory {manifest.get('name')!r}, not "
                                  f"{name!r} (copied from another checkpoint?)")
        if manifest.get("step") != int(m.group(1)) or isinstance(manifest.get("step"), bool):
            raise CheckpointError(f"checkpoint {url}: manifest step {manifest.get('step')!r} does not match the "
                                  "directory name")
        files = manifest.get("files")
        if not isinstance(files, list) or not files:
            raise CheckpointError(f"checkpoint {url}: manifest 'files' must be a non-empty list")
        seen = set()
        for i, entry in enumerate(files):
            ok = (isinstance(entry, dict) and set(entry) == {"path", "size", "sha256"}
                  and isinstance(entry["path"], str) and isinstance(entry["size"], int)
                  and not isinstance(entry["size"], bool) and entry["size"] >= 0
                  and isinstance(entry["sha256"], str) and _HEX64.match(entry["sha256"]) is not None)
            if not ok:
                raise CheckpointError(f"checkpoint {url}: manifest files[{i}] is malformed: {entry!r}")
            rel = entry["path"]
            parts = rel.split("/")
            if (not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts)
                    or rel in (MANIFEST, MANIFEST + ".tmp") or rel in seen):
                raise CheckpointError(f"checkpoint {url}: manifest files[{i}] has a bad or repeated path {rel!r}")
            seen.add(rel)
        if ".metadata" not in seen:
            raise CheckpointError(f"checkpoint {url}: manifest lists no DCP .metadata")
        return manifest

    def _list_files(self, name: str) -> dict[str, int]:
        """``{relative path: size}`` of every file in checkpoint ``name`` except the manifest."""
        base = self._fs_path(name)
        if self._local:
            if os.path.islink(base):
                raise CheckpointError(f"checkpoint {join_url(self.root, name)}: is a symlink")
            for dirpath, dirnames, filenames in os.walk(base):
                for entry in dirnames + filenames:
                    if os.path.islink(os.path.join(dirpath, entry)):
                        raise CheckpointError(f"checkpoint {join_url(self.root, name)}: "
                                              f"{os.path.relpath(os.path.join(dirpath, entry), base)} is a symlink")
        out = {}
        for path, info in self.fs.find(base, withdirs=False, detail=True).items():
            rel = str(path)[len(base):].lstrip("/")
            if self._local:
                rel = os.path.relpath(str(path), base).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = int(info.get("size") or 0)
        return out

    def _sha256(self, name: str, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self._fs_path(f"{name}/{rel}") if not self._local else
                          os.path.join(self._fs_path(name), *rel.split("/")), "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def _verify(self, name: str, *, deep: bool) -> dict:
        """Check checkpoint ``name`` in this process; ``deep``: also every sha256. Returns the manifest."""
        manifest = self._verify_files(name)
        if deep:
            self._check_hashes(name, manifest, {e["path"]: self._sha256(name, e["path"]) for e in manifest["files"]})
        return manifest

    def _verify_files(self, name: str) -> dict:
        """The cheap checks: manifest (format, name, HMAC), exact file set, sizes."""
        url = join_url(self.root, name)
        manifest = self._read_manifest(name)
        listed = {e["path"]: e for e in manifest["files"]}
        present = self._list_files(name)
        missing = sorted(set(listed) - set(present))
        extra = sorted(set(present) - set(listed))
        if missing:
            raise CheckpointError(f"checkpoint {url}: files listed in the manifest are missing: {missing}")
        if extra:
            raise CheckpointError(f"checkpoint {url}: files not listed in the manifest: {extra}")
        for rel, entry in listed.items():
            if present[rel] != entry["size"]:
                raise CheckpointError(f"checkpoint {url}: {rel} has {present[rel]} bytes, the manifest says "
                                      f"{entry['size']}")
        return manifest

    def _check_hashes(self, name: str, manifest: dict, digests: dict[str, str]) -> None:
        url = join_url(self.root, name)
        for entry in manifest["files"]:
            digest = digests.get(entry["path"])
            if digest is None or not hmac.compare_digest(digest, entry["sha256"]):
                raise CheckpointError(f"checkpoint {url}: {entry['path']} sha256 {digest} does not match the "
                                      f"manifest ({entry['sha256']})")

    def _signature(self, name: str) -> tuple | None:
        """For local checkpoints: (path, inode, size, mtime, ctime) of every file including the manifest.
        Any write, replacement or rename changes it (ctime cannot be set back from user space), so a
        deep verification can be reused while the signature is unchanged. None for remote storage
        (always re-hashed)."""
        if not self._local:
            return None
        base = self._fs_path(name)
        sig = []
        for dirpath, _, filenames in os.walk(base):
            for fn in filenames:
                st = os.stat(os.path.join(dirpath, fn))
                sig.append((os.path.relpath(os.path.join(dirpath, fn), base), st.st_ino, st.st_size,
                            st.st_mtime_ns, st.st_ctime_ns))
        return tuple(sorted(sig))

    def _deep_plan(self, name: str) -> tuple[dict, list[tuple[str, int]] | None, tuple | None]:
        """(manifest, files still to hash or None when an unchanged earlier deep verification of this
        process covers them, signature). Raises CheckpointError on the cheap checks."""
        manifest = self._verify_files(name)
        sig = self._signature(name)
        if sig is not None and self._verified.get(name) == sig:
            return manifest, None, sig
        return manifest, [(e["path"], e["size"]) for e in manifest["files"]], sig

    def _hash_share(self, name: str, rels: list[str]) -> dict[str, str] | str:
        out = {}
        for rel in rels:
            try:
                out[rel] = self._sha256(name, rel)
            except Exception as e:
                return f"checkpoint {join_url(self.root, name)}: cannot read {rel}: {type(e).__name__}: {e}"
        return out

    def _collective_hashes(self, name: str, files: list[tuple[str, int]], process_group) -> dict[str, str] | str:
        """COLLECTIVE: every rank hashes a size-balanced share of ``files`` (known on every rank);
        group rank 0 gets ``{path: sha256}`` or the first error message (other ranks: ``{}``)."""
        on = _dist_on()
        world = dist.get_world_size(process_group) if on else 1
        rank = dist.get_rank(process_group) if on else 0
        mine = self._hash_share(name, _assign(files, world)[rank])
        if not on:
            return mine
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(mine, gathered, group=process_group, group_dst=0)
        if rank != 0:
            return {}
        merged: dict[str, str] = {}
        for part in gathered:
            if isinstance(part, str):
                return part
            merged.update(part)
        return merged

    def verify(self, url: str) -> dict:
        """Verify checkpoint ``url`` completely in this process, reading every byte: manifest format
        and name, HMAC (when a key is set), the exact file set, every file's size and sha256. Returns
        the manifest; raises :class:`CheckpointError` naming the URL and the first defect."""
        return self._verify(self._name_of(url), deep=True)

    def list_complete(self, *, deep: bool = False) -> list[str]:
        """URLs of the complete checkpoints, oldest to newest (by step, then the ``.k`` suffix).

        Complete = the manifest exists, parses, matches its directory, its HMAC verifies (when a key
        is set) and the directory holds exactly the listed files with the listed sizes. ``deep=True``
        also checks every sha256 (reads every byte); :meth:`load` always does.
        """
        out = []
        for _, name in self._entries():
            try:
                self._verify(name, deep=deep)
            except (CheckpointError, OSError):
                continue
            out.append(join_url(self.root, name))
        return out

    def latest(self, *, deep: bool = True) -> str | None:
        """The newest checkpoint that verifies completely (the one ``load("latest")`` would load), or
        None. Not collective: this process reads every byte (once; an unchanged local checkpoint is
        not re-hashed by the same store). ``deep=False``: the newest that passes the cheap checks of
        :meth:`list_complete`. Under torch.distributed, :meth:`select` does the same with the hashing
        spread over the ranks."""
        for _, name in reversed(self._entries()):
            try:
                if deep:
                    manifest, files, sig = self._deep_plan(name)
                    if files is not None:
                        self._check_hashes(name, manifest, {rel: self._sha256(name, rel) for rel, _ in files})
                        if sig is not None:
                            self._verified[name] = sig
                else:
                    self._verify_files(name)
            except (CheckpointError, OSError):
                continue
            return join_url(self.root, name)
        return None

    # ---------------------------------------------------------------------------------------------- save

    def _new_dir(self, step: int) -> str:
        """Create and return a fresh checkpoint directory name for ``step`` (never an existing one)."""
        taken = {name for _, name in self._entries()}
        self.fs.makedirs(self._fs_root, exist_ok=True)
        for k in range(0, 10_000):
            name = f"step-{step}" if k == 0 else f"step-{step}.{k}"
            if name in taken:
                continue
            try:
                self.fs.makedirs(self._fs_path(name), exist_ok=False)
            except FileExistsError:
                continue
            return name
        raise CheckpointError(f"checkpoint root {self.root}: no free directory name for step {step}")

    def _write_atomic(self, name: str, filename: str, data: bytes) -> None:
        """Write ``name/filename`` through ``filename.tmp`` and a rename (fsynced on local disks)."""
        if self._local:
            d = self._fs_path(name)
            tmp, final = os.path.join(d, filename + ".tmp"), os.path.join(d, filename)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            tmp, final = self._fs_path(f"{name}/{filename}.tmp"), self._fs_path(f"{name}/{filename}")
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)

    def _write_plain(self, name: str, filename: str, data: bytes) -> None:
        path = os.path.join(self._fs_path(name), filename) if self._local else self._fs_path(f"{name}/{filename}")
        with self.fs.open(path, "wb") as f:
            f.write(data)
            if self._local:
                f.flush()
                os.fsync(f.fileno())

    def _writer(self, name: str):
        if self._local:
            return FileSystemWriter(self._fs_path(name), single_file_per_rank=True, sync_files=True, thread_count=1)
        # Object stores need no fsync (and FsspecWriter would fall back to a machine-wide os.sync()).
        return FsspecWriter(join_url(self.root, name), single_file_per_rank=True, sync_files=False, thread_count=1)

    def _reader(self, name: str):
        if self._local:
            return _SafeFileSystemReader(self._fs_path(name))
        return _SafeFsspecReader(join_url(self.root, name))

    def save(self, step: int, state_dict: dict, *, extra: dict | None = None, process_group=None,
             check_replicated: bool = True) -> str:
        """Write checkpoint ``step`` (COLLECTIVE when torch.distributed is initialised).

        Every rank passes its own ``state_dict`` (tensors, ShardedTensor/DTensor, nested dicts, plain
        values). Order: rank 0 creates a fresh ``step-<step>`` directory (``step-<step>.<k>`` if the
        name is taken) and writes ``extra.json``; DCP writes every rank's data and ``.metadata``;
        barrier; every rank hashes a size-balanced share of the files; rank 0 writes ``MANIFEST.json``
        atomically; barrier; rank 0
        prunes to the newest ``keep`` complete checkpoints and removes incomplete directories older
        than the new one. Returns the checkpoint URL (the same on every rank).

        ``check_replicated``: first compare, across ranks, a sha256 of every value that is not a
        DTensor/ShardedTensor, and refuse the save (on every rank) if a key differs between ranks:
        DCP would silently keep only one rank's copy. Costs one hash of those values per rank.
        """
        t0 = time.perf_counter()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint root {self.root}: step must be an integer >= 0, got {step!r}")
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"checkpoint root {self.root}: state_dict must be a dict, got "
                                  f"{type(state_dict).__name__}")
        on = _dist_on()
        rank = dist.get_rank(process_group) if on else 0
        world = dist.get_world_size(process_group) if on else 1
        _agree_on_inputs(step, state_dict, self.root, process_group, check_replicated and world > 1)

        # 1. rank 0: the directory and extra.json; every rank learns the name, or rank 0's error.
        name, error = None, None
        if rank == 0:
            try:
                extra_bytes = json.dumps({} if extra is None else extra, sort_keys=True, indent=1).encode("utf-8")
                if extra is not None and not isinstance(extra, dict):
                    raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
                name = self._new_dir(step)
                self._write_plain(name, EXTRA, extra_bytes)
            except (TypeError, ValueError) as e:
                error = f"checkpoint root {self.root}: extra is not JSON-serialisable: {e}"
            except Exception as e:  # any failure here must reach every rank, not leave them waiting
                error = f"checkpoint root {self.root}: cannot create the checkpoint directory: {type(e).__name__}: {e}"
        name, error = _broadcast((name, error), process_group)
        if error is not None:
            raise CheckpointError(error)
        url = join_url(self.root, name)

        # 2. every rank: DCP data (+ .metadata by the coordinator).
        try:
            with _quiet_single_process(on):
                dcp.save(state_dict, storage_writer=self._writer(name), process_group=process_group, no_dist=not on)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"checkpoint {url}: DCP save failed (left incomplete, no manifest): "
                                  f"{_short(e)}") from e
        if on:
            dist.barrier(group=process_group)
        t_write = time.perf_counter()

        # 3. every rank hashes a share of the files; rank 0 writes the manifest last, atomically.
        listing = None
        if rank == 0:
            try:
                files = self._list_files(name)
                tmp = sorted(r for r in files if r.endswith(".tmp"))
                listing = (sorted(files.items()), None if not tmp else
                           f"checkpoint {url}: temporary files left by the writer: {tmp}")
            except Exception as e:
                listing = ([], f"checkpoint {url}: cannot list the written files: {type(e).__name__}: {e}")
        listing, error = _broadcast(listing, process_group)
        if error is not None:
            raise CheckpointError(error)
        digests = self._collective_hashes(name, listing, process_group)
        t_hash = time.perf_counter()
        error = None
        if rank == 0:
            try:
                if isinstance(digests, str):
                    raise CheckpointError(digests)
                manifest = {
                    "format": MANIFEST_FORMAT,
                    "name": name,
                    "step": step,
                    "world_size": world,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                    "created_unix": time.time(),
                    "code_version": code_version(),
                    "files": [{"path": rel, "size": size, "sha256": digests[rel]} for rel, size in listing],
                }
                manifest["hmac_sha256"] = _hmac(self._key, manifest) if self._key is not None else None
                self._write_atomic(name, MANIFEST, json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8"))
            except Exception as e:
                error = f"checkpoint {url}: writing the manifest failed (left incomplete): {type(e).__name__}: {e}"
        error = _broadcast(error, process_group)
        if error is not None:
            raise CheckpointError(error)

        # 4. rank 0: keep-last-k and stale incomplete directories.
        if rank == 0:
            try:
                self.prune(protect=name)
            except Exception as e:  # a failed prune never fails a save that is already complete
                log.warning("checkpoint root %s: pruning failed: %s", self.root, e)
            size = sum(size for _, size in listing)
            log.info("checkpoint %s: step %d, world %d, %.1f MB, %.2f s (DCP write %.2f s, hashing %.2f s)", url,
                     step, world, size / 1e6, time.perf_counter() - t0, t_write - t0, t_hash - t_write)
        return url

    def prune(self, *, protect: str | None = None) -> list[str]:
        """Remove all but the newest ``keep`` complete checkpoints (by step, then ``.k``), and
        directories without a manifest that are older than the newest complete one (failed or killed
        saves). Never removes ``protect`` (the checkpoint :meth:`save` just wrote, even when the root
        holds higher steps of an earlier run). Directories whose manifest exists but does not verify
        are left alone (with a warning): they may be evidence, or this process may hold the wrong
        HMAC key. Returns the removed URLs. Not collective: rank 0 calls it from :meth:`save`."""
        complete, incomplete = [], []
        for order, name in self._entries():
            try:
                self._verify(name, deep=False)
                complete.append((order, name))
            except CheckpointError:
                if self.fs.exists(self._manifest_path(name)):
                    log.warning("checkpoint %s: manifest present but does not verify; not pruning it",
                                join_url(self.root, name))
                else:
                    incomplete.append((order, name))
        if not complete:
            return []
        newest = complete[-1][0]
        doomed = [name for order, name in incomplete if order < newest]
        if self.keep > 0:
            doomed += [name for _, name in complete[:-self.keep]]
        if protect is not None and protect in doomed:
            doomed.remove(protect)
            log.warning("checkpoint %s: the root holds %d newer-step checkpoint(s) (newest %s, perhaps from an "
                        "earlier run): latest() / load('latest') choose those, not this one; give a new run its "
                        "own checkpoint root", join_url(self.root, protect), len(complete) - 1, complete[-1][1])
        removed = []
        for name in doomed:
            self._remove(name)
            removed.append(join_url(self.root, name))
        if removed:
            log.info("checkpoint root %s: pruned %s", self.root, ", ".join(posixpath.basename(u) for u in removed))
        return removed

    def _remove(self, name: str) -> None:
        """Delete a checkpoint directory, its manifest first (so it never looks complete half-gone)."""
        base = self._fs_path(name)
        mpath = self._manifest_path(name)
        if self.fs.exists(mpath):
            self.fs.rm(mpath)
        self.fs.rm(base, recursive=True)

    # ---------------------------------------------------------------------------------------------- load

    def _candidates(self, url: str | None) -> tuple[list[str], bool]:
        """(checkpoint names to try in order, whether ``url`` named one explicitly). For "latest": the
        directories that have a manifest, newest first (directories without one are saves that never
        finished, not candidates)."""
        if url is None or url == "latest":
            names = [name for _, name in reversed(self._entries())]
            return [n for n in names if self.fs.exists(self._manifest_path(n))], False
        return [self._name_of(url)], True

    def select(self, url: str | None = "latest", *, process_group=None) -> tuple[str, dict] | None:
        """``(checkpoint URL, extra dict)`` of checkpoint ``url`` (None / ``"latest"``: the newest one
        that verifies), verified completely, or None when ``"latest"`` finds no checkpoint with a
        manifest at all. COLLECTIVE when torch.distributed is initialised: the ranks hash shares of
        the files, group rank 0 decides, every rank gets the same answer or the same
        :class:`CheckpointError` (an explicit URL that does not verify; or checkpoints exist but
        none verifies). Newer checkpoints that do not verify are skipped with a warning. Reads no
        pickle. Use it to read a checkpoint's ``extra`` (config, layout) before building the state
        dict to :meth:`load` into; the load that follows re-uses the verification of an unchanged
        local checkpoint instead of hashing it again."""
        found = self._select(url, process_group)
        return None if found is None else (join_url(self.root, found[0]), found[1])

    def _reason(self, e: Exception, what: str | None) -> str:
        """A refusal message: CheckpointError's own (it names the URL), else naming ``what``."""
        if isinstance(e, CheckpointError):
            return str(e)
        where = join_url(self.root, what) if what and _NAME.match(what) else (what or self.root)
        return f"checkpoint {where}: {type(e).__name__}: {e}"

    def _select(self, url: str | None, process_group) -> tuple[str, dict] | None:
        on = _dist_on()
        rank = dist.get_rank(process_group) if on else 0
        plan: tuple[list[str], bool, str | None] = ([], False, None)
        if rank == 0:
            try:
                plan = (*self._candidates(url), None)
            except Exception as e:  # every failure on rank 0 must reach every rank (no rank left waiting)
                plan = ([], True, self._reason(e, url))
        candidates, explicit, error = _broadcast(plan, process_group)
        if error is not None:
            raise CheckpointError(error)
        failures: list[str] = []
        for name in candidates:
            step1: tuple[str, Any] = ("fail", None)
            manifest, sig = None, None
            if rank == 0:
                try:
                    manifest, files, sig = self._deep_plan(name)
                    step1 = ("ok", files)
                except Exception as e:
                    step1 = ("fail", self._reason(e, name))
            status, payload = _broadcast(step1, process_group)
            if status == "fail":
                failures.append(payload)
                continue
            digests = self._collective_hashes(name, payload, process_group) if payload is not None else None
            verdict: tuple[dict | None, str | None] = (None, None)
            if rank == 0:
                try:
                    if isinstance(digests, str):
                        raise CheckpointError(digests)
                    if digests is not None:
                        self._check_hashes(name, manifest, digests)
                        if sig is not None:
                            self._verified[name] = sig
                    verdict = (self._read_extra(name, manifest), None)
                except Exception as e:
                    verdict = (None, self._reason(e, name))
            extra, error = _broadcast(verdict, process_group)
            if error is not None:
                failures.append(error)
                continue
            for reason in failures:
                log.warning("skipping a newer checkpoint that does not verify: %s", reason)
            return name, extra
        if explicit:
            raise CheckpointError(failures[0])
        if not candidates:
            return None
        raise CheckpointError(f"checkpoint root {self.root}: no complete checkpoint verifies ({len(failures)} "
                              f"refused: {'; '.join(failures)})")

    def _read_extra(self, name: str, manifest: dict) -> dict:
        entry = next((e for e in manifest["files"] if e["path"] == EXTRA), None)
        if entry is None:
            return {}
        path = os.path.join(self._fs_path(name), EXTRA) if self._local else self._fs_path(f"{name}/{EXTRA}")
        with self.fs.open(path, "rb") as f:
            raw = f.read(entry["size"] + 1)
        # Re-check the bytes actually parsed (the file could change between verify and this read).
        if len(raw) != entry["size"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"checkpoint {join_url(self.root, name)}: {EXTRA} changed after verification")
        try:
            extra = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
            raise CheckpointError(f"checkpoint {join_url(self.root, name)}: {EXTRA} is not valid JSON ({e})") from None
        if not isinstance(extra, dict):
            raise CheckpointError(f"checkpoint {join_url(self.root, name)}: {EXTRA} is not a JSON object")
        return extra

    def saved_keys(self, url: str) -> set[str]:
        """The flattened keys (``"optim.dense.state.3.exp_avg"``, ...) checkpoint ``url`` holds, from
        its DCP metadata (reads one small file; no verification: :meth:`load` does that)."""
        name = url.rstrip("/").rsplit("/", 1)[-1]
        try:
            return set(self._reader(name).read_metadata().state_dict_metadata)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {join_url(self.root, name)}: cannot read its DCP metadata: {e}") from e

    def load(self, url: str | None, state_dict: dict, *, process_group=None) -> dict:
        """Load checkpoint ``url`` (None or ``"latest"``: the newest that verifies) IN PLACE into
        ``state_dict`` (COLLECTIVE when torch.distributed is initialised). Returns its extra dict.

        The checkpoint is verified completely before DCP reads anything (see :meth:`select`: the
        ranks hash shares of the files, rank 0 decides and broadcasts the verdict), so a refused
        checkpoint raises :class:`CheckpointError` on every rank. For
        ``"latest"``, newer checkpoints that do not verify are skipped with a warning. ``state_dict``
        may hold a subset of the saved keys and any sharding (resharding is DCP's); a key absent from
        the checkpoint is an error.
        """
        if not isinstance(state_dict, dict):
            raise CheckpointError(f"checkpoint root {self.root}: state_dict must be a dict, got "
                                  f"{type(state_dict).__name__}")
        on = _dist_on()
        found = self._select(url, process_group)
        if found is None:
            raise CheckpointError(f"checkpoint root {self.root}: no complete checkpoint to load")
        name, extra = found
        target = join_url(self.root, name)
        t0 = time.perf_counter()
        try:
            with _quiet_single_process(on):
                dcp.load(state_dict, storage_reader=self._reader(name), planner=_WeightsOnlyLoadPlanner(),
                         process_group=process_group, no_dist=not on)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {target}: DCP load failed: {_short(e)}") from e
        log.info("loaded checkpoint %s in %.2f s", target, time.perf_counter() - t0)
        return extra


@contextlib.contextmanager
def _quiet_single_process(distributed: bool):
    """DCP warns on every single-process save/load that it 'assumes' one process; here that is the
    documented intent, so the warning is noise."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def _short(e: BaseException) -> str:
    """The per-rank causes of a DCP failure, without DCP's tracebacks."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        text = "; ".join(parts)
    else:
        text = f"{type(e).__name__}: {e}"
    return text if len(text) < 4000 else text[:4000] + " ..."
