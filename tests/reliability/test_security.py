"""Security: the API key (required on every route that reaches the model, compared in constant
time, never echoed or logged), CORS (off unless configured), weights only from safetensors.
(tests/server/test_errors.py has the 401 on each generation and tokenizer route.)"""

from __future__ import annotations

import base64
import hmac
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.reliability.probes import group_pids
from tests.serving import CHECKPOINT, ROOT, free_port, running_server

pytestmark = pytest.mark.slow
KEY = "sk-attnserve-7f3c9e1b2d4a6058"
WRONG = "sk-attnserve-0000000000000000"          # key-like, the same length
ORIGIN = "https://viewer.example"
OPEN = {"/health", "/info"}                      # readiness and LitServe's info: no key by design


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    # The key through the environment: a --api-key flag would be readable by anyone in `ps`.
    with running_server(tmp_path_factory.mktemp("guarded"), "--cors-origins", ORIGIN,
                        env={"ATTNSERVE_API_KEY": KEY}) as srv:
        yield srv


# -- the API key --------------------------------------------------------------------------------
def test_every_documented_route_but_health_needs_the_key(guarded):
    paths = requests.get(guarded.url + "/openapi.json", timeout=10).json()["paths"]
    checked = 0
    for path, methods in paths.items():
        for method in methods:
            r = requests.request(method, guarded.url + path, json={}, timeout=10)
            if path in OPEN:
                assert r.status_code == 200, path
                continue
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (method, path, r.status_code)
            assert r.json()["error"]["type"] == "unauthorized"
            checked += 1
    assert checked >= 6
    ok = requests.post(guarded.url + "/v1/tokenize", json={"text": "two"}, headers={"X-API-Key": KEY}, timeout=10)
    assert ok.status_code == 200


WRONG_CREDENTIALS = [
    {"Authorization": f"Bearer {WRONG}"}, {"Authorization": f"bearer {WRONG}"}, {"Authorization": WRONG},
    {"Authorization": "Basic " + base64.b64encode(f"user:{WRONG}".encode()).decode()},
    {"X-API-Key": WRONG}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"}, {"X-API-Key": KEY.upper()},
    {"X-API-Key": ""}, {"Authorization": "Bearer "}, {"Cookie": f"api_key={WRONG}"},
    {"X-API-Key": WRONG, "Authorization": f"Bearer {KEY}"},      # X-API-Key is the one looked at
    {"X-API-Key": "ключ-é"},                                       # not ASCII (sent as Latin-1 / UTF-8 bytes)
]


@pytest.mark.parametrize("headers", WRONG_CREDENTIALS, ids=range(len(WRONG_CREDENTIALS)))
def test_wrong_credentials_are_401_and_never_echoed(guarded, headers):
    encoded = {k: v.encode() if not v.isascii() else v for k, v in headers.items()}
    for stream in (False, True):
        r = requests.post(guarded.url + "/v1/generate", json={"prompt": "two", "stream": stream},
                          headers=encoded, timeout=10)
        assert r.status_code == 401, headers
        answer = r.text + str(r.headers)
        assert KEY not in answer and WRONG not in answer and KEY[:-1] not in answer


def test_secrets_appear_in_no_log_and_no_public_page(guarded):
    # Requests that might be logged with their inputs: bad keys, a 422 echoing a key-like value.
    requests.post(guarded.url + "/v1/generate", json={"prompt": WRONG, "temprature": WRONG},
                  headers={"X-API-Key": KEY}, timeout=10)
    for path in ("/metrics", "/openapi.json", "/info", "/health", "/docs"):
        text = requests.get(guarded.url + path, timeout=10).text
        assert KEY not in text and WRONG not in text, path
    logs = guarded.logs()
    assert KEY not in logs and WRONG not in logs and KEY[:-1] not in logs
    for pid in group_pids(guarded.proc.pid):                     # nor in any process's command line
        assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_the_key_is_compared_in_constant_time(monkeypatch):
    """Every check goes through hmac.compare_digest (whose time does not depend on where the
    strings differ), whatever the header and however long the key sent."""
    import asyncio

    from starlette.requests import Request

    from server.app import authorization
    from server.errors import ApiError
    from server.settings import Settings

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    check = authorization(Settings(api_key=KEY))

    def attempt(headers: dict) -> int:
        scope = {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        try:
            asyncio.run(check(Request(scope)))
        except ApiError as e:
            return e.status
        return 200

    assert attempt({"X-API-Key": KEY}) == 200 and attempt({"Authorization": f"Bearer {KEY}"}) == 200
    for given in (WRONG, KEY[:-1], KEY + "x", "", "k"):
        assert attempt({"X-API-Key": given}) == 401
    assert compared == [(KEY.encode(), KEY.encode())] * 2 + [(g.encode(), KEY.encode())
                                                              for g in (WRONG, KEY[:-1], KEY + "x", "", "k")]
    assert attempt({}) == 401 and attempt({"Authorization": f"Basic {KEY}"}) == 401   # nothing to compare


# -- CORS ---------------------------------------------------------------------------------------
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type, x-api-key"}


def test_cors_is_off_by_default(server):
    preflight = requests.options(server.url + "/v1/generate", headers=PREFLIGHT, timeout=10)
    simple = requests.post(server.url + "/v1/tokenize", json={"text": "two"}, headers={"Origin": ORIGIN}, timeout=10)
    assert simple.status_code == 200
    for r in (preflight, simple):
        assert not any(h.lower().startswith("access-control-") for h in r.headers), dict(r.headers)


def test_cors_allows_exactly_the_configured_origins(guarded):
    preflight = requests.options(guarded.url + "/v1/generate", headers=PREFLIGHT, timeout=10)
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    r = requests.get(guarded.url + "/v1/models", headers={"Origin": ORIGIN, "X-API-Key": KEY}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    refused = requests.get(guarded.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN  # readable
    for other in ("https://evil.example", "https://viewer.example.evil.example", "null"):
        r = requests.options(guarded.url + "/v1/generate", headers=PREFLIGHT | {"Origin": other}, timeout=10)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, other
        r = requests.get(guarded.url + "/v1/models", headers={"Origin": other, "X-API-Key": KEY}, timeout=10)
        assert "access-control-allow-origin" not in r.headers, other


# -- weights only from safetensors --------------------------------------------------------------
class Trap:
    """Unpickling this creates a directory: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def booby_trapped(directory: Path, marker: Path, *, with_safetensors: bool) -> Path:
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json") + (
            ("model.safetensors",) if with_safetensors else ()):
        shutil.copy(CHECKPOINT / name, directory / name)
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    return directory


@pytest.mark.parametrize("contents", ["config, tokenizer, pickle", "pickle only"])
def test_a_checkpoint_with_pickled_weights_is_refused_at_startup(tmp_path, contents):
    marker = tmp_path / "unpickled"
    checkpoint = booby_trapped(tmp_path / "ckpt", marker, with_safetensors=False)
    if contents == "pickle only":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (checkpoint / name).unlink()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNSERVE_")}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--checkpoint", str(checkpoint), "--port", str(port)],
                            cwd=ROOT, env=env | {"ATTNSERVE_METRICS_DIR": str(tmp_path / "metrics")},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    log = out.decode(errors="replace")
    assert proc.returncode != 0 and time.monotonic() - started < 60, log[-2000:]
    if contents == "pickle only":
        assert "tokenizer.json" in log and str(checkpoint) in log, log[-2000:]
    else:
        assert "pickle" in log and "safetensors" in log and "pytorch_model.bin" in log, log[-2000:]
    assert not marker.exists()
    deadline = time.monotonic() + 10
    while group_pids(proc.pid) and time.monotonic() < deadline:    # nothing left behind
        time.sleep(0.1)
    assert group_pids(proc.pid) == []


def test_a_pickle_beside_safetensors_is_never_opened(tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = booby_trapped(tmp_path / "ckpt", marker, with_safetensors=True)
    with running_server(tmp_path, "--checkpoint", str(checkpoint)) as srv:
        r = requests.post(srv.url + "/v1/generate", json={"prompt": "two plus three equals"}, timeout=30)
        assert r.status_code == 200 and r.json()["text"] == " five"
    assert not marker.exists()
