"""One real server for every client test: an API key, and room for exactly one request
(`--max-batch 1 --max-queue 0`), so a slot that is not freed shows up as a 429 at once."""

from __future__ import annotations

import asyncio

import pytest

from clients import AsyncClient, Client
from clients.options import API_KEY_ENV, URL_ENV

API_KEY = "test-key"
PROMPT, ANSWER = "two plus three equals", " five"


@pytest.fixture(scope="package")
def api_server(tmp_path_factory):
    from tests.serving import running_server
    with running_server(tmp_path_factory.mktemp("client-server"), "--api-key", API_KEY, "--max-batch", "1",
                        "--max-queue", "0") as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_client_env(monkeypatch):
    """Tests say where to connect; the developer's shell does not."""
    monkeypatch.delenv(URL_ENV, raising=False)
    monkeypatch.delenv(API_KEY_ENV, raising=False)


class Caller:
    """The same call on `Client` or on `AsyncClient` (a fresh client per call, closed after)."""

    def __init__(self, kind: str, url: str, **client_kwargs):
        self.kind, self.url, self.client_kwargs = kind, url, client_kwargs

    def __call__(self, method: str, *args, **kwargs):
        if self.kind == "sync":
            with Client(self.url, **self.client_kwargs) as client:
                return getattr(client, method)(*args, **kwargs)

        async def call():
            async with AsyncClient(self.url, **self.client_kwargs) as client:
                return await getattr(client, method)(*args, **kwargs)
        return asyncio.run(call())

    def events(self, prompt: str, **options) -> tuple[list, object]:
        """Every event of one stream, and its completion."""
        if self.kind == "sync":
            with Client(self.url, **self.client_kwargs) as client, client.stream(prompt, **options) as stream:
                return list(stream), stream.completion

        async def collect():
            async with AsyncClient(self.url, **self.client_kwargs) as client, \
                    client.stream(prompt, **options) as stream:
                return [event async for event in stream], stream.completion
        return asyncio.run(collect())


@pytest.fixture(params=["sync", "async"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def api(kind, api_server) -> Caller:
    return Caller(kind, api_server.url, api_key=API_KEY)
