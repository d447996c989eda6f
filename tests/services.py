"""Real services for the tests that need them: an `mlflow server` and a single-node SLURM cluster.

Both are context managers that start the service, hand back how to reach it, and stop
exactly the processes they started, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

SLURM_UP = REPO / "scripts" / "slurm-up.sh"
SLURM_DOWN = REPO / "scripts" / "slurm-down.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without tracking settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VIRTUALCELL_"))}
    return env | extra


def _stop_group(proc: subprocess.Popen, *, grace_s: float = 15) -> None:
    """SIGTERM the process group we started (the server and its workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def _service(cmd: list[str], *, log_file: Path, ready_url: str, env: dict[str, str], timeout_s: float,
             what: str) -> Iterator[None]:
    """Start ``cmd`` in its own process group; return once ``ready_url`` answers 200; stop it on exit."""
    log = open(log_file, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_file.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(ready_url, timeout=2).status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {ready_url} in {timeout_s} s:\n"
                                   f"{log_file.read_text()[-3000:]}")
            time.sleep(0.5)  # polling for the port to open, not waiting a fixed time
        yield
    finally:
        _stop_group(proc)
        log.close()


@contextlib.contextmanager
def mlflow_server(folder: Path, *, timeout_s: float = 90) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, SQLite backend and served artifacts in ``folder``.

    Yields its URI (``http://127.0.0.1:<port>``) once ``/health`` answers.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts")]
    with _service(cmd, log_file=folder / "server.log", ready_url=f"{uri}/health", env=clean_env(),
                  timeout_s=timeout_s, what="mlflow server"):
        yield uri


@contextlib.contextmanager
def model_server(model_uri: str, *, tracking_uri: str, folder: Path, timeout_s: float = 180) -> Iterator[str]:
    """`mlflow models serve` of ``model_uri`` (local env manager) on a free loopback port.

    Yields the base URL once ``/ping`` answers; POST cells to ``<url>/invocations``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with _service(cmd, log_file=folder / "serve.log", ready_url=f"{url}/ping",
                  env=clean_env(MLFLOW_TRACKING_URI=tracking_uri), timeout_s=timeout_s, what="mlflow models serve"):
        yield url


def slurm_unavailable() -> str | None:
    """Why this machine cannot run the test cluster, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "bringing up a SLURM cluster needs root (munged, slurmctld and slurmd run as root)"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and no apt-get to install slurm-wlm and munge"
    return None


def require_slurm() -> None:
    """Skip when the machine cannot have SLURM; in CI (CI=true) that is a failure, never a skip."""
    reason = slurm_unavailable()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"CI must run the SLURM tests, but {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def slurm_cluster(state: Path) -> Iterator[dict[str, str]]:
    """A single-node SLURM cluster (scripts/slurm-up.sh) with its state in ``state``.

    Yields the environment variables that point clients at it (SLURM_CONF, PATH); stops its
    daemons (scripts/slurm-down.sh) on exit.
    """
    up = subprocess.run(["bash", str(SLURM_UP), str(state)], capture_output=True, text=True, timeout=600)
    try:
        if up.returncode != 0:
            raise RuntimeError(f"scripts/slurm-up.sh failed ({up.returncode}):\n{up.stderr[-4000:]}")
        # The one stdout line: export SLURM_CONF=... PATH=<state>/bin:$PATH
        words = up.stdout.strip().removeprefix("export ").split()
        env = dict(w.split("=", 1) for w in words)
        env["PATH"] = env["PATH"].replace("$PATH", os.environ["PATH"])
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_DOWN), str(state)], capture_output=True, text=True, timeout=120)
