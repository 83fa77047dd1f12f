"""Start the real server (`python -m server`) on an ephemeral port for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "calculator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        """Signal the server's main process and wait for its whole process group to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _wait_group_gone(self.proc.pid, timeout)
        return self.proc.returncode


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


@contextmanager
def running_server(tmp_dir: Path, *args: str, env: dict | None = None, ready_timeout: float = 90.0,
                   shipped: bool = False):
    """Run `python -m server --port <free> *args` in its own process group until the block ends. It
    serves the calculator alone unless args name checkpoints, or `shipped` asks for the server's
    default (every shipped model)."""
    if not shipped and "--checkpoint" not in args:
        args = ("--checkpoint", str(CHECKPOINT), *args)
    port = free_port()
    log = Path(tmp_dir) / f"server-{port}.log"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}  # only what we pass
    full_env = {**inherited, "PYTHONUNBUFFERED": "1",
                "ATTNSERVE_METRICS_DIR": str(Path(tmp_dir) / f"metrics-{port}"), **(env or {})}
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--threads", "1", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        wait_ready(server, ready_timeout)
        yield server
    finally:
        server.stop()


def wait_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.logs()[-4000:]}")
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{server.logs()[-4000:]}")
