"""The real docker-compose.yml end to end: build the image, bring up `attnserve` and `prometheus`,
stream a generation through the published port, see Prometheus scrape it, stop, leave nothing.

Needs a Docker engine and Compose (v1 `docker-compose` or v2 `docker compose`); here
`bash ../shared/tools/docker-up.sh docker-compose.yml` provides both, and a stand-in for the
prom/prometheus image. Skipped, with the reason, where there is no engine. Grafana cannot be had
here: tests/deploy/ checks its provisioning statically.

Timings (build, start, stop) and the image size are printed; `-m docker` runs only this.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import requests
import yaml

from tests.e2e import docker

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = docker.ROOT
API_KEY = "e2e-" + uuid.uuid4().hex[:12]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "attnserve.json"


def say(request, line: str) -> None:
    """Print past pytest's capture: the timings are part of this test's output."""
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n[e2e] {line}", flush=True)


@pytest.fixture(scope="module")
def stack(request, tmp_path_factory):
    """attnserve + prometheus from docker-compose.yml under a unique project name, on free ports;
    always taken down (containers, network, volumes), even when a test fails."""
    reason = docker.unavailable()
    if reason:
        pytest.skip(reason)
    compose_file = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom_image = compose_file["services"]["prometheus"]["image"]
    if not docker.image_exists(prom_image):
        pytest.skip(f"{prom_image} is not here and cannot be pulled: "
                    "run `bash ../shared/tools/docker-up.sh docker-compose.yml` for a stand-in")

    tmp = tmp_path_factory.mktemp("compose")
    project = f"attnserve-e2e-{uuid.uuid4().hex[:8]}"
    (tmp / "secret.env").write_text(f"ATTNSERVE_API_KEY={API_KEY}\n")
    ports = {name: docker.free_port() for name in ("ATTNSERVE_HOST_PORT", "PROMETHEUS_HOST_PORT", "GRAFANA_HOST_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "COMPOSE_PROJECT_NAME": project, "ATTNSERVE_IMAGE": "attnserve:e2e",
           "ATTNSERVE_ENV_FILE": str(tmp / "secret.env"), "ATTNSERVE_CPUS": "2"}
    # Stand-in base images whose `/` a non-root user cannot enter are repaired here (no-op otherwise).
    base = compose_file["services"]["attnserve"]["build"]["args"]["PYTHON_IMAGE"]
    base = re.fullmatch(r"\$\{PYTHON_IMAGE:-(.+)\}", base).group(1)
    env["PYTHON_IMAGE"] = docker.usable_image(base)
    files = ["-f", "docker-compose.yml"]
    if not docker.non_root_can_run(prom_image):     # the same defect in a stand-in: run it as root instead
        override = tmp / "docker-compose.e2e.yml"
        override.write_text(yaml.safe_dump({"version": "2.4", "services": {"prometheus": {"user": "0"}}}))
        files += ["-f", str(override)]
    compose = [*docker.compose_command(), "--project-name", project, *files]
    log = tmp / "compose.log"

    t0 = time.monotonic()
    docker.fill_wheels(sys.executable)
    say(request, f"wheels/ filled in {time.monotonic() - t0:.1f} s")
    try:
        t0 = time.monotonic()
        docker.run([*compose, "build", "attnserve"], env=env, timeout=1500, log=log)
        build_s = time.monotonic() - t0
        size = docker.inspect("attnserve:e2e")["Size"]
        say(request, f"image built in {build_s:.1f} s; size {size / 1e6:.0f} MB")
        t0 = time.monotonic()
        docker.run([*compose, "up", "-d", "--no-build", "attnserve", "prometheus"], env=env, timeout=300, log=log)
        attnserve = docker.run([*compose, "ps", "-q", "attnserve"], env=env).stdout.strip()
        prometheus = docker.run([*compose, "ps", "-q", "prometheus"], env=env).stdout.strip()
        docker.wait_healthy(attnserve, timeout=300)
        say(request, f"attnserve healthy {time.monotonic() - t0:.1f} s after `up`")
        yield {"compose": compose, "env": env, "project": project, "attnserve": attnserve,
               "prometheus": prometheus, "api": f"http://127.0.0.1:{ports['ATTNSERVE_HOST_PORT']}",
               "prom": f"http://127.0.0.1:{ports['PROMETHEUS_HOST_PORT']}", "log": log}
    finally:
        if request.session.testsfailed:
            for service in ("attnserve", "prometheus"):
                logs = docker.run([*compose, "logs", "--tail", "40", service], env=env, check=False).output
                say(request, f"--- {service} logs ---\n{logs}")
        docker.run([*compose, "down", "-v", "--remove-orphans", "--timeout", "10"], env=env, check=False, log=log)


def generate(api: str, *, key: str | None = API_KEY, **body) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    return requests.post(f"{api}/v1/generate", json=body, headers=headers, stream=bool(body.get("stream")),
                         timeout=60)


def test_streams_a_generation_through_the_published_port(stack):
    api = stack["api"]
    assert requests.get(f"{api}/health", timeout=5).text.strip('"') == "ok"     # no API key needed
    assert generate(api, key=None, prompt="two plus three equals", max_tokens=4).status_code == 401

    response = generate(api, prompt="two plus three equals", max_tokens=4, stream=True)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in response.iter_lines() if line]
    assert events[0]["type"] == "start" and events[-1]["type"] == "done", events
    assert any(e["type"] == "token" for e in events)
    assert events[-1]["text"] == " five"

    # Attention weights leave the container too (tensor → JSON without NumPy in the image).
    full = generate(api, prompt="seven minus two equals", max_tokens=3,
                    attention={"layers": "all", "heads": "mean", "include_prompt": False})
    assert full.status_code == 200, full.text
    assert full.json()["tokens"][0]["attention"]
    # The image serves every shipped model; the pronoun model answers by name.
    models = requests.get(f"{api}/v1/models", headers={"X-API-Key": API_KEY}, timeout=5).json()["data"]
    assert [m["id"] for m in models] == ["calculator", "pronouns"]
    pronoun = generate(api, model="pronouns", max_tokens=1,
                       prompt="the trophy did not fit in the suitcase because it was too big . it refers to the")
    assert pronoun.status_code == 200 and pronoun.json()["text"] == " trophy", pronoun.text
    # An error for the dashboard's error panels.
    too_long = generate(api, prompt="one plus " * 2000 + "one equals", max_tokens=1)
    assert too_long.status_code == 400 and too_long.json()["error"]["type"] == "context_length_exceeded"


def test_metrics_are_served_without_the_api_key(stack):
    text = requests.get(f"{stack['api']}/metrics", timeout=5).text
    count = re.search(r'^attnserve_time_to_first_token_seconds_count\{[^}]*\} (\S+)$', text, re.M)
    assert count and float(count.group(1)) >= 1, text[:2000]


def prom_query(prom: str, query: str) -> dict:
    body = requests.get(f"{prom}/api/v1/query", params={"query": query}, timeout=10).json()
    assert body["status"] == "success", (query, body)
    return body["data"]


def wait_for(check, timeout: float, what: str):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (requests.RequestException, KeyError, ValueError) as e:
            last = e
        time.sleep(1)
    raise TimeoutError(f"{what} after {timeout} s (last error: {last!r})")


def test_prometheus_scrapes_attnserve(stack, request):
    prom = stack["prom"]
    t0 = time.monotonic()

    def attnserve_up():
        targets = requests.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return [t for t in targets if t["labels"]["job"] == "attnserve" and t["health"] == "up"]

    targets = wait_for(attnserve_up, 120, "no attnserve target is up in Prometheus")
    assert len(targets) == 1 and targets[0]["scrapeUrl"].endswith(":8000/metrics"), targets

    def ttft_samples():
        result = prom_query(prom, "count_over_time(attnserve_time_to_first_token_seconds_count[5m])")["result"]
        latest = prom_query(prom, "max(attnserve_time_to_first_token_seconds_count)")["result"]
        return result and latest and float(latest[0]["value"][1]) >= 1 and result

    series = wait_for(ttft_samples, 60, "no TTFT series with samples in Prometheus")
    assert "calculator" in {s["metric"]["model_name"] for s in series} <= {"calculator", "pronouns"}
    say(request, f"Prometheus had the target up and TTFT samples {time.monotonic() - t0:.1f} s after health")


def test_dashboard_queries_run_in_prometheus(stack):
    """Every panel's PromQL parses and runs against the live Prometheus (Grafana's variables filled in)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        prom_query(stack["prom"], expr.replace("$__rate_interval", "1m").replace("$model", ".*"))
    variable = dashboard["templating"]["list"][0]["query"]["query"]
    metric = re.fullmatch(r"label_values\((\w+), model_name\)", variable).group(1)
    series = requests.get(f"{stack['prom']}/api/v1/series", params={"match[]": metric}, timeout=10).json()["data"]
    assert {s["model_name"] for s in series} == {"calculator", "pronouns"}


def test_runs_as_non_root(stack):
    container = docker.inspect(stack["attnserve"])
    assert container["Config"]["User"] not in ("", "0", "root")
    top = docker.run(["docker", "top", stack["attnserve"], "-eo", "pid,uid,args"]).stdout.splitlines()[1:]
    assert len(top) >= 3, top                     # init, server, LitServe's worker and API processes
    assert all(line.split()[1] != "0" for line in top), top


def test_docker_stop_is_quick_and_clean(stack, request):
    t0 = time.monotonic()
    docker.run(["docker", "stop", "--time", "10", stack["attnserve"]])
    stop_s = time.monotonic() - t0
    state = docker.inspect(stack["attnserve"])["State"]
    say(request, f"`docker stop` (STOPSIGNAL {docker.inspect(stack['attnserve'])['Config'].get('StopSignal')}) "
                 f"took {stop_s:.2f} s, exit code {state['ExitCode']}")
    assert not state["Running"]
    assert state["ExitCode"] != 137 and not state["OOMKilled"], state       # 137: killed after the grace period
    assert stop_s < 5


def test_sigterm_also_stops_every_process(stack, request):
    """Kubernetes sends SIGTERM whatever STOPSIGNAL says: the server's handler must shut LitServe down."""
    name = f"{stack['project']}-sigterm"
    docker.run(["docker", "run", "-d", "--name", name, "--stop-signal", "SIGTERM", "--read-only", "--tmpfs", "/tmp",
                "attnserve:e2e"])
    try:
        docker.wait_healthy(name, timeout=300)
        t0 = time.monotonic()
        docker.run(["docker", "stop", "--time", "10", name])
        stop_s = time.monotonic() - t0
        state = docker.inspect(name)["State"]
        say(request, f"`docker stop` with SIGTERM took {stop_s:.2f} s, exit code {state['ExitCode']}")
        assert state["ExitCode"] != 137 and stop_s < 5, state
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_down_leaves_nothing(stack):
    docker.run([*stack["compose"], "down", "-v", "--remove-orphans", "--timeout", "10"], env=stack["env"],
               log=stack["log"])
    label = f"label=com.docker.compose.project={stack['project']}"
    assert docker.run(["docker", "ps", "-a", "-q", "--filter", label]).stdout.strip() == ""
    assert docker.run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.strip() == ""
    assert docker.run(["docker", "network", "ls", "-q", "--filter", label]).stdout.strip() == ""
    assert docker.run(["docker", "ps", "-a", "-q", "--filter", f"name={stack['project']}"]).stdout.strip() == ""
