"""What both clients share before any I/O: where to connect, timeouts, the retry policy, and
request bodies built (and validated) from keyword arguments with the server's own Pydantic models.

Sampling is given either as a schema object (`sampling=TopPSampling(p=0.9, temperature=0.8)`, or
its dict) or as plain keywords: no keyword at all => greedy; else the server's own rule for OpenAI's
knobs (`server.schemas.strategy_from_knobs`), at `temperature` (default 1.0). Two knobs on, or a
sampling object together with keywords, is a client-side `pydantic.ValidationError`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clients.errors import parse_retry_after
from server.schemas import (
    MAX_TEMPERATURE,
    MAX_TOP_K,
    AnalyzeRequest,
    AttentionRequest,
    DetokenizeRequest,
    GenerateRequest,
    GreedySampling,
    LensRequest,
    Sampling,
    TokenizeRequest,
    strategy_from_knobs,
)

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, API_KEY_ENV = "ATTNSERVE_URL", "ATTNSERVE_API_KEY"
RETRY_STATUSES = frozenset({429, 503})
NDJSON = "application/x-ndjson"


def resolve_url(base_url: str | None) -> str:
    """The argument, else ATTNSERVE_URL, else the server's default address."""
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """The argument, else ATTNSERVE_API_KEY, else none (an empty string means none)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return key or None


def default_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "attnserve-client/0.1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


@dataclass(frozen=True)
class Timeout:
    """Seconds to wait for a connection, and for each read (a whole non-streaming response, or the
    next streamed event). The read default is the server's default request limit."""

    connect: float = 5.0
    read: float = 600.0

    @classmethod
    def of(cls, value: Timeout | float | tuple[float, float] | None) -> Timeout:
        if value is None:
            return cls()
        if isinstance(value, Timeout):
            return value
        if isinstance(value, tuple):
            return cls(*value)
        return cls(float(value), float(value))


@dataclass(frozen=True)
class Retry:
    """The retry rule of both clients: a request that got no response (the connection failed or
    dropped before a status line) or a 429 / 503 is sent again, up to `max_retries` times; nothing
    is retried once a stream has started, nor after a read timeout (the server may still be working).

    The wait is the server's Retry-After when it gives one (up to `max_retry_after` s), else
    `backoff * 2**attempt` (with jitter) capped at `max_backoff`.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def after(self, attempt: int, *, status: int | None = None, retry_after: str | None = None) -> float | None:
        """Seconds to wait before sending again the attempt (from 0) that got `status` (None: no
        response at all), or None: it is not retried."""
        if attempt >= self.max_retries or (status is not None and status not in RETRY_STATUSES):
            return None
        return self.wait(attempt, retry_after)

    def wait(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to sleep before retry number `attempt + 1` (attempt counts from 0)."""
        seconds = parse_retry_after(retry_after)
        if seconds is not None and seconds <= self.max_retry_after:
            return seconds
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)


class SamplingChoice(BaseModel):
    """A sampling object or plain keywords → one strategy (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sampling: Sampling | None = None
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K, description="0 or -1: off")
    top_p: float | None = Field(None, gt=0, le=1, description="1: off")
    min_p: float | None = Field(None, ge=0, lt=1, description="0: off")
    typical_p: float | None = Field(None, gt=0, le=1, description="1: off")

    def _keywords(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"sampling"}).items() if v is not None}

    @model_validator(mode="after")
    def _one_strategy(self):
        if self.sampling is not None and self._keywords():
            raise ValueError(f"give sampling={self.sampling!r} or sampling keywords "
                             f"({', '.join(f'{k}={v}' for k, v in self._keywords().items())}), not both")
        self.resolve()                    # two truncation knobs on: a ValueError naming them
        return self

    def resolve(self) -> Sampling:
        if self.sampling is not None:
            return self.sampling
        if not self._keywords():
            return GreedySampling()
        return strategy_from_knobs(temperature=1.0 if self.temperature is None else self.temperature,
                                   top_k=self.top_k, top_p=1.0 if self.top_p is None else self.top_p,
                                   min_p=self.min_p or 0.0,
                                   typical_p=1.0 if self.typical_p is None else self.typical_p)


def sampling_from(sampling: Sampling | dict | None = None, **keywords: float | int | None) -> Sampling:
    """The strategy for a sampling object (or dict) or plain keywords; raises ValidationError."""
    return SamplingChoice(sampling=sampling, **keywords).resolve()


class GenerateOptions(TypedDict, total=False):
    """Keyword arguments of `generate` and `stream` (API.md's `POST /v1/generate`); leave one out
    for the server's default."""

    max_tokens: int
    sampling: Sampling | dict
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    seed: int
    stop: str | Sequence[str]
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    logprobs: int
    ignore_eos: bool
    attention: AttentionRequest | dict | bool


def generate_body(prompt: str, *, stream: bool, max_tokens: int | None = None,
                  sampling: Sampling | dict | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                  typical_p: float | None = None, seed: int | None = None,
                  stop: str | Sequence[str] | None = None, repetition_penalty: float | None = None,
                  frequency_penalty: float | None = None, presence_penalty: float | None = None,
                  logprobs: int | None = None, ignore_eos: bool | None = None,
                  attention: AttentionRequest | dict | bool | None = None) -> dict[str, Any]:
    """The JSON body of `POST /v1/generate`, validated by the server's `GenerateRequest`.
    `attention=True` asks for everything (all layers and heads, with the prompt's)."""
    strategy = sampling_from(sampling, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_p=min_p, typical_p=typical_p)
    if attention is True:
        attention = AttentionRequest()
    elif attention is False:
        attention = None
    if isinstance(stop, str):
        stop = [stop]
    given = {"max_tokens": max_tokens, "seed": seed, "stop": stop,
             "repetition_penalty": repetition_penalty, "frequency_penalty": frequency_penalty,
             "presence_penalty": presence_penalty, "logprobs": logprobs, "ignore_eos": ignore_eos,
             "attention": attention}
    request = GenerateRequest(prompt=prompt, stream=stream, sampling=strategy,
                              **{k: v for k, v in given.items() if v is not None})
    return request.model_dump(mode="json", exclude_none=True)


class AnalyzeOptions(TypedDict, total=False):
    """Keyword arguments of `analyze` (API.md's `POST /v1/analyze`) besides the text."""

    ids: Sequence[int]
    prompt: str
    completion: str
    model: str
    attention: AttentionRequest | dict | bool
    logprobs: int
    logit_lens: LensRequest | dict | bool


def analyze_body(text: str | None = None, *, ids: Sequence[int] | None = None, prompt: str | None = None,
                 completion: str | None = None, model: str | None = None,
                 attention: AttentionRequest | dict | bool | None = None, logprobs: int | None = None,
                 logit_lens: LensRequest | dict | bool | None = None) -> dict[str, Any]:
    """The JSON body of `POST /v1/analyze`, validated by the server's `AnalyzeRequest`. `attention=True`
    asks for every layer and head, `logit_lens=True` for the lens on every layer (top 5)."""
    given = {"text": text, "ids": list(ids) if ids is not None else None, "prompt": prompt,
             "completion": completion, "model": model, "logprobs": logprobs,
             "attention": AttentionRequest() if attention is True else attention or None,
             "logit_lens": LensRequest() if logit_lens is True else logit_lens or None}
    request = AnalyzeRequest(**{k: v for k, v in given.items() if v is not None})
    return request.model_dump(mode="json", exclude_none=True)


def tokenize_body(text: str, *, add_special_tokens: bool = True) -> dict[str, Any]:
    return TokenizeRequest(text=text, add_special_tokens=add_special_tokens).model_dump(mode="json")


def detokenize_body(ids: Sequence[int]) -> dict[str, Any]:
    return DetokenizeRequest(ids=list(ids)).model_dump(mode="json")
