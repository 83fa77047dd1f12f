"""The public HTTP app: every route of API.md around LitServe's server and its inference workers.

A route validates its body (FastAPI, 422), turns it into the engine's request and checks it against
the model's limits (server/service.py, 400), then hands it to a worker through server/bridge.py and
answers with the events that come back: NDJSON for /v1/generate, SSE for the OpenAI routes, or one
JSON body when not streaming. A streaming request is refused with its real status before any byte.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import uuid
from collections.abc import Coroutine
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from model.events import AnalysisRequest, GenerationRequest
from server import metrics as prom
from server import native
from server.bridge import INTERNAL_PATH, AttnServer, Bridge, EventStream, Links, use_zmq
from server.errors import ERROR_STATUS, ApiError
from server.openai_compat import DONE, OpenAIFormatter, sse
from server.schemas import (
    AnalyzeRequest,
    AnalyzeResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.service import Models, Service
from server.settings import Settings
from server.worker import EngineAPI

STATIC = Path(__file__).parent / "static"
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429)}
NDJSON, SSE = "application/x-ndjson", "text/event-stream"
# HTTPExceptions raised before our code runs (FastAPI: a body that does not parse; LitServe: a body
# over max_payload_size), answered with API.md's error body like every other refusal.
HTTP_ERROR_TYPES = {400: "invalid_request", 413: "payload_too_large"}


def authorization(settings: Settings):
    """A dependency that checks the API key (when one is set) in constant time."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer <key> "
                           "or X-API-Key: <key>)", headers={"WWW-Authenticate": "Bearer"})
    return check


def build_server(settings: Settings) -> AttnServer:
    """The LitServer with every route of API.md; call `.run(...)` (see server/__main__.py)."""
    prom.reset_metrics_dir()
    models = Models(settings)
    links = Links(settings.workers)
    api = EngineAPI(settings, links)
    middlewares = []
    if settings.cors_origins:
        middlewares.append((CORSMiddleware, {"allow_origins": settings.cors_origins, "allow_methods": ["*"],
                                             "allow_headers": ["*"]}))
    server = AttnServer(api, accelerator=settings.device, devices=1, workers_per_device=settings.workers,
                        timeout=False, max_payload_size=settings.max_body_bytes, middlewares=middlewares,
                        restart_workers=True)
    if settings.transport == "zmq":
        use_zmq(server)
    app = server.app
    # LitServe's route to the worker API is internal (the bridge calls its handler); "/" is the viewer;
    # "/health" is ours (LitServe's answers without a Content-Type).
    app.router.routes = [r for r in app.router.routes
                         if getattr(r, "path", None) not in (INTERNAL_PATH, "/", "/health")]
    bridge = Bridge(server, api, links, capacity=settings.workers * settings.max_batch + settings.max_queue,
                    max_request_seconds=settings.max_request_seconds)
    add_routes(app, models, bridge, authorization(settings), ready=server.workers_ready)
    return server


def add_routes(app: FastAPI, models: Models, bridge: Bridge, auth, *, ready) -> None:
    guarded = [Depends(auth)]

    def served(request: Request, name: str | None) -> Service:
        """The model a request names (404 if not served); its errors are counted under its name."""
        service = models.get(name)
        request.state.service = service
        return service

    def metrics(request: Request) -> prom.Metrics:
        return getattr(request.state, "service", models.default).metrics

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the offending input, which may be NaN or inf (Python's
        # JSON parser accepts them) and then fails to encode: a 500 for bad input. Not here.
        metrics(request).error("validation")
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)        # nobody is listening (nginx's "client closed request")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics(request).error(exc.body["error"]["type"])
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code not in HTTP_ERROR_TYPES:
            return await http_exception_handler(request, exc)      # 404, 405, …: FastAPI's own
        error = ApiError(exc.status_code, HTTP_ERROR_TYPES[exc.status_code], str(exc.detail), headers=exc.headers)
        return await api_error(request, error)

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=guarded, responses=ERRORS | {
        200: {"content": {NDJSON: {"schema": {"$ref": "#/components/schemas/StreamEvent"}}},
              "description": "One JSON object, or NDJSON events when stream is true."}})
    async def generate(body: GenerateRequest, request: Request):
        service = served(request, body.model)
        engine_request = service.request(body, service.prompt_ids(body))
        # A client that leaves while its request waits for a slot must not keep its place.
        stream = await _unless_client_leaves(service.open(bridge, engine_request), request)
        if body.stream:
            return StreamingResponse(_ndjson(stream), media_type=NDJSON)
        events = await _collect(stream, request)
        if events[-1]["type"] == "error":
            return _error_response(events[-1])
        return JSONResponse(native.collect(events))

    async def openai_route(body: CompletionRequest | ChatCompletionRequest, request: Request, kind: str, *,
                           engine_request: GenerationRequest | None = None):
        service = served(request, body.model)
        engine_request = engine_request or service.request(body, service.prompt_ids(body))
        formatter = OpenAIFormatter(kind, service.model_name, include_usage=body.include_usage,
                                    logprobs=engine_request.logprobs, attention=body.attention is not None)
        stream = await _unless_client_leaves(service.open(bridge, engine_request), request)
        if body.stream:
            return StreamingResponse(_sse(stream, formatter), media_type=SSE)
        events = await _collect(stream, request)
        if events[-1]["type"] == "error":
            return _error_response(events[-1])
        return JSONResponse(formatter.response(events))

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=guarded, responses=ERRORS | {
        200: {"content": {SSE: _sse_event("CompletionChunk")},
              "description": "One completion, or server-sent chunks ending `data: [DONE]` when stream is true."}})
    async def completions(body: CompletionRequest, request: Request):
        service = served(request, body.model)
        prompts = service.completions(body)
        if len(prompts) == 1 and not body.echo and body.prompt_logprobs is None:    # the plain case, as chat
            return await openai_route(body, request, "completion", engine_request=prompts[0][1])
        return await completions_route(body, service, prompts, request)

    async def completions_route(body: CompletionRequest, service: Service,
                                prompts: list[tuple[str, GenerationRequest | AnalysisRequest]], request: Request):
        """Several prompts (each a choice, by index) and echo / prompt_logprobs: every prompt's
        request is opened at once, so the engine prefills and decodes them together."""
        shared_id = "cmpl-" + uuid.uuid4().hex
        formatters = [OpenAIFormatter("completion", service.model_name, include_usage=body.include_usage,
                                      logprobs=body.logprobs, attention=body.attention is not None, index=i,
                                      echo=text if body.echo else None, prompt_logprobs=body.prompt_logprobs,
                                      is_special=service.tokenizer.is_special, id=shared_id)
                      for i, (text, _) in enumerate(prompts)]
        streams = await _unless_client_leaves(_open_all(service, bridge, [r for _, r in prompts]), request)
        if body.stream:
            return StreamingResponse(_sse_merged(streams, formatters, include_usage=body.include_usage),
                                     media_type=SSE)
        try:
            results = await _unless_client_leaves(_gather_all(streams), request)
        finally:
            for stream in streams:
                await stream.aclose()
        if failed := next((events for events in results if events[-1]["type"] == "error"), None):
            return _error_response(failed[-1])
        responses = [f.response(events) for f, events in zip(formatters, results)]
        out = responses[0]
        out["choices"] = [r["choices"][0] for r in responses]
        out["usage"] = _sum_usage([r["usage"] for r in responses])
        return JSONResponse(out)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=guarded,
              responses=ERRORS | {200: {
                  "content": {SSE: _sse_event("ChatCompletionChunk")},
                  "description": "One chat completion, or server-sent chunks ending `data: [DONE]`."}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await openai_route(body, request, "chat")

    @app.post("/v1/analyze", response_model=AnalyzeResponse, dependencies=guarded, responses=ERRORS)
    async def analyze(body: AnalyzeRequest, request: Request):
        """One teacher-forced forward over a given text: logprobs, attention, logit lens (API.md)."""
        service = served(request, body.model)
        stream = await _unless_client_leaves(service.open(bridge, service.analysis(body)), request)
        events = await _collect(stream, request)
        if events[-1]["type"] == "error":
            return _error_response(events[-1])
        analysis = events[0]
        del analysis["type"]
        return JSONResponse(analysis)

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded)
    async def model_list() -> ModelList:
        loaded = bridge.links.loaded()
        return ModelList(data=[service.model_card(loaded.get(service.model_name)) for service in models])

    @app.post("/v1/tokenize", response_model=TokenizeResponse, dependencies=guarded, responses=ERRORS)
    async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
        service = served(request, body.model)
        ids = service.tokenizer.encode(body.text, add_bos=body.add_special_tokens)
        return TokenizeResponse(tokens=[{"id": i, "text": service.tokenizer.token_text(i)} for i in ids],
                                count=len(ids), max_context=service.max_context)

    @app.post("/v1/detokenize", response_model=DetokenizeResponse, dependencies=guarded, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        service = served(request, body.model)
        vocab = service.tokenizer.vocab_size
        if bad := [i for i in body.ids if i >= vocab][:5]:
            raise ApiError(400, "invalid_request", f"ids must be below the vocabulary size {vocab}, got {bad}",
                           param="ids")
        return DetokenizeResponse(text=service.tokenizer.decode(body.ids))

    @app.get("/health", response_class=PlainTextResponse, responses={
        200: {"description": "`ok`: the model is loaded and every worker is ready."},
        503: {"content": {"text/plain": {}}, "description": "`not ready`: starting, or a worker is restarting."}})
    async def health() -> PlainTextResponse:
        """Readiness; never needs an API key (for load balancers and container health checks)."""
        if ready():
            return PlainTextResponse("ok")
        return PlainTextResponse("not ready", status_code=503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        body, content_type = prom.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def viewer() -> Response:
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return Response("attnserve is running; the viewer page is not installed.", media_type="text/plain")

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")  # the viewer's CSS/JS

    _document_stream_events(app)


class ClientGone(Exception):
    """The client of a non-streaming request disconnected (the worker counts the cancellation)."""


async def _collect(stream: EventStream, request: Request) -> list[dict]:
    """All events of a non-streaming request; if the client goes away first, cancel it."""
    async def gather() -> list[dict]:
        return [e async for e in stream]

    try:
        return await _unless_client_leaves(gather(), request)
    finally:
        await stream.aclose()                   # a no-op if it finished; else cancels it in its worker


async def _unless_client_leaves(work: Coroutine, request: Request):
    """`work`'s result; or, if the client disconnects first, `work` cancelled and ClientGone."""
    async def client_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.create_task(work), asyncio.create_task(client_gone())
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    raise ClientGone


async def _open_all(service: Service, bridge: Bridge,
                    requests: list[GenerationRequest | AnalysisRequest]) -> list[EventStream]:
    """Open every request at once (each waits for its first event); if one is refused, close the rest."""
    opened = await asyncio.gather(*(service.open(bridge, r) for r in requests), return_exceptions=True)
    if failed := [e for e in opened if isinstance(e, BaseException)]:
        for stream in opened:
            if not isinstance(stream, BaseException):
                await stream.aclose()
        raise failed[0]
    return opened


async def _gather_all(streams: list[EventStream]) -> list[list[dict]]:
    async def gather(stream: EventStream) -> list[dict]:
        return [e async for e in stream]
    return await asyncio.gather(*(gather(s) for s in streams))


def _sum_usage(usages: list[dict]) -> dict:
    return {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


async def _sse_merged(streams: list[EventStream], formatters: list[OpenAIFormatter], *, include_usage: bool):
    """Several prompts' chunks interleaved as their messages arrive (each choice with its index),
    one usage chunk last (summed), then [DONE]; an error ends the stream and cancels the others."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for events in streams[i].messages():
                await queue.put((i, events))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    usages, running = [], len(streams)
    try:
        while running:
            i, events = await queue.get()
            if events is None:
                running -= 1
                continue
            chunks = [c for e in events for c in formatters[i].chunks(e)]
            for c in [c for c in chunks if not c.get("choices", True) and "usage" in c]:
                usages.append(c["usage"])
                chunks.remove(c)
            if chunks:
                yield b"".join(sse(c) for c in chunks)
            if events[-1]["type"] == "error":
                return
        if include_usage:
            usage = formatters[0]._chunk([], usage=_sum_usage(usages))
            yield sse(usage)
        yield DONE
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def _ndjson(stream: EventStream):
    async for lines in stream.messages(parsed=False):     # one write per message, not per token
        yield "".join(line + "\n" for line in lines).encode()


async def _sse(stream: EventStream, formatter: OpenAIFormatter):
    failed = False
    async for events in stream.messages():
        failed = events[-1]["type"] == "error"
        if body := b"".join(sse(chunk) for event in events for chunk in formatter.chunks(event)):
            yield body
    if not failed:
        yield DONE


def _json_safe(value):
    """Non-finite floats (not valid JSON) → their string form; lone surrogates (a JSON string may
    escape one, "\\ud800", but UTF-8 cannot encode it) → backslash escapes; recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _sse_event(chunk: str) -> dict:
    """A text/event-stream media type: in OpenAPI 3.1 its schema describes one event (as 3.2's
    itemSchema does), whose data is a `chunk` as JSON, or `[DONE]` in the last event."""
    data = {"anyOf": [{"type": "string", "contentMediaType": "application/json",
                       "contentSchema": {"$ref": f"#/components/schemas/{chunk}"}},
                      {"const": "[DONE]"}],
            "description": f"A {chunk} as JSON; `[DONE]` in the last event."}
    return {"schema": {"type": "object", "properties": {"data": data}, "required": ["data"]}}


def _error_response(event: dict) -> JSONResponse:
    error = dict(event["error"])
    return JSONResponse({"error": error}, status_code=ERROR_STATUS.get(error["type"], 500))


def _document_stream_events(app: FastAPI) -> None:
    """Put the streamed event and chunk schemas into /openapi.json (FastAPI only adds response_models)."""
    from pydantic.json_schema import models_json_schema

    from server import schemas

    original = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        spec = original()
        models = [(m, "serialization") for m in (schemas.StartEvent, schemas.TokenEvent, schemas.DoneEvent,
                                                  schemas.ErrorEvent, schemas.CompletionChunk,
                                                  schemas.ChatCompletionChunk)]
        _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs.get("$defs", {}))
        components["StreamEvent"] = {"oneOf": [{"$ref": f"#/components/schemas/{n}"} for n in
                                               ("StartEvent", "TokenEvent", "DoneEvent", "ErrorEvent")],
                                     "discriminator": {"propertyName": "type"}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi
