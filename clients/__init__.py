"""attnserve's Python client: `Client` (sync, on requests) and `AsyncClient` (asyncio, on httpx).

    from clients import Client
    with Client("http://127.0.0.1:8000") as client:
        print(client.generate("two plus three equals", max_tokens=8).text)   # " five"

Results are the server's own Pydantic models (server/schemas/, which imports only pydantic):
`Completion` (a `GenerateResponse`), `StartEvent` / `TokenEvent` / `DoneEvent`, `TokenizeResponse`,
`ModelList`. Importing this package never imports torch or LitServe.
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
from clients.options import GenerateOptions, Retry, Timeout, sampling_from
from clients.results import Completion
from server.schemas import (
    AttentionRequest,
    DoneEvent,
    ErrorEvent,
    GreedySampling,
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
    "APIConnectionError", "APIError", "APITimeoutError", "AsyncClient", "AsyncStream", "AttentionRequest",
    "AttnserveError", "AuthenticationError", "BadRequestError", "Client", "Completion",
    "ContextLengthExceededError", "DoneEvent", "ErrorEvent", "GenerateOptions", "GreedySampling",
    "MinPSampling", "ModelList", "NotFoundError", "RandomSampling", "RateLimitError", "Retry",
    "ServerError", "StartEvent", "Stream", "StreamError", "Timeout", "TokenEvent", "TokenizeResponse",
    "TopKSampling", "TopPSampling", "TypicalSampling", "ValidationError", "sampling_from",
]
