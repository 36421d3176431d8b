"""launch/ray_job.py refuses what would expose a Ray cluster: old Ray (no token authentication) and a
non-loopback address while token authentication is off. No Ray cluster is started or contacted."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.ray_job import (InsecureAddressError, address_host, check_address, check_ray_version, is_loopback,
                            token_auth_problem)

REPO = Path(__file__).resolve().parents[2]
# TEST-NET-3 (RFC 5737): documentation addresses, never routed; nothing is sent to them anyway.
REMOTE = "203.0.113.7"


def test_ray_version_floor():
    check_ray_version("2.54.0")
    check_ray_version("2.60.0")
    with pytest.raises(RuntimeError, match=r"needs Ray >= 2\.54.*2\.53\.1 is installed"):
        check_ray_version("2.53.1")
    with pytest.raises(RuntimeError, match="needs Ray >= 2.54"):
        check_ray_version("2.54.0rc1")  # a pre-release of 2.54 is older than 2.54
    with pytest.raises(RuntimeError, match="cannot read the installed Ray version"):
        check_ray_version("not-a-version")


@pytest.mark.parametrize("address,host", [
    ("http://127.0.0.1:8265", "127.0.0.1"), ("https://head.example:443", "head.example"),
    ("ray://10.1.2.3:10001", "10.1.2.3"), ("127.0.0.2:6379", "127.0.0.2"), ("[::1]:6379", "::1"),
    ("localhost", "localhost"), (None, None), ("", None), ("local", None)])
def test_address_host(address, host):
    assert address_host(address) == host


def test_address_host_rejects_malformed_and_unresolved():
    with pytest.raises(ValueError, match="no host"):
        address_host("http://:8265")
    with pytest.raises(ValueError, match="port"):
        address_host("127.0.0.1:notaport")
    with pytest.raises(ValueError, match="resolved"):
        address_host("auto")


@pytest.mark.parametrize("host,loop", [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True),
                                       ("LOCALHOST", True), ("0.0.0.0", False), ("10.0.0.1", False),
                                       ("192.168.1.5", False), ("head.example", False), ("::", False)])
def test_is_loopback(host, loop):
    assert is_loopback(host) is loop


def test_loopback_needs_no_token(tmp_path):
    for address in ("http://127.0.0.1:8265", "127.0.0.1:6379", "ray://localhost:10001", "[::1]:6379", None):
        check_address(address, {"HOME": str(tmp_path)})


def test_remote_address_refused_without_token_auth(tmp_path):
    env = {"HOME": str(tmp_path)}
    with pytest.raises(InsecureAddressError, match=r"--address 'http://203\.0\.113\.7:8265'.*not a loopback.*"
                                                   r"RAY_AUTH_MODE is not set"):
        check_address(f"http://{REMOTE}:8265", env)
    with pytest.raises(InsecureAddressError, match="RAY_AUTH_MODE is 'disabled'"):
        check_address(f"{REMOTE}:6379", {**env, "RAY_AUTH_MODE": "disabled"})
    # token mode on but no token anywhere (HOME has no ~/.ray/auth_token)
    with pytest.raises(InsecureAddressError, match="no token"):
        check_address(f"ray://{REMOTE}:10001", {**env, "RAY_AUTH_MODE": "token"})
    # a host NAME is not trusted as loopback
    with pytest.raises(InsecureAddressError, match="RAY_ADDRESS"):
        check_address("head.example:6379", env, source="RAY_ADDRESS")


def test_remote_address_allowed_with_token_auth(tmp_path):
    env = {"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    check_address(f"http://{REMOTE}:8265", {**env, "RAY_AUTH_TOKEN": "s3cret"})
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    check_address(f"{REMOTE}:6379", {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)})
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("s3cret")
    check_address(f"{REMOTE}:6379", env)
    assert token_auth_problem(env) is None
    token_file.write_text("  \n")
    with pytest.raises(InsecureAddressError, match="not a readable, non-empty token file"):
        check_address(f"{REMOTE}:6379", {**env, "RAY_AUTH_TOKEN_PATH": str(token_file)})


def _launch(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(env_extra, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "launch/ray_job.py", "-c", "configs/synthetic.yaml", "--num-workers", "2",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_launcher_refuses_remote_address_before_connecting(tmp_path):
    """The real entry point exits 2 with the reason, for --address and for RAY_ADDRESS (what `ray job
    submit` hands the driver), before Ray connects anywhere (no 'Connecting to' line)."""
    t0 = time.perf_counter()
    proc = _launch("--address", f"http://{REMOTE}:8265", HOME=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not a loopback address and Ray token authentication is off" in proc.stderr
    assert "Connecting to" not in proc.stderr + proc.stdout
    proc = _launch(RAY_ADDRESS=f"{REMOTE}:6379", HOME=str(tmp_path))
    assert proc.returncode == 2 and "RAY_ADDRESS '203.0.113.7:6379'" in proc.stderr, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 110
