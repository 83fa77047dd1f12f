"""A tiny real HTTP server on an ephemeral port that answers from a script, for retry and error
tests the real server cannot be made to produce on demand (503 twice, a stream cut off, ...).

Each request takes the next step of the script (the last step repeats); a step is a function of the
request handler. `attempts` counts the requests, `requests` keeps (method, path, headers, body).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Step = Callable[[BaseHTTPRequestHandler], None]

COMPLETION = {
    "id": "gen-1", "model": "fake", "text": " five", "tokens": [{"id": 314, "text": " five"}],
    "prompt_tokens": [{"id": 1, "text": "<|bos|>"}], "finish_reason": "stop",
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    "timings": {"queue_ms": 0.1, "ttft_ms": 1.0, "total_ms": 2.0, "tokens_per_second": 100.0}}
EVENTS = [
    {"type": "start", "id": "gen-1", "model": "fake", "prompt_tokens": [{"id": 1, "text": "<|bos|>"}]},
    {"type": "token", "index": 0, "id": 314, "text": " five"},
    {"type": "done", "finish_reason": "stop", "text": " five", "usage": COMPLETION["usage"],
     "timings": COMPLETION["timings"]}]


def reply(status: int, body: object = None, *, headers: dict[str, str] | None = None) -> Step:
    """A whole response; a dict or list body is sent as JSON."""
    def step(handler: BaseHTTPRequestHandler) -> None:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else str(body or "").encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    return step


def error(status: int, error_type: str, message: str, **headers: str) -> Step:
    return reply(status, {"error": {"type": error_type, "message": message}},
                 headers={k.replace("_", "-"): v for k, v in headers.items()})


def ndjson(events: list[dict], *, chunked: bool = False, cut: bool = False) -> Step:
    """A 200 NDJSON stream of `events`; cut=True drops the connection after them (no done event
    unless given), chunked=True uses chunked transfer encoding (so the cut is a broken chunk)."""
    def step(handler: BaseHTTPRequestHandler) -> None:
        if chunked:
            handler.protocol_version = "HTTP/1.1"  # chunked encoding needs it
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for event in events:
            line = (json.dumps(event) + "\n").encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
            handler.wfile.flush()
        if chunked and not cut:
            handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True
    return step


def hang_up(handler: BaseHTTPRequestHandler) -> None:
    """Close the connection without any response (the client sees it dropped)."""
    handler.close_connection = True


def sleep(seconds: float, then: Step) -> Step:
    def step(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        then(handler)
    return step


class FakeServer:
    def __init__(self, script: list[Step]):
        self.script, self.attempts, self.requests = list(script), 0, []
        self._lock = threading.Lock()

    def take(self, handler: BaseHTTPRequestHandler) -> Step:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((handler.command, handler.path, dict(handler.headers),
                                  json.loads(body) if body else None))
            step = self.script[min(self.attempts, len(self.script) - 1)]
            self.attempts += 1
        return step


@contextmanager
def fake_server(*script: Step):
    """Serve `script` on 127.0.0.1:<free port>; yields the FakeServer with `.url`."""
    fake = FakeServer(list(script))

    class Handler(BaseHTTPRequestHandler):
        def handle_one_request(self):
            super().handle_one_request()
            self.close_connection = True  # one request per connection keeps the attempts countable

        def do_GET(self):
            fake.take(self)(self)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass  # a client that hung up on purpose is not news

    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
