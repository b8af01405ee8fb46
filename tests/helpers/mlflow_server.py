"""A real `mlflow server` on 127.0.0.1 (SQLite backend, local artifact root) for the length of a test."""

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, startup_s: float = 120):
    """Yields (the server's URI, its process); the server is killed on the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(uri, proc, folder / "server.log", startup_s, "mlflow server")
        yield uri, proc
    finally:
        stop(proc)
        log.close()


def wait_until_up(base: str, proc: subprocess.Popen, log_file: Path, startup_s: float, what: str) -> None:
    """Poll `base`/health until the MLflow process `proc` answers; fail with its log's tail if
    it exits or `startup_s` pass first."""
    deadline = time.monotonic() + startup_s
    while True:
        try:
            if requests.get(base + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log_file.read_text()[-2000:]}")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    import os
    import signal
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and its workers
        proc.wait()
