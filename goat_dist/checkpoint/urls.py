"""Storage URLs for checkpoints: normalisation and an allow-list.

A checkpoint root comes from a config file or a command line, so it is untrusted text. fsspec will
happily open ``http://``, ``ssh://``, ``data:`` URLs or chain filesystems with ``::`` (e.g.
``simplecache::s3://...``, ``zip://x::file:///y``), and a relative part like ``../../etc`` walks out
of the run directory. :func:`resolve_url` accepts only:

- local paths (absolute or relative to the working directory) and ``file://`` URLs; both normalise
  to a plain absolute path (``/abs/dir``, no trailing slash);
- ``memory://``, ``s3://``, ``gs://``, ``gcs://``, ``az://``, ``abfs://`` (and whatever the caller
  adds to ``protocols``); these normalise to ``proto://path`` with ``.``/empty segments removed and
  no trailing slash.

Never allowed: ``::`` chaining, any ``..`` segment (before or after normalisation), NUL or other
control characters, ``?``/``#`` in remote URLs (query strings select object versions on some stores),
and an empty path. With ``root=...`` the result must be ``root`` itself or lie under it (for local
paths this is checked on the real paths, so a symlink cannot lead out of the root either).
"""
from __future__ import annotations

import os
import re
from typing import Iterable

from goat_dist.checkpoint.errors import CheckpointError

DEFAULT_PROTOCOLS: tuple[str, ...] = ("file", "memory", "s3", "gs", "gcs", "az", "abfs")
"""Protocols accepted by default; local paths (no protocol) are always accepted."""

_PROTO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$", re.DOTALL)
_LOCAL = ("file", "local")


def _allowed(protocols: Iterable[str] | None) -> frozenset[str]:
    allowed = DEFAULT_PROTOCOLS if protocols is None else tuple(protocols)
    return frozenset(p.lower() for p in allowed)


def split_url(url: str) -> tuple[str, str]:
    """``(protocol, path)`` of a URL, protocol ``""`` for a plain local path (no validation)."""
    m = _PROTO.match(url)
    if m is None:
        return "", url
    return m.group(1).lower(), m.group(2)


def resolve_url(url: str, *, root: str | None = None, protocols: Iterable[str] | None = None) -> str:
    """Normalise and validate a storage URL.

    Args:
        url: a local path or ``proto://path`` URL.
        root: when given (itself a URL, resolved with the same rules), the result must equal it or
            lie under it.
        protocols: the allow-list of protocols (default :data:`DEFAULT_PROTOCOLS`); local paths are
            always accepted, ``file://`` only when ``"file"`` is listed.

    Returns:
        The canonical form: an absolute local path, or ``proto://normalised/path``.

    Raises:
        CheckpointError: naming ``url`` and the rule it breaks.
    """
    if not isinstance(url, str):
        raise CheckpointError(f"checkpoint URL {url!r}: must be a string, got {type(url).__name__}")
    if url == "":
        raise CheckpointError("checkpoint URL '': empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise CheckpointError(f"checkpoint URL {url!r}: contains a control character")
    if "::" in url:
        raise CheckpointError(f"checkpoint URL {url!r}: '::' (fsspec URL chaining) is not allowed")
    allowed = _allowed(protocols)
    proto, path = split_url(url)
    if proto == "":
        head = url.split("/", 1)[0]
        if ":" in head:
            # fsspec reads "data:..." and similar as a protocol even without "://".
            raise CheckpointError(f"checkpoint URL {url!r}: looks like a URL without '://' ('{head}'); "
                                  "write a local path or proto://path")
    elif proto not in allowed and not (proto == "local" and "file" in allowed):
        raise CheckpointError(f"checkpoint URL {url!r}: protocol '{proto}' is not allowed "
                              f"(allowed: local paths, {', '.join(sorted(allowed))})")
    segments = path.replace("\\", "/").split("/") if proto in ("", *_LOCAL) else path.split("/")
    if ".." in segments:
        raise CheckpointError(f"checkpoint URL {url!r}: '..' path segments are not allowed")
    if proto in ("", *_LOCAL):
        if proto and (not path.startswith("/") or path.startswith("//")):  # file://host/x names a host
            raise CheckpointError(f"checkpoint URL {url!r}: {proto}:// URLs must name no host and an absolute "
                                  f"path ({proto}:///abs/path)")
        resolved = os.path.normpath(os.path.abspath(path))
    else:
        if "?" in path or "#" in path:
            raise CheckpointError(f"checkpoint URL {url!r}: '?' and '#' are not allowed in a storage URL")
        norm = "/".join(s for s in path.split("/") if s not in ("", "."))
        if not norm:
            raise CheckpointError(f"checkpoint URL {url!r}: empty path")
        resolved = f"{proto}://{norm}"
    if root is not None:
        root_resolved = resolve_url(root, protocols=protocols)
        if not is_under(resolved, root_resolved):
            raise CheckpointError(f"checkpoint URL {url!r}: resolves to {resolved!r}, outside the checkpoint "
                                  f"root {root_resolved!r}")
    return resolved


def is_under(resolved: str, root_resolved: str) -> bool:
    """Whether canonical ``resolved`` equals or lies under canonical ``root_resolved``."""
    p1, a = split_url(resolved)
    p2, b = split_url(root_resolved)
    if p1 != p2:
        return False
    if p1 == "":
        a, b = os.path.realpath(a), os.path.realpath(b)
        return a == b or a.startswith(b.rstrip(os.sep) + os.sep)
    return a == b or a.startswith(b.rstrip("/") + "/")


def join_url(base: str, name: str) -> str:
    """``base/name`` for a canonical ``base`` and a single path segment ``name``."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(f"checkpoint name {name!r} under {base!r}: must be one plain path segment")
    return os.path.join(base, name) if split_url(base)[0] == "" else f"{base}/{name}"
