"""Prometheus metrics, aggregated over every process (HTTP servers and inference workers).

prometheus_client's multiprocess mode keeps each process's values in files under
PROMETHEUS_MULTIPROC_DIR, which must be set before prometheus_client is imported in every process:
this module sets it (inherited by spawned workers) before importing it. Where it was not set, the
process that first imports this module makes a temporary directory and removes it when it exits.
Names follow API.md and vLLM's; every series carries `model_name`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:       # spawned workers inherit the parent's
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_dir = tempfile.mkdtemp(prefix="attnserve-metrics-")
    atexit.register(shutil.rmtree, _own_dir, ignore_errors=True)

from typing import get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from model.limits import FinishReason
from server.errors import ERROR_TYPES

LABELS = ["model_name"]
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


def buckets_1_2_5(maximum: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, … up to and including `maximum` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= maximum:
                return tuple(out) + (maximum,)
            out.append(m * scale)
        scale *= 10


class Metrics:
    """All metrics of one server, bound to its model name. registry=None: in multiprocess mode the
    values live in files that `render` collects, so nothing needs the default registry."""

    def __init__(self, model_name: str, max_context: int):
        token_buckets = buckets_1_2_5(max_context)
        self.ttft = Histogram("attnserve_time_to_first_token_seconds", "Time from arrival to first token.",
                              LABELS, buckets=LATENCY_BUCKETS, registry=None).labels(model_name)
        self.itl = Histogram("attnserve_inter_token_latency_seconds", "Time between consecutive tokens.",
                             LABELS, buckets=LATENCY_BUCKETS, registry=None).labels(model_name)
        self.e2e = Histogram("attnserve_e2e_request_latency_seconds", "Time from arrival to the last byte.",
                             LABELS, buckets=E2E_BUCKETS, registry=None).labels(model_name)
        self.queue_time = Histogram("attnserve_request_queue_time_seconds", "Time waiting for a slot.",
                                    LABELS, buckets=LATENCY_BUCKETS, registry=None).labels(model_name)
        self.prompt_tokens = Histogram("attnserve_request_prompt_tokens",
                                       "Context length (prompt tokens) at admission.", LABELS,
                                       buckets=token_buckets, registry=None).labels(model_name)
        self.generation_tokens = Histogram("attnserve_request_generation_tokens", "Tokens generated per request.",
                                           LABELS, buckets=token_buckets, registry=None).labels(model_name)
        self.prompt_tokens_total = Counter("attnserve_prompt_tokens", "Prompt tokens processed (prefill).",
                                           LABELS, registry=None).labels(model_name)
        self.generation_tokens_total = Counter("attnserve_generation_tokens", "Tokens generated.",
                                               LABELS, registry=None).labels(model_name)
        self._success = Counter("attnserve_request_success", "Requests finished, by finish_reason.",
                                LABELS + ["finish_reason"], registry=None)
        self._errors = Counter("attnserve_request_errors", "Requests refused or failed, by error type.",
                               LABELS + ["type"], registry=None)
        self.running = Gauge("attnserve_num_requests_running", "Requests in a KV-cache slot.", LABELS,
                             multiprocess_mode="livesum", registry=None).labels(model_name)
        self.waiting = Gauge("attnserve_num_requests_waiting", "Requests waiting for a slot.", LABELS,
                             multiprocess_mode="livesum", registry=None).labels(model_name)
        self.kv_usage = Gauge("attnserve_kv_cache_usage_ratio",
                              "Fraction of KV-cache positions in use (the fullest worker's).", LABELS,
                              multiprocess_mode="livemax", registry=None).labels(model_name)
        self.decode_batch = Histogram("attnserve_decode_batch_size",
                                      "Requests decoded together in one engine step (continuous batching).",
                                      LABELS, buckets=buckets_1_2_5(256), registry=None).labels(model_name)
        self.model_name = model_name
        # Every known label starts at 0, so a fresh server's dashboard shows 0 rather than no data.
        for reason in get_args(FinishReason):
            self._success.labels(model_name, reason)
        for error_type in ERROR_TYPES:
            self._errors.labels(model_name, error_type)

    def success(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()

    def error(self, error_type: str) -> None:
        self._errors.labels(self.model_name, error_type).inc()


def reset_metrics_dir() -> Path:
    """Delete stale per-process files left by an earlier run (call once, before workers start)."""
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (they would otherwise count forever)."""
    multiprocess.mark_process_dead(pid)


def render() -> tuple[bytes, str]:
    """The aggregated exposition text of every process, and its content type."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
