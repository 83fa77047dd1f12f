"""The LitServe server: one engine-owning LitAPI, and the public routes of API.md around it.

LitServe gives us worker processes, its request queue and the uvicorn processes. The public
generation routes are ours (so each has its real schema in /openapi.json and refuses bad input with
a real status before a stream starts); they hand requests to LitServe's worker queue through
`Dispatcher`. LitServe's own route for the LitAPI is internal and taken off the public app.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import multiprocessing as mp
from collections.abc import Coroutine
from pathlib import Path

import litserve as ls
import litserve.transport.factory as transport_factory
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from litserve.transport.zmq_queue import Broker
from litserve.transport.zmq_transport import ZMQTransport
from litserve.utils import WorkerSetupStatus
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from server import metrics as prom
from server import native
from server.chat import ChatTemplate
from server.generation import ERROR_STATUS, Admission, ApiError, Dispatcher, EventStream
from server.openai_compat import DONE, OpenAIFormatter, sse
from server.schemas import (
    AttentionRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.settings import Settings
from server.worker import INTERNAL_PATH, EngineAPI

STATIC = Path(__file__).parent / "static"
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 413, 429)}
NDJSON, SSE = "application/x-ndjson", "text/event-stream"
# HTTPExceptions raised before our code runs (FastAPI: a body that does not parse; LitServe: a body
# over max_payload_size), answered with API.md's error body like every other refusal.
HTTP_ERROR_TYPES = {400: "invalid_request", 413: "payload_too_large"}


class Service:
    """What the HTTP routes need: the tokenizer and model shape (for checks before queueing)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.tokenizer = Tokenizer.from_dir(settings.checkpoint)
        self.config = ModelConfig.load(settings.checkpoint)
        self.max_context = min(settings.max_context or self.config.max_context, self.config.max_context)
        self.model_name = settings.served_model_name
        self.chat_template = ChatTemplate(
            self.tokenizer.chat_template,
            bos_token=self.tokenizer.token_text(self.tokenizer.bos_id) if self.tokenizer.bos_id is not None else "",
            eos_token=self.tokenizer.token_text(self.tokenizer.eos_id) if self.tokenizer.eos_id is not None else "")
        self.dispatcher: Dispatcher | None = None

    def payload(self, prompt_ids: list[int], *, max_tokens: int, sampling: dict, seed: int | None,
                stop: list[str], logprobs: int | None, ignore_eos: bool,
                attention: AttentionRequest | None) -> dict:
        """Check what needs the model (context, attention shape and size) → the worker's payload."""
        n = len(prompt_ids)
        if n > self.max_context:
            raise ApiError(400, "context_length_exceeded",
                           f"the prompt has {n} tokens but the context holds at most {self.max_context}",
                           prompt_tokens=n, max_context=self.max_context)
        spec = None
        if attention is not None:
            spec = attention.spec_kwargs()
            self._check_attention(spec, n, max_tokens)
        return {"prompt_ids": prompt_ids, "max_tokens": max_tokens, "sampling": sampling, "seed": seed,
                "stop": list(stop), "logprobs": logprobs, "ignore_eos": ignore_eos, "attention": spec}

    def _check_attention(self, spec: dict, n: int, max_tokens: int) -> None:
        c = self.config
        for name, limit in (("layers", c.n_layers), ("heads", c.n_heads)):
            values = spec[name]
            if not isinstance(values, str) and max(values) >= limit:
                raise ApiError(400, "invalid_request", f"attention.{name} must be indices in [0, {limit}), "
                               f"got {list(values)}", param=f"attention.{name}")
        layers = c.n_layers if spec["layers"] == "all" else len(spec["layers"])
        heads = spec["heads"]
        heads = {"all": c.n_heads, "mean": 1}[heads] if isinstance(heads, str) else len(heads)
        generated = min(max_tokens, self.max_context - n + 1)
        rows = generated * n + generated * (generated - 1) // 2     # token i's row has n + i keys
        if spec["include_prompt"]:
            rows += n * (n + 1) // 2
        floats = layers * heads * rows
        if floats > self.settings.max_attention_floats:
            raise ApiError(400, "attention_payload_too_large",
                           f"this request's attention would be {floats} numbers ({layers} layers × {heads} "
                           f"heads × {rows} rows·keys); the limit is {self.settings.max_attention_floats}: "
                           "ask for fewer layers or heads, heads \"mean\", fewer max_tokens, or "
                           "include_prompt false", floats=floats, limit=self.settings.max_attention_floats)

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=not (parse_special and self._starts_with_bos(text)),
                                     parse_special=parse_special)

    def _starts_with_bos(self, text: str) -> bool:
        bos = self.chat_template.bos_token
        return bool(bos) and text.startswith(bos)


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


class _ZMQTransport(ZMQTransport):
    """LitServe's ZMQ transport, closable in processes that never used it."""

    def close(self, **kwargs) -> None:
        if self._zmq:
            self._zmq.close()

    def __reduce__(self):
        return _ZMQTransport, (self.backend_address, self.frontend_address)


def _zmq_transport(config):
    """LitServe 0.2.19's own factory swaps the two addresses (and `fast_queue=True` never reaches
    it), so requests hang: build the transport here with the addresses the right way round."""
    broker = Broker()
    broker.start()
    config.frontend_address, config.backend_address = broker.frontend_address, broker.backend_address
    return _ZMQTransport(backend_address=broker.backend_address, frontend_address=broker.frontend_address)


class AttnServer(ls.LitServer):
    """LitServer, plus what a restarted worker needs to recover (see EngineAPI.setup)."""

    def launch_single_inference_worker(self, lit_api: EngineAPI, worker_id: int):
        lit_api.request_queue = self._get_request_queue(lit_api.api_path)
        lit_api.restarted = True
        return super().launch_single_inference_worker(lit_api, worker_id)


def build_server(settings: Settings) -> ls.LitServer:
    """The LitServer with every route of API.md; call `.run(...)` (see server/__main__.py)."""
    prom.reset_metrics_dir()
    service = Service(settings)
    spawn = mp.get_context("spawn")
    readers, writers = zip(*(spawn.Pipe(duplex=False) for _ in range(settings.workers)))
    api = EngineAPI(settings, list(readers))
    middlewares = []
    if settings.cors_origins:
        middlewares.append((CORSMiddleware, {"allow_origins": settings.cors_origins, "allow_methods": ["*"],
                                             "allow_headers": ["*"]}))
    server = AttnServer(api, accelerator=settings.device, devices=1, workers_per_device=settings.workers,
                          timeout=False, max_payload_size=settings.max_body_bytes, middlewares=middlewares,
                          restart_workers=True)
    if settings.transport == "zmq":
        transport_factory._create_zmq_transport = _zmq_transport
        server.transport_config.transport_type = "zmq"
    app = server.app
    # LitServe's route to the LitAPI is internal (Dispatcher calls its handler); "/" is the viewer;
    # "/health" is ours (LitServe's answers without a Content-Type).
    app.router.routes = [r for r in app.router.routes
                         if getattr(r, "path", None) not in (INTERNAL_PATH, "/", "/health")]
    metrics = prom.Metrics(service.model_name, service.max_context)
    capacity = settings.workers * settings.max_batch + settings.max_queue
    service.dispatcher = Dispatcher(server, api, admission=Admission(spawn.Value("i", 0), capacity),
                                    cancel_writers=list(writers), metrics=metrics,
                                    max_request_seconds=settings.max_request_seconds)
    add_routes(app, service, authorization(settings), metrics, ready=lambda: _workers_ready(server))
    return server


def _workers_ready(server: ls.LitServer) -> bool:
    """LitServe's readiness: every inference worker has finished setup() (again, after a restart)."""
    status = server.workers_setup_status
    return bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())


def add_routes(app: FastAPI, service: Service, auth, metrics: prom.Metrics, *, ready) -> None:
    guarded = [Depends(auth)]

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the offending input, which may be NaN or inf (Python's
        # JSON parser accepts them) and then fails to encode: a 500 for bad input. Not here.
        metrics.error("validation")
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)        # nobody is listening (nginx's "client closed request")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.error(exc.body["error"]["type"])
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
        payload = service.payload(service.encode(body.prompt), max_tokens=body.max_tokens,
                                  sampling=body.sampling_params(), seed=body.seed, stop=body.stop,
                                  logprobs=body.logprobs, ignore_eos=body.ignore_eos, attention=body.attention)
        # A client that leaves while its request waits for a slot must not keep its place.
        stream = await _unless_client_leaves(service.dispatcher.open(payload), request)
        if body.stream:
            return StreamingResponse(_ndjson(stream), media_type=NDJSON)
        events = await _collect(stream, request)
        if events[-1]["type"] == "error":
            return _error_response(events[-1])
        return JSONResponse(native.collect(events))

    async def openai_route(body: CompletionRequest | ChatCompletionRequest, request: Request, kind: str):
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            prompt_ids = service.encode(service.chat_template.render(messages),
                                        parse_special=service.chat_template.source is not None)
            max_tokens = body.max_new_tokens()
        else:
            prompt_ids, max_tokens = service.encode(body.prompt), body.max_tokens
        logprobs = body.num_logprobs()
        payload = service.payload(prompt_ids, max_tokens=max_tokens, sampling=body.sampling_params(),
                                  seed=body.seed, stop=body.stop, logprobs=logprobs,
                                  ignore_eos=body.ignore_eos, attention=body.attention)
        formatter = OpenAIFormatter(kind, service.model_name, include_usage=body.include_usage,
                                    logprobs=logprobs, attention=body.attention is not None)
        stream = await _unless_client_leaves(service.dispatcher.open(payload), request)
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
        return await openai_route(body, request, "completion")

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=guarded,
              responses=ERRORS | {200: {
                  "content": {SSE: _sse_event("ChatCompletionChunk")},
                  "description": "One chat completion, or server-sent chunks ending `data: [DONE]`."}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await openai_route(body, request, "chat")

    @app.get("/v1/models", response_model=ModelList, dependencies=guarded)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=service.model_name, max_context=service.max_context)])

    @app.post("/v1/tokenize", response_model=TokenizeResponse, dependencies=guarded, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        ids = service.tokenizer.encode(body.text, add_bos=body.add_special_tokens)
        return TokenizeResponse(tokens=[{"id": i, "text": service.tokenizer.token_text(i)} for i in ids],
                                count=len(ids), max_context=service.max_context)

    @app.post("/v1/detokenize", response_model=DetokenizeResponse, dependencies=guarded, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
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
