"""The on-disk format of a serving export ("bundle"), shared by the writer (``checkpoint/export.py``)
and the reader (``serving/retriever.py``).

A bundle is a folder (any fsspec URL) holding:

| file | content |
|---|---|
| ``manifest.json`` | format, code version, model config, dimensions, metrics, dataset fingerprint, checkpoint, cold-start description, the sha256 and size of every other file, and its own digest |
| ``embeddings.safetensors`` | ``user`` [n_users, d] and ``item`` [n_items, d] float32: the scoring representations (``RecGOAT.compute_all_representations``); score = user @ item.T |
| ``train_items.safetensors`` | ``indptr`` [n_users + 1] int64, ``indices`` [nnz] int32/int64: every user's training items (CSR), excluded from recommendations |
| ``user_ids.tsv`` / ``item_ids.tsv`` | original ids (``index<TAB>id``, the data layer's id-map format); absent when the dataset's ids are already the contiguous integers (manifest ``ids`` says ``identity``) |
| ``cold_start.safetensors`` | modality encoder and OAT alignment weights for embedding new items from features (see ``cold_start.py``); absent when the model has no OAT fusion |
| ``items.faiss`` | optional FAISS inner-product index over the item rows (``faiss.serialize_index`` bytes) |

Design choices:
- No pickle anywhere: tensors are safetensors, everything else JSON / TSV / FAISS's own format.
- Integrity: the manifest records the sha256 of every file; the reader recomputes them before using
  a byte. The manifest carries ``manifest_sha256``, the sha256 of its own canonical JSON (sorted
  keys, no whitespace) without that field, so an edited manifest is detected too. (This detects
  corruption and naive edits, not an adversary who recomputes the digests: that needs a signature.)
- Files are read whole into memory (and verified) before parsing: simple and correct for tables up
  to a few GB; memory-mapping is future work for larger ones.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np

from goat_dist.data.fsio import exists, join, open_url

FORMAT = "goat_dist.serving-bundle/1"
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.safetensors"
TRAIN_ITEMS = "train_items.safetensors"
USER_IDS = "user_ids.tsv"
ITEM_IDS = "item_ids.tsv"
COLD_START = "cold_start.safetensors"
FAISS_INDEX = "items.faiss"
IDENTITY = "identity"
"""Value of ``manifest["ids"][side]`` when original ids are the contiguous integers themselves."""


class BundleError(ValueError):
    """A serving bundle is missing, incomplete, tampered with or inconsistent; the message names the
    file (and key) and what is wrong."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``manifest`` without its ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def write_file(out_url: str, name: str, data: bytes, files: dict[str, dict[str, Any]]) -> None:
    """Write ``data`` to ``out_url/name`` and record its sha256 and size in ``files``."""
    with open_url(join(out_url, name), "wb") as f:
        f.write(data)
    files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}


def write_manifest(out_url: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Seal ``manifest`` with its digest and write it LAST (a bundle without a manifest is incomplete)."""
    manifest = dict(manifest)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    with open_url(join(out_url, MANIFEST), "wb") as f:
        f.write((json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return manifest


def read_manifest(url: str) -> dict[str, Any]:
    """The verified manifest of the bundle at ``url``. Raises BundleError naming what is wrong."""
    path = join(url, MANIFEST)
    if not exists(path):
        raise BundleError(f"{path}: no manifest (not a serving bundle, or an incomplete export)")
    with open_url(path, "rb") as f:
        raw = f.read()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: the top level must be an object")
    for key in ("format", "files", "manifest_sha256", "model", "ids"):
        if key not in manifest:
            raise BundleError(f"{path}: missing key {key!r}")
    if manifest["format"] != FORMAT:
        raise BundleError(f"{path}: format {manifest['format']!r}, this reader understands {FORMAT!r}")
    if manifest["manifest_sha256"] != manifest_digest(manifest):
        raise BundleError(f"{path}: manifest_sha256 does not match the manifest's content "
                          "(the manifest was modified after export)")
    return manifest


def read_file(url: str, name: str, manifest: Mapping[str, Any]) -> bytes:
    """Bytes of ``url/name`` after checking them against the manifest's sha256 and size."""
    entry = manifest["files"].get(name)
    path = join(url, name)
    if entry is None:
        raise BundleError(f"{path}: not listed in the manifest's files")
    if not exists(path):
        raise BundleError(f"{path}: missing (listed in the manifest)")
    with open_url(path, "rb") as f:
        data = f.read()
    if len(data) != entry["bytes"] or sha256_bytes(data) != entry["sha256"]:
        raise BundleError(f"{path}: sha256 {sha256_bytes(data)[:16]}... ({len(data)} bytes) does not match the "
                          f"manifest's {entry['sha256'][:16]}... ({entry['bytes']} bytes): the file was modified "
                          "or truncated after export")
    return data


def load_tensors(url: str, name: str, manifest: Mapping[str, Any],
                 expect: Mapping[str, tuple[tuple[int | None, ...], tuple[str, ...]]]) -> dict[str, np.ndarray]:
    """Verified safetensors file as numpy arrays, each key checked against ``expect``:
    key -> (shape with None for "any", allowed dtype names)."""
    from safetensors.numpy import load

    data = read_file(url, name, manifest)
    try:
        arrays = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise BundleError(f"{join(url, name)}: not a readable safetensors file: {exc}") from None
    for key, (shape, dtypes) in expect.items():
        if key not in arrays:
            raise BundleError(f"{join(url, name)}: missing tensor {key!r} (has {sorted(arrays)})")
        arr = arrays[key]
        ok_shape = len(arr.shape) == len(shape) and all(s is None or s == a for s, a in zip(shape, arr.shape))
        if not ok_shape or arr.dtype.name not in dtypes:
            raise BundleError(f"{join(url, name)}: tensor {key!r} is {arr.dtype.name} {tuple(arr.shape)}, expected "
                              f"{'/'.join(dtypes)} {tuple('*' if s is None else s for s in shape)}")
    return arrays
