"""Static checks of the container files: Dockerfile, .dockerignore, the compose files, the Prometheus
and nginx configs. tests/e2e runs them for real where Docker is available."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SCALE = yaml.safe_load((ROOT / "docker-compose.scale.yml").read_text())


def instructions(name: str) -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def final_stage() -> str:
    return re.split(r"^FROM ", DOCKERFILE, flags=re.M)[-1]


def test_dockerfile_runtime_settings():
    final = final_stage()
    user = re.search(r"^USER (\S+)", final, re.M).group(1)
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"      # numeric: runAsNonRoot can verify it
    assert re.search(r"^HEALTHCHECK .*CMD .*/health", re.sub(r"\\\n", " ", final), re.M)
    assert re.search(r"^STOPSIGNAL SIG(INT|TERM)$", final, re.M)
    assert re.search(r"^EXPOSE 8000$", final, re.M)
    env = " ".join(instructions("ENV"))
    assert "ATTNSERVE_HOST=0.0.0.0" in env and "ATTNSERVE_PORT=8000" in env
    assert "ATTNSERVE_CHECKPOINT=/app/checkpoints" in env.split()   # every shipped model, not the site-packages default
    assert "ATTNSERVE_METRICS_DIR=/tmp/" in env
    assert "--extra-index-url $TORCH_INDEX_URL" in DOCKERFILE and "download.pytorch.org/whl/cpu" in DOCKERFILE
    assert len(re.findall(r"^FROM ", DOCKERFILE, re.M)) >= 2                # multi-stage


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)) or \
                fnmatch.fnmatch(path, pattern.replace("**/", "*")):
            result = not negate
    return result


def test_dockerignore_sends_what_the_dockerfile_copies_and_little_else():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for copy in instructions("COPY"):
        if copy.startswith("--from"):
            continue
        for source in copy.split()[:-1]:
            assert not ignored(source.rstrip("/"), patterns), f"COPY {source} but .dockerignore drops it"
            assert (ROOT / source).exists(), source
    for heavy in (".venv", ".git", "runs", "tests", "bench", "model/__pycache__/x.pyc", "checkpoints/other"):
        assert ignored(heavy, patterns), heavy


def test_wheels_folder_is_ignored_by_git_but_kept():
    assert (ROOT / "wheels" / ".gitkeep").exists()
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert "/wheels/*" in gitignore and "!/wheels/.gitkeep" in gitignore


def test_compose_attnserve_service():
    service = COMPOSE["services"]["attnserve"]
    assert service["build"]["network"] == "host" and service["build"]["context"] == "."
    assert service["restart"] in ("unless-stopped", "always", "on-failure")
    assert service["healthcheck"]["test"][0] == "CMD" and "/health" in " ".join(service["healthcheck"]["test"])
    assert service["cpus"] and service["mem_limit"]
    assert service["env_file"] and (ROOT / re.sub(r"\$\{\w+:-(.+)\}", r"\1", service["env_file"][0])).is_file()
    assert all(key.startswith("ATTNSERVE_") for key in service["environment"])
    assert "ATTNSERVE_API_KEY" not in service["environment"]                  # secrets come from the env file


def test_compose_publishes_on_loopback_only():
    for compose in (COMPOSE, SCALE):
        for name, service in compose["services"].items():
            for port in service.get("ports", []):
                assert port.startswith("127.0.0.1:"), (name, port)


def test_prometheus_scrapes_every_attnserve_replica():
    service = COMPOSE["services"]["prometheus"]
    mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
    config_file = ROOT / mounts["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load(config_file.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "attnserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["attnserve"] and sd["port"] == 8000 and sd["type"] == "A"
    assert "attnserve" in COMPOSE["services"]


def test_scale_override_puts_replicas_behind_nginx():
    assert SCALE["version"] == COMPOSE["version"]
    assert set(SCALE["services"]) == {"attnserve", "lb"}
    assert "scale" in SCALE["services"]["attnserve"]
    lb = SCALE["services"]["lb"]
    assert lb["depends_on"]["attnserve"]["condition"] == "service_healthy"
    conf_host = next(v.split(":")[0] for v in lb["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf")
    conf = (ROOT / conf_host).read_text()
    assert "resolver 127.0.0.11" in conf and "http://attnserve:8000" in conf
    assert "proxy_buffering off" in conf                                     # streams are not held back
    assert re.search(r"listen 8000;", conf) and lb["ports"][0].endswith(":8000")


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.scale.yml"]])
def test_compose_v1_accepts_the_files(files):
    args = [a for f in files for a in ("-f", f)]
    proc = subprocess.run(["docker-compose", *args, "config", "-q"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "ATTNSERVE_HOST_PORT": ""})
    assert proc.returncode == 0, proc.stderr
