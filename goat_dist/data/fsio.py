"""Thin fsspec helpers: every reader and writer of the data layer goes through these, so a local
path, ``file://``, ``memory://`` or an object-store URL behave the same.
"""
from __future__ import annotations

import os
from typing import IO

import fsspec


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that serves ``url`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path


def is_local(url: str) -> bool:
    fs, _ = fs_and_path(url)
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def local_path(url: str) -> str | None:
    """The OS path of ``url`` when it is on the local filesystem, else None."""
    fs, path = fs_and_path(url)
    return path if is_local(url) else None


def join(base: str, name: str) -> str:
    """``base/name`` for paths and URLs alike; an absolute path or a URL ``name`` wins."""
    if "://" in name or os.path.isabs(name):
        return name
    return str(base).rstrip("/") + "/" + name


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.isdir(path)


def listdir(url: str) -> list[str]:
    """File names (not paths) directly inside the folder ``url``, sorted."""
    fs, path = fs_and_path(url)
    names = []
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "file":
            names.append(entry["name"].rstrip("/").rsplit("/", 1)[-1])
    return sorted(names)


def open_url(url: str, mode: str = "rb") -> IO:
    """Open ``url`` (binary modes); parent folders are created for writes."""
    if "w" in mode or "a" in mode:
        fs, path = fs_and_path(url)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
    return fsspec.open(str(url), mode).open()


def makedirs(url: str) -> None:
    fs, path = fs_and_path(url)
    fs.makedirs(path, exist_ok=True)
