"""A private Ray head node for tests: loopback only, free ports, own temp dir, token authentication,
stopped by the process ids it created (never ``ray stop``, which ends every Ray on the machine).

    with RayHead() as head:                       # `ray start --head` on 127.0.0.1
        subprocess.run([head.ray, "job", "submit", "--address", head.dashboard_url, ...], env=head.env)
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_port_range(width: int = 64) -> int:
    """First port of ``width`` consecutive ports that were all free a moment ago."""
    for _ in range(50):
        base = 20000 + secrets.randbelow(30000)
        try:
            socks = []
            for port in range(base, base + width):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free range of worker ports")


def dashboard_deps_missing() -> str | None:
    """What stops Ray's job server (``ray[default]`` extras) from starting here, or None."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            return True

    missing = [m for m in ("aiohttp_cors", "opencensus", "opentelemetry.sdk", "opentelemetry.exporter.prometheus",
                           "opentelemetry.proto", "prometheus_client") if absent(m)]
    return f"Ray's job server needs ray[default]; missing: {', '.join(missing)}" if missing else None


class RayHead:
    """``ray start --head`` bound to 127.0.0.1 with token authentication; ``stop`` kills exactly the
    processes this head started (and their children: Ray workers), then removes its temp dir."""

    def __init__(self, num_cpus: int = 2, token_auth: bool = True):
        self.num_cpus = num_cpus
        # short: Ray's unix socket paths live under it (108-byte limit)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="gr_", dir="/tmp"))
        self.ports = {k: _free_port() for k in ("gcs", "dashboard", "client", "node_manager", "object_manager",
                                                 "agent_listen", "agent_grpc", "metrics", "runtime_env")}
        self.worker_ports = _free_port_range()
        self.token = secrets.token_hex(24) if token_auth else None
        # PATH stays as it is: the venv's own `ninja` hashes build commands differently from the
        # system one, so a worker finding it first would rebuild DeepSpeed's JIT op in the shared
        # torch_extensions cache (minutes) and every later plain run would rebuild it back. Jobs name
        # the venv's python by its absolute path instead.
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        env.pop("RAY_ADDRESS", None)
        if token_auth:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        self.env = env
        self.ray = str(VENV_BIN / "ray")
        self.pids: set[int] = set()
        self.start_seconds = 0.0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    def _own_processes(self) -> set[psutil.Process]:
        """Processes of this head: recorded pids, anything naming our temp dir or GCS port, and all
        their descendants (Ray workers, the job driver)."""
        marks = (str(self.temp_dir), f":{self.ports['gcs']}")
        roots: set[psutil.Process] = set()
        for pid in self.pids:
            try:
                roots.add(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(m in arg for arg in (proc.info["cmdline"] or []) for m in marks):
                    roots.add(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        found = set(roots)
        for proc in roots:
            try:
                found.update(proc.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return found

    def start(self) -> "RayHead":
        p = self.ports
        cmd = [self.ray, "start", "--head", "--num-cpus", str(self.num_cpus), "--node-ip-address", "127.0.0.1",
               "--port", str(p["gcs"]), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(p["dashboard"]),
               "--ray-client-server-port", str(p["client"]), "--node-manager-port", str(p["node_manager"]),
               "--object-manager-port", str(p["object_manager"]), "--dashboard-agent-listen-port",
               str(p["agent_listen"]), "--dashboard-agent-grpc-port", str(p["agent_grpc"]),
               "--metrics-export-port", str(p["metrics"]), "--runtime-env-agent-port", str(p["runtime_env"]),
               "--min-worker-port", str(self.worker_ports), "--max-worker-port", str(self.worker_ports + 63),
               "--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        t0 = time.perf_counter()
        # Ray gives the raylet a fixed 30 s to register with the GCS; on a saturated machine (load 20+
        # on 2 cores) that can run out, so a failed start is cleaned up and tried once more.
        for attempt in (1, 2):
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
            self.pids = {q.pid for q in self._own_processes()}
            if proc.returncode == 0:
                break
            self.stop()
            self.temp_dir.mkdir(parents=True, exist_ok=True)
            if attempt == 2:
                raise RuntimeError(f"ray start failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                   f"{proc.stderr[-3000:]}")
        self.start_seconds = time.perf_counter() - t0
        self._wait_for_job_server()
        return self

    def _wait_for_job_server(self, timeout: float = 90.0) -> None:
        """The dashboard's job API answers a little after ``ray start`` returns."""
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run([self.ray, "job", "list", "--address", self.dashboard_url], env=self.env,
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray job server did not answer in {timeout:.0f}s:\n{r.stderr[-2000:]}")
            time.sleep(1.0)

    def owns(self, pid: int) -> bool:
        """True when ``pid`` is one of this head's processes (a guard before killing anything)."""
        return pid in {q.pid for q in self._own_processes()}

    def stop(self) -> None:
        procs = self._own_processes()
        for q in procs:
            try:
                q.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=10)
        for q in alive:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
