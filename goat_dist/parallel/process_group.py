"""Process-group set-up: one place decides the backend and the device of this rank.

Design choices:
- The world comes from the launcher's environment: torchrun (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and Ray Train (which sets the same variables for
  its torch workers). No variables (a plain ``python -m goat_dist.train``) means world size 1, which
  goes through the SAME path: a one-rank gloo/nccl group on a free local port, so the distributed
  code never branches on "is there a group".
- Backend: ``auto`` = nccl when CUDA is available, gloo otherwise (``dist.backend`` forces one).
  Nothing assumes a GPU: CPU + gloo is the test backend.
- An already initialised default group (tests, Ray) is adopted, never re-created.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from goat_dist.config import DistConfig
from goat_dist.log import get_logger

log = get_logger(__name__)

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True, slots=True)
class DistEnv:
    """This process's place in the data-parallel world."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool
    """True when ``init_process_group`` created the default group (and ``destroy`` should end it)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_backend(name: str, cuda: bool | None = None) -> str:
    """``auto`` -> nccl on CUDA, gloo otherwise; ``gloo``/``nccl`` as given (nccl needs CUDA)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name not in BACKENDS:
        raise ValueError(f"dist.backend: {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "nccl" if cuda else "gloo"
    if name == "nccl" and not cuda:
        raise ValueError("dist.backend: nccl needs CUDA, which is not available here (use gloo or auto)")
    return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(cfg: DistConfig | None = None) -> DistEnv:
    """Join (or create) the default process group from the launcher's environment.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, Ray Train); without them this is a world
    of one. Returns the :class:`DistEnv`; the device is ``cuda:LOCAL_RANK`` when the backend is nccl,
    the CPU otherwise.
    """
    cfg = cfg or DistConfig()
    owns = False
    if dist.is_initialized():
        # Adopted (Ray Train's TorchConfig backend, a test harness): never re-created, never ended here.
        backend = str(dist.get_backend())
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if cfg.backend != "auto" and cfg.backend != backend:
            raise ValueError(f"dist.backend: {cfg.backend!r} is configured, but the process group that the launcher "
                             f"already initialised uses {backend!r} (with Ray, the launcher passes the backend "
                             "to TorchConfig: use dist.backend=auto or the same name)")
    else:
        backend = resolve_backend(cfg.backend)
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            init = "env://"
        elif world_size == 1:
            init = f"tcp://127.0.0.1:{_free_port()}"
        else:
            raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: launch with "
                               "torchrun (or Ray), which sets them")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world_size)
        owns = True
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank if world_size > 1 and backend == "nccl" else 0)))
    if backend == "nccl":
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    env = DistEnv(rank, world_size, local_rank, device, str(backend), owns)
    log.info("process group: backend %s, world size %d, device %s (%s)", env.backend, world_size, device,
             "created" if owns else "adopted from the launcher")
    return env


def destroy_process_group(env: DistEnv) -> None:
    """End the default group if :func:`init_process_group` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
