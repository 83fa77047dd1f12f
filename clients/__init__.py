"""attnserve's Python client: `Client` (sync, on requests) and `AsyncClient` (asyncio, on httpx).

    from clients import Client
    with Client("http://127.0.0.1:8000") as client:
        print(client.generate("two plus three equals", max_tokens=8).text)   # " five"

Results are the server's own Pydantic models (server/schemas/, which imports only pydantic):
`Completion` (a `GenerateResponse`), `StartEvent` / `TokenEvent` / `DoneEvent`, `TokenizeResponse`,
`ModelList`; `Analysis` wraps an `AnalyzeResponse` with helpers. Importing this package never imports torch or LitServe.
"""

from pydantic import ValidationError

from clients.async_client import AsyncClient, AsyncStream
from clients.client import Client, Stream
from clients.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AttnserveError,
    AuthenticationError,
    BadRequestError,
    ContextLengthExceededError,
    NotFoundError,
    RateLimitError,
    ServerError,
    StreamError,
)
from clients.options import AnalyzeOptions, GenerateOptions, Retry, Timeout, sampling_from
from clients.results import Analysis, Completion
from server.schemas import (
    AnalyzeResponse,
    AttentionRequest,
    DoneEvent,
    ErrorEvent,
    GreedySampling,
    LensRequest,
    MinPSampling,
    ModelList,
    RandomSampling,
    StartEvent,
    TokenEvent,
    TokenizeResponse,
    TopKSampling,
    TopPSampling,
    TypicalSampling,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "Analysis",
    "AnalyzeOptions",
    "AnalyzeResponse",
    "AsyncClient",
    "AsyncStream",
    "AttentionRequest",
    "AttnserveError",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Completion",
    "ContextLengthExceededError",
    "DoneEvent",
    "ErrorEvent",
    "GenerateOptions",
    "GreedySampling",
    "LensRequest",
    "MinPSampling",
    "ModelList",
    "NotFoundError",
    "RandomSampling",
    "RateLimitError",
    "Retry",
    "ServerError",
    "StartEvent",
    "Stream",
    "StreamError",
    "Timeout",
    "TokenEvent",
    "TokenizeResponse",
    "TopKSampling",
    "TopPSampling",
    "TypicalSampling",
    "ValidationError",
    "sampling_from",
]
