"""One rank-aware logger for the whole package, and a progress bar that only rank 0 draws.

Library code never prints: it calls ``get_logger(__name__)``. Messages from rank 0 go out at the
configured level; other ranks log WARNING and above only, each line tagged with its rank, so a
world of N processes does not repeat every line N times.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_ROOT = "goat_dist"


def _rank() -> int:
    """The global rank from torchrun's/Ray's environment, or torch.distributed once initialised."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = _rank()
        record.rank = rank
        return rank == 0 or record.levelno >= logging.WARNING


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the stream current at set-up, which a
    test runner or a redirect may since have closed)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the package logger once (idempotent). Called by the CLI and launchers."""
    root = logging.getLogger(_ROOT)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    root.setLevel(level)
    if not any(getattr(h, "_goat", False) for h in root.handlers):
        handler = _StderrHandler()
        handler._goat = True  # type: ignore[attr-defined]
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
    # TorchRec and DeepSpeed put a handler on the ROOT logger; propagating there would print every
    # rank's lines a second time, unfiltered. The rank-aware handler above is the package's only one.
    root.propagate = False


def get_logger(name: str) -> logging.Logger:
    """The package logger for module ``name`` (use ``__name__``)."""
    if not name.startswith(_ROOT):
        name = f"{_ROOT}.{name}"
    return logging.getLogger(name)


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             disable: bool | None = None, **kwargs) -> Iterator[T]:
    """A tqdm progress bar drawn by rank 0 only (and not when stderr is not a terminal, unless
    ``GOAT_PROGRESS=1``). Returns the tqdm object, so ``set_postfix`` and ``update`` work."""
    from tqdm.auto import tqdm

    if disable is None:
        forced = os.environ.get("GOAT_PROGRESS")
        disable = _rank() != 0 or (forced != "1" and not sys.stderr.isatty()) or forced == "0"
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kwargs)
