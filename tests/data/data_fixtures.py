"""Fixtures of the data-layer tests (imported by each test module: a conftest.py here would shadow
tests/conftest.py): unique memory:// folders (cleaned up) and tiny dataset writers."""
from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest


@pytest.fixture
def mem_url():
    """A fresh ``memory://`` folder URL, removed after the test."""
    root = f"memory://goat-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _write_text(path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with fsspec.open(str(path), "wb") as f:
        f.write(data)


def _write_goat(folder, train="0 1 2\n1 0\n", valid="0 3\n", test="1 2\n", **features) -> None:
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        if text is not None:
            _write_text(f"{folder}/{name}.txt", text)
    for name, arr in features.items():
        with fsspec.open(f"{folder}/{name}.npy", "wb") as f:
            np.save(f, arr)


@pytest.fixture
def write_text():
    """``write_text(path_or_url, str | bytes)``."""
    return _write_text


@pytest.fixture
def write_goat():
    """``write_goat(folder, train=..., valid=..., test=..., item_image=array, ...)``: a goat-format
    folder (4 users x 4 items by default); a split given as None is not written."""
    return _write_goat
