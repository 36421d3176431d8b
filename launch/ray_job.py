"""Ray Train launch: the SAME engine as torchrun (``DistributedTrainer(cfg, run_dir, env).build()``,
``.fit()``) on N Ray Train workers, restarted from our newest checkpoint after a failure.

    python launch/ray_job.py -c CONFIG --num-workers N [--use-gpu] [--storage URL] [--max-failures K]
        [--set section.key=value ...] [--run-dir DIR] [--address ADDR]

    # against a running cluster (see launch/ray.md: loopback head, token authentication)
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".git"]}' -- python launch/ray_job.py -c CONFIG --num-workers 2 ...

Design choices:
- The driver (this script's ``main``) only parses, checks and submits: a ``TorchTrainer`` with
  ``ScalingConfig(num_workers=N, use_gpu=...)`` and ``RunConfig(storage_path=..., failure_config=
  FailureConfig(max_failures=K))``. Ray Train starts N worker processes and initialises the torch
  process group itself (``TorchConfig(backend=...)``: gloo on CPU, nccl with ``--use-gpu``, from
  ``dist.backend``); ``parallel.init_process_group`` adopts that group.
- Each worker runs :func:`train_worker`: build the DistributedTrainer, ``resume("latest")`` (a no-op
  on a fresh run; after a failure Ray restarts the whole worker group and this continues from the
  newest complete checkpoint in ``checkpoint.dir``), ``fit``. Our checkpoint stays the source of
  truth; each save is reported to Ray as a tiny Ray checkpoint holding its URL and step, so Ray's
  storage records the run's progress. The final metrics (``final.json``) are reported at the end.
- Every worker start appends one line to ``<run_dir>/ray_workers.jsonl`` (rank, pid, host, the step
  it starts from): how an operator (or the fault-injection test) finds a worker and sees a restart.
- Security: whoever reaches a Ray cluster's ports can run code on it. Ray >= 2.54 is required (token
  authentication), a cluster this script starts itself listens on 127.0.0.1 only, and a non-loopback
  ``--address`` (or ``RAY_ADDRESS``) is REFUSED unless token authentication is on
  (``RAY_AUTH_MODE=token`` with a token in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
  ``~/.ray/auth_token``). The check runs before any connection is made.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

if __package__ in (None, ""):  # run as a script (ray job submit, python launch/ray_job.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goat_dist.log import get_logger, setup_logging  # noqa: E402

log = get_logger("goat_dist.launch.ray_job")

MIN_RAY_VERSION = "2.54"
WORKERS_FILE = "ray_workers.jsonl"
RAY_CHECKPOINT_FILE = "goat_checkpoint.json"
# Ray's own switch that keeps a local node on the loopback address (on Linux, Ray otherwise maps
# 127.0.0.1 to the machine's routable IP and its GCS/raylet listen on every interface).
LOOPBACK_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class InsecureAddressError(ValueError):
    """A Ray address that is reachable from other machines while token authentication is off."""


# ----------------------------------------------------------------------------------------------
# Checks that run before anything connects
def check_ray_version(version: str) -> None:
    """Raise when ``version`` is older than :data:`MIN_RAY_VERSION` (no token authentication)."""
    from packaging.version import InvalidVersion, Version

    try:
        ok = Version(version) >= Version(MIN_RAY_VERSION)
    except InvalidVersion as exc:
        raise RuntimeError(f"cannot read the installed Ray version {version!r}: {exc}") from exc
    if not ok:
        raise RuntimeError(f"launch/ray_job.py needs Ray >= {MIN_RAY_VERSION} (token authentication for the "
                           f"cluster's dashboard, job and client ports); Ray {version} is installed: "
                           "pip install 'ray[default,train]>=2.54' (make install pins 2.60.0)")


def require_ray() -> str:
    """Import Ray, check its version, return it."""
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("launch/ray_job.py needs Ray (pip install 'ray[default,train]>=2.54'; make install "
                           f"installs it): {exc}") from exc
    check_ray_version(ray.__version__)
    return ray.__version__


def address_host(address: str | None) -> str | None:
    """The host part of a Ray address, or None when the address names no remote host.

    Accepts ``http(s)://HOST:PORT`` (dashboard / jobs API), ``ray://HOST:PORT`` (Ray Client),
    ``HOST:PORT`` (GCS), ``[IPv6]:PORT`` and a bare host. ``None``, ``""`` and ``"local"`` (start a
    cluster here) give None; ``"auto"`` must be resolved first (:func:`resolve_auto_address`).
    """
    if address is None:
        return None
    text = address.strip()
    if text in ("", "local"):
        return None
    if text == "auto":
        raise ValueError("address 'auto' must be resolved to HOST:PORT before its host can be checked")
    parsed = urllib.parse.urlsplit(text if "://" in text else f"//{text}")
    try:
        host = parsed.hostname
        parsed.port  # noqa: B018 - validates the port part
    except ValueError as exc:
        raise ValueError(f"Ray address {address!r}: {exc}") from exc
    if not host:
        raise ValueError(f"Ray address {address!r}: no host in it (expected HOST:PORT, http://HOST:PORT or "
                         "ray://HOST:PORT)")
    return host


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and 127.0.0.0/8 / ::1 literals. Other names are NOT trusted: a name may
    resolve to any interface."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_auth_problem(environ: Mapping[str, str]) -> str | None:
    """None when Ray token authentication is on with a token available; otherwise what is missing."""
    mode = environ.get("RAY_AUTH_MODE", "")
    if mode.lower() != "token":
        return f"RAY_AUTH_MODE is {mode!r}, not 'token'" if mode else "RAY_AUTH_MODE is not set (token authentication off)"
    if environ.get("RAY_AUTH_TOKEN"):
        return None
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        p = Path(path).expanduser()
        if not p.is_file() or not p.read_text().strip():
            return f"RAY_AUTH_TOKEN_PATH={path} is not a readable, non-empty token file"
        return None
    default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return None
    return ("RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or create "
            f"{default} (ray get-auth-token --generate)")


def check_address(address: str | None, environ: Mapping[str, str], source: str = "--address") -> None:
    """Refuse a Ray address reachable from other machines unless token authentication is on.

    Raises :class:`InsecureAddressError` naming the address, where it came from and what to do.
    Loopback addresses and "start a local cluster" (None) always pass.
    """
    host = address_host(address)
    if host is None or is_loopback(host):
        return
    problem = token_auth_problem(environ)
    if problem is not None:
        raise InsecureAddressError(
            f"{source} {address!r}: {host} is not a loopback address and Ray token authentication is off "
            f"({problem}). Anyone who reaches the cluster's dashboard, job or client port can run code on it. "
            "Start the cluster AND run this with RAY_AUTH_MODE=token and the cluster's token "
            "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), or use a loopback head "
            "(see launch/ray.md)")


def resolve_auto_address(address: str) -> str:
    """``auto`` -> the HOST:PORT of the cluster started on this machine (Ray's own lookup)."""
    from ray._private.services import canonicalize_bootstrap_address

    resolved = canonicalize_bootstrap_address(address)
    if not resolved:
        raise ValueError(f"Ray address {address!r}: no running Ray cluster found on this machine")
    return resolved


# ----------------------------------------------------------------------------------------------
# Worker side: runs in every Ray Train worker process
def flat_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float | int | str | bool]:
    """Nested metric dicts -> ``{"test/recall@10": ...}``; tensors become numbers, None is left out."""
    out: dict[str, float | int | str | bool] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, f"{name}/"))
        elif value is None:
            continue
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            out[name] = value.item()
        else:
            out[name] = str(value)
    return out


def _record_worker(run_dir: Path, rank: int, world_size: int, step: int, resumed: bool) -> None:
    """Append this worker's start to ``ray_workers.jsonl`` (one short line, one ``write``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"event": "start", "rank": rank, "world_size": world_size, "pid": os.getpid(),
                       "host": socket.gethostname(), "resumed": resumed, "step": step,
                       "time": round(time.time(), 3)}) + "\n"
    with open(run_dir / WORKERS_FILE, "a", encoding="utf-8") as fh:
        fh.write(line)


def _ray_reporter(rank: int):
    """The checkpoint listener: ``fn(url, step, metrics)`` on every rank after each complete save ->
    ``ray.train.report`` (every rank: it is a barrier), rank 0 attaching a Ray checkpoint that holds
    only our checkpoint's URL and step."""
    import ray.train

    def report(url: str, step: int, metrics: Mapping[str, Any]) -> None:
        values = {"step": int(step), "checkpoint_url": str(url), **flat_metrics(metrics or {})}
        if rank != 0:
            ray.train.report(values, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="goat_ray_ckpt_") as tmp:
            Path(tmp, RAY_CHECKPOINT_FILE).write_text(json.dumps({"url": str(url), "step": int(step)}) + "\n")
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    return report


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: adopt Ray's process group, build the DistributedTrainer, resume from the
    newest complete checkpoint if any, fit, report the final metrics."""
    import ray.train
    import torch

    setup_logging(config.get("log_level", "INFO"))
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    from goat_dist.engine.distributed import DistributedTrainer
    from goat_dist.parallel.process_group import init_process_group

    cfg, run_dir = config["cfg"], Path(config["run_dir"])
    env = init_process_group(cfg.dist)  # Ray Train initialised the default group: adopted, not re-created
    ctx = ray.train.get_context()
    if (env.rank, env.world_size) != (ctx.get_world_rank(), ctx.get_world_size()):
        raise RuntimeError(f"process group rank/world {env.rank}/{env.world_size} != Ray Train's "
                           f"{ctx.get_world_rank()}/{ctx.get_world_size()}")
    trainer = DistributedTrainer(cfg, run_dir, env).build()
    try:
        resumed = bool(trainer.resume("latest"))  # False on a fresh run: no complete checkpoint yet
        trainer.add_checkpoint_listener(_ray_reporter(env.rank))
        _record_worker(run_dir, env.rank, env.world_size, trainer.state.step, resumed)
        if resumed:
            log.info("resumed from the newest complete checkpoint: step %d, epoch %d", trainer.state.step,
                     trainer.state.epoch)
        final = trainer.fit()
        ray.train.report({"final": True, **flat_metrics(final)}, checkpoint=None)
    finally:
        trainer.close()  # the process group is Ray's: it ends it


# ----------------------------------------------------------------------------------------------
# Driver side
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/ray_job.py",
                                description="RecGOAT training on Ray Train workers (fault tolerant)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--num-workers", type=int, required=True, help="Ray Train workers = ranks")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--storage", default=None,
                   help="Ray Train storage_path (local path or URL, e.g. s3://...); default <run-dir>/ray")
    p.add_argument("--max-failures", type=int, default=3,
                   help="worker-group failures tolerated; each restart resumes from the newest checkpoint")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>); absolute recommended")
    p.add_argument("--address", default=None,
                   help="Ray cluster (HOST:PORT, ray://HOST:PORT or auto); default RAY_ADDRESS, else a local "
                        "cluster on 127.0.0.1")
    p.add_argument("--log-level", default="INFO")
    return p


def _connect(ray_module, address: str | None) -> None:
    if address is None:
        # A private local cluster; LOOPBACK_NODE_ENV (set before Ray was imported) keeps it on 127.0.0.1.
        ray_module.init(include_dashboard=False, log_to_driver=True)
    else:
        ray_module.init(address=address, log_to_driver=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.num_workers < 1:
        log.error("--num-workers must be >= 1 (got %d)", args.num_workers)
        return 2
    if args.max_failures < 0:
        log.error("--max-failures must be >= 0 (got %d)", args.max_failures)
        return 2
    address, source = (args.address, "--address") if args.address else (os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS")
    local = address in (None, "", "local")
    if local:
        os.environ.setdefault(LOOPBACK_NODE_ENV, "0")  # read by Ray at import
    try:
        version = require_ray()
        if address == "auto":
            address = resolve_auto_address(address)
        check_address(None if local else address, os.environ, source)
    except (RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return 2

    from goat_dist.config import ConfigError, load_config
    from goat_dist.parallel.process_group import resolve_backend

    try:
        cfg = load_config(args.config, args.set or [])
        backend = resolve_backend(cfg.dist.backend, cuda=args.use_gpu)
    except (ConfigError, ValueError) as exc:
        log.error("config error: %s", exc)
        return 2
    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}").resolve()
    if "runtime_resources" in str(run_dir) and not (args.run_dir and Path(args.run_dir).is_absolute()):
        log.warning("run directory %s is inside the job's temporary copy of --working-dir: it disappears with the "
                    "cluster; pass an absolute --run-dir (or a shared path on a multi-node cluster)", run_dir)
    storage = args.storage or str(run_dir / "ray")

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    _connect(ray, None if local else address)
    log.info("Ray %s; %d workers (%s, %s); storage %s; max_failures %d; run directory %s", version,
             args.num_workers, "GPU" if args.use_gpu else "CPU", backend, storage, args.max_failures, run_dir)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "run_dir": str(run_dir), "log_level": args.log_level},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=RunConfig(name=run_dir.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    t0, t_submit = time.perf_counter(), time.time()
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        log.error("training failed after %.1fs (more than --max-failures=%d worker-group failures, or an error "
                  "that is not retried): %s", time.perf_counter() - t0, args.max_failures, exc)
        return 1
    wall = time.perf_counter() - t0
    starts = [s for s in _read_starts(run_dir) if s.get("time", 0) >= t_submit]
    restarts = sum(1 for s in starts if s.get("rank") == 0) - 1
    final_path = run_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    if final is None:
        log.error("the workers finished but %s was not written", final_path)
        return 1
    log.info("done in %.1fs with %d worker-group restart(s); Ray checkpoint %s", wall, max(restarts, 0),
             result.checkpoint.path if result.checkpoint else "none")
    log.info("final: steps %s, best epoch %s, test %s", final.get("steps"), final.get("best_epoch"),
             json.dumps(final.get("test")))
    return 0


def _read_starts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / WORKERS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
