"""Docker and Compose helpers for the end-to-end tests (a compose project with its own name)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 600, check: bool = True,
        log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with its output (the tail of it, or of `log`)."""
    if log is not None:
        with open(log, "ab") as out:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        output = log.read_text(errors="replace")
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output = (proc.stdout or "") + (proc.stderr or "")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}")
    proc.output = output
    return proc


def unavailable() -> str | None:
    """Why Docker end-to-end tests cannot run here, or None when they can."""
    if shutil.which("docker") is None:
        return "docker is not installed (bash ../shared/tools/docker-up.sh docker-compose.yml installs it)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"`docker info` failed: no Docker engine ({info.stderr.strip()[-200:]})"
    if compose_command() is None:
        return "neither docker-compose nor `docker compose` is available"
    return None


def compose_command() -> list[str] | None:
    """Compose v1 (`docker-compose`) or v2 (`docker compose`): both read docker-compose.yml."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def inspect(obj: str) -> dict:
    return json.loads(run(["docker", "inspect", obj]).stdout)[0]


def non_root_can_run(image: str) -> bool:
    """Whether a non-root user can start a program in `image`. Images whose `/` is mode 0700 (a root
    file system imported from a `mktemp -d` tarball) cannot, and no later layer can change that."""
    proc = subprocess.run(["docker", "run", "--rm", "--user", "65534", "--entrypoint", "/bin/sh", image, "-c", "true"],
                          capture_output=True, text=True)
    return proc.returncode == 0


def usable_image(image: str) -> str:
    """`image`, or a copy of it (same files and settings) whose `/` non-root users can enter; built
    once, then reused."""
    if non_root_can_run(image):
        return image
    details = inspect(image)
    fixed = f"attnserve-e2e/fixed:{details['Id'].split(':')[-1][:12]}"
    if not image_exists(fixed):
        config = details["Config"]
        lines = [f"FROM {image} AS original", "FROM scratch", "COPY --from=original / /"]
        lines += [f"ENV {key}={json.dumps(value)}" for key, _, value in
                  (e.partition("=") for e in config.get("Env") or [])]
        lines += [f"EXPOSE {port}" for port in config.get("ExposedPorts") or {}]
        if config.get("WorkingDir"):
            lines.append(f"WORKDIR {config['WorkingDir']}")
        if config.get("User"):
            lines.append(f"USER {config['User']}")
        for key in ("Entrypoint", "Cmd"):
            if config.get(key):
                lines.append(f"{key.upper()} {json.dumps(config[key])}")
        with tempfile.TemporaryDirectory() as ctx:
            Path(ctx, "Dockerfile").write_text("\n".join(lines) + "\n")
            run(["docker", "build", "-q", "-t", fixed, ctx], timeout=900)
    return fixed


def wait_healthy(container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = inspect(container)["State"]
        if state.get("Health", {}).get("Status") == "healthy":
            return
        if not state["Running"] or state.get("Restarting"):
            break
        time.sleep(1)
    logs = run(["docker", "logs", "--tail", "60", container], check=False).output
    raise TimeoutError(f"container {container} not healthy: {json.dumps(state)[:1500]}\n{logs}")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_wheels(python: str) -> None:
    """wheels/: the torch wheel on disk (if any) and every other dependency, so the build needs no
    index (inside a container this machine's TLS-intercepting proxy is not trusted)."""
    wheels = ROOT / "wheels"
    env = dict(os.environ, PYTHON=python)
    torch_wheel = os.environ.get("ATTNSERVE_TORCH_WHEEL") or next(
        (str(p) for p in sorted(Path("/opt/wheels").glob("torch-*.whl"))), "")
    if torch_wheel and not any(wheels.glob("torch-*.whl")):
        env["TORCH_WHEEL"] = torch_wheel
    run(["bash", "deploy/fill-wheels.sh"], env=env, timeout=900)
