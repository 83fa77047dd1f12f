"""Grafana cannot be installed here, so its provisioning is checked statically: the files parse, the
datasource is the compose `prometheus` service, the dashboard has the panels it promises, and every
metric its PromQL names exists in a live /metrics scrape of the real server after some traffic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import running_server

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "attnserve.json"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

PROMQL_WORDS = {
    # aggregations, functions and keywords that can stand where a metric name could
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "inf", "nan",
}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(board: dict) -> list[str]:
    """Every PromQL expression: panel targets (rows' nested panels too) and query variables."""
    panels = board["panels"] + [p for row in board["panels"] for p in row.get("panels", [])]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in board.get("templating", {}).get("list", []) if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, functions, grouping, durations left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                 # string literals
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)                         # range durations
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)                         # Grafana variables
    expr = re.sub(r"label_values\((\w+)\s*,\s*\w+\)", r"\1", expr)    # label_values(metric, label)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", expr):
        name, call = match.groups()
        if not call and name.lower() not in PROMQL_WORDS:
            names.add(name)
    return names


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(attnserve_time_to_first_token_seconds_bucket'
            '{model_name=~"$model", x="a{b}"}[$__rate_interval]))) / on (instance) group_left '
            'max without (job) (up offset 5m)')
    assert metric_names(expr) == {"attnserve_time_to_first_token_seconds_bucket", "up"}
    assert metric_names("label_values(attnserve_e2e_request_latency_seconds_count, model_name)") == {
        "attnserve_e2e_request_latency_seconds_count"}


def test_datasource_is_the_compose_prometheus_service():
    sources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert len(sources) == 1
    source = sources[0]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)/?", source["url"]).groups()
    assert host in COMPOSE["services"]
    published = [p.rsplit(":", 1)[-1] for p in COMPOSE["services"][host]["ports"]]
    assert port in published, (port, published)
    # Every panel and variable uses this datasource.
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    uses = [p["datasource"] for p in panels] + [t["datasource"] for p in panels for t in p["targets"]]
    uses += [v["datasource"] for v in board["templating"]["list"]]
    assert all(u == {"type": "prometheus", "uid": source["uid"]} for u in uses), uses


def test_dashboard_provider_reads_the_mounted_dashboards():
    provider = load_yaml(GRAFANA / "provisioning" / "dashboards" / "attnserve.yml")["providers"][0]
    assert provider["type"] == "file"
    mounts = dict(reversed(v.split(":")[:2]) for v in COMPOSE["services"]["grafana"]["volumes"])
    assert Path(mounts[provider["options"]["path"]]) == Path("./deploy/grafana/dashboards")
    assert Path(mounts["/etc/grafana/provisioning"]) == Path("./deploy/grafana/provisioning")
    assert (ROOT / "deploy" / "grafana" / "dashboards").is_dir()
    home = COMPOSE["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).name in {p.name for p in DASHBOARD.parent.glob("*.json")}


def test_dashboard_has_the_promised_panels():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}
    wanted = {  # what the issue asks for → a metric the panel must query
        "Request rate": "attnserve_request_success_total",
        "Time to first token": "attnserve_time_to_first_token_seconds_bucket",
        "Inter-token latency": "attnserve_inter_token_latency_seconds_bucket",
        "End-to-end request latency": "attnserve_e2e_request_latency_seconds_bucket",
        "Prompt length (context) distribution": "attnserve_request_prompt_tokens_bucket",
        "Tokens per second": "attnserve_generation_tokens_total",
        "Running and waiting requests": "attnserve_num_requests_waiting",
        "KV-cache usage": "attnserve_kv_cache_usage_ratio",
        "Errors by type": "attnserve_request_errors_total",
    }
    for title, metric in wanted.items():
        assert metric in by_title.get(title, ""), (title, by_title.get(title))
    # Percentiles are computed the Prometheus way: over the rate of buckets, summed by `le`.
    for expr in queries(board):
        if "histogram_quantile" in expr:
            assert re.search(r"histogram_quantile\(0?\.\d+, sum by \(le\) \(rate\(\w+_bucket\{", expr), expr
    for p in panels:  # grid: inside 24 columns, no two panels overlap
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for q in panels:
            h = q["gridPos"]
            if p is not q:
                assert (g["x"] + g["w"] <= h["x"] or h["x"] + h["w"] <= g["x"] or
                        g["y"] + g["h"] <= h["y"] or h["y"] + h["h"] <= g["y"]), (p["title"], q["title"])


@pytest.fixture(scope="module")
def scraped_names(tmp_path_factory) -> set[str]:
    """Sample names in /metrics of the real server after successes, a stream and a refusal."""
    with running_server(tmp_path_factory.mktemp("grafana")) as server:
        for prompt in ("two plus three equals", "nine minus four equals"):
            r = requests.post(f"{server.url}/v1/generate", json={"prompt": prompt, "max_tokens": 4}, timeout=60)
            assert r.status_code == 200, r.text
        with requests.post(f"{server.url}/v1/generate", json={"prompt": "one plus one equals", "max_tokens": 8,
                                                              "stream": True}, stream=True, timeout=60) as r:
            assert r.status_code == 200 and list(r.iter_lines())
        r = requests.post(f"{server.url}/v1/completions", json={"prompt": "six plus one equals", "max_tokens": 3},
                          timeout=60)
        assert r.status_code == 200, r.text
        r = requests.post(f"{server.url}/v1/generate", json={"prompt": "one plus " * 2000, "max_tokens": 1},
                          timeout=60)
        assert r.status_code == 400, r.text
        text = requests.get(f"{server.url}/metrics", timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_dashboard_metric_is_exported(scraped_names):
    used = set().union(*(metric_names(e) for e in queries(dashboard())))
    assert len(used) >= 12, used
    missing = sorted(used - scraped_names)
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"


def test_a_fresh_server_shows_every_labelled_counter_at_zero(tmp_path):
    """Before any request, each known finish_reason and error type is a series at 0 (not "No data")."""
    with running_server(tmp_path) as server:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
    samples = {(s.name, s.labels.get("finish_reason") or s.labels.get("type")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name in ("attnserve_request_success_total", "attnserve_request_errors_total")}
    for reason in ("stop", "length"):
        assert samples[("attnserve_request_success_total", reason)] == 0
    for error_type in ("validation", "context_length_exceeded", "attention_payload_too_large", "overloaded",
                       "cancelled", "timeout", "internal_error", "unauthorized"):
        assert samples[("attnserve_request_errors_total", error_type)] == 0
    used = set().union(*(metric_names(e) for e in queries(dashboard())))
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert not sorted(used - exported), "a fresh server lacks series the dashboard shows"
