"""Feature matrices: one ``[rows, dim]`` float16/float32 ``.npy`` per modality (items) or per user
embedding kind.

Design choices:
- Local files are memory-mapped (``np.load(mmap_mode="r")``): a 2M x 512 matrix costs no RAM until
  rows are touched. Remote URLs (``memory://``, object stores) are read into memory once.
- The header is checked before anything else (magic bytes, 2-D, dtype), so a wrong file fails with
  ``FILE: ...`` instead of a numpy traceback. float64 is accepted but converted to float32 in memory
  (logged); any other dtype is an error.
- NaN/Inf are found by a blocked scan (``check_finite``) that names the first bad row and column.
- Discovery in a dataset folder: ``item_<name>.npy`` / ``user_<name>.npy``. The MMRec/MMSSL convention
  ``<name>_feat.npy`` (e.g. tiktok's ``image_feat.npy``) is read as item modality ``<name>`` when no
  ``item_<name>.npy`` exists; when both exist it is ambiguous and an error.
"""
from __future__ import annotations

import io
import mmap
import re

import numpy as np

from goat_dist.data.errors import DataError
from goat_dist.data.fsio import basename, join, listdir, local_path, open_url
from goat_dist.log import get_logger

log = get_logger(__name__)

NPY_MAGIC = b"\x93NUMPY"
ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_SCAN_ROWS = 1 << 16


def _check_header(name: str, head: bytes) -> None:
    if not head.startswith(NPY_MAGIC):
        raise DataError(name, f"not a .npy file (starts with {head[:8]!r}, expected the {NPY_MAGIC!r} magic)")


def load_matrix(url: str, *, name: str | None = None) -> np.ndarray:
    """Load a ``[rows, dim]`` float16/float32 matrix from a ``.npy`` at ``url``.

    Local files come back as a read-only ``np.memmap``; other URLs as an in-memory array.
    Raises DataError (``FILE: ...``) for a non-.npy file, a non-2-D array or a non-float dtype."""
    name = name or basename(url)
    path = local_path(url)
    try:
        if path is not None:
            with open(path, "rb") as f:
                _check_header(name, f.read(8))
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with open_url(url, "rb") as f:
                data = f.read()
            _check_header(name, data[:8])
            arr = np.load(io.BytesIO(data), allow_pickle=False)
    except FileNotFoundError:
        raise DataError(name, f"feature file not found ({url})") from None
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(name, f"cannot read as .npy: {exc}") from None
    if arr.ndim != 2:
        raise DataError(name, f"features must be 2-D [rows, dim], got shape {tuple(arr.shape)} "
                              f"({arr.ndim}-D)")
    if arr.dtype == np.float64:
        log.warning("%s: float64 features converted to float32 in memory (store float16/float32 to mmap)", name)
        arr = np.asarray(arr, dtype=np.float32)
    elif arr.dtype not in ACCEPTED_DTYPES:
        raise DataError(name, f"dtype {arr.dtype} is not supported (expected float16 or float32)")
    return arr


def check_finite(name: str, arr: np.ndarray, block_rows: int = _SCAN_ROWS) -> None:
    """Raise DataError ``FILE: row R: ...`` at the first row holding NaN or +-Inf (blocked scan, so a
    memory-mapped matrix is streamed, never loaded whole)."""
    # a memory-mapped matrix is scanned with plain reads, so the scan does not leave gigabytes of
    # mapped pages counted in this process's resident set
    whole_file = isinstance(arr, np.memmap) and isinstance(arr.base, mmap.mmap) and arr.flags.c_contiguous
    path = getattr(arr, "filename", None) if whole_file else None
    row_bytes = arr.shape[1] * arr.dtype.itemsize if arr.ndim == 2 else 0
    for lo in range(0, arr.shape[0], block_rows):
        n = min(block_rows, arr.shape[0] - lo)
        if path is not None:
            block = np.fromfile(path, dtype=arr.dtype, count=n * arr.shape[1],
                                offset=arr.offset + lo * row_bytes).reshape(n, arr.shape[1])
        else:
            block = np.asarray(arr[lo:lo + n])
        ok = np.isfinite(block)
        if not ok.all():
            r, c = np.argwhere(~ok)[0]
            value = block[r, c]
            what = "NaN" if np.isnan(value) else ("+Inf" if value > 0 else "-Inf")
            raise DataError(name, f"{what} in column {int(c)}", row=lo + int(r))


FEATURE_NORMS = ("none", "standardize", "center_l2")


def normalize_features(arr: np.ndarray, how: str, block_rows: int = _SCAN_ROWS) -> np.ndarray:
    """A normalised float32 copy of ``arr`` [rows, dim] (``data.feature_norm``), built block by block.

    ``standardize``: every column minus its mean over the rows, divided by its standard deviation (a
    constant column becomes 0). ``center_l2``: columns centred, then every row scaled to unit L2 norm
    (an all-zero row stays 0). ``none``: ``arr`` itself. Means and variances are accumulated in
    float64 over two passes (no cancellation for columns with a large mean).

    Pre-extracted CNN/audio features often share a large common component (TikTok's image rows:
    norm ~33, of which the column means make ~31): raw, every item's modality view starts as nearly
    the same large vector that swamps the ID view."""
    if how not in FEATURE_NORMS:
        raise ValueError(f"data.feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {how!r}")
    if how == "none":
        return arr
    n, d = arr.shape
    blocks = range(0, n, block_rows)
    mean = np.zeros(d, np.float64)
    for lo in blocks:
        mean += np.asarray(arr[lo:lo + block_rows], dtype=np.float64).sum(0)
    mean /= max(n, 1)
    scale = np.ones(d, np.float64)
    if how == "standardize":
        var = np.zeros(d, np.float64)
        for lo in blocks:
            var += np.square(np.asarray(arr[lo:lo + block_rows], dtype=np.float64) - mean).sum(0)
        std = np.sqrt(var / max(n, 1))
        scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0)
    out = np.empty((n, d), np.float32)
    for lo in blocks:
        block = (np.asarray(arr[lo:lo + block_rows], dtype=np.float64) - mean) * scale
        if how == "center_l2":
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            block /= np.where(norms > 0, norms, 1.0)
        out[lo:lo + block_rows] = block
    return out


def save_matrix(url: str, arr: np.ndarray) -> None:
    """Write a 2-D array as ``.npy`` to any fsspec URL."""
    with open_url(url, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


_ITEM_RE = re.compile(r"item_(.+)\.npy")
_USER_RE = re.compile(r"user_(.+)\.npy")
_FEAT_RE = re.compile(r"(.+)_feat\.npy")


def discover_features(folder: str) -> tuple[dict[str, str], dict[str, str]]:
    """Feature files in ``folder``: (item name -> URL, user name -> URL).

    ``item_<name>.npy`` and ``user_<name>.npy``; ``<name>_feat.npy`` counts as item modality
    ``<name>`` (MMRec convention) unless ``item_<name>.npy`` also exists (DataError: ambiguous)."""
    items: dict[str, str] = {}
    users: dict[str, str] = {}
    feats: dict[str, str] = {}
    for fname in listdir(folder):
        if m := _ITEM_RE.fullmatch(fname):
            items[m.group(1)] = join(folder, fname)
        elif m := _USER_RE.fullmatch(fname):
            users[m.group(1)] = join(folder, fname)
        elif m := _FEAT_RE.fullmatch(fname):
            feats[m.group(1)] = join(folder, fname)
    for mod, url in feats.items():
        if mod in items:
            raise DataError(basename(url), f"ambiguous: both item_{mod}.npy and {mod}_feat.npy exist; "
                                           "remove one or name the file in data.item_features")
        items[mod] = url
    return items, users
