"""`POST /v1/analyze`: a look inside a given text — one teacher-forced forward, nothing generated.

Per position: the logprob of the token that is actually there (and the top N the model expected),
the attention [layer][head][q][k ≤ q], and the logit lens [layer][q][k]: what the model would
predict for position q + 1 if it stopped after that layer.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from server.schemas.common import (
    MAX_LOGPROBS,
    MAX_PROMPT_CHARS,
    MAX_TOKEN_ID,
    AttentionMatrix,
    AttentionRequest,
    LensEntry,
    LensRequest,
    Logprob,
    ModelName,
    _OmitNone,
    _Request,
)
from server.schemas.native import TopLogprob

MAX_ANALYZE_IDS = 1_000_000  # a cheap bound; the real limit is the model's context, the server's

ANALYZE_EXAMPLE = {"model": "calculator", "text": "two plus three equals five",
                   "attention": {"layers": "all", "heads": "all"}, "logprobs": 3,
                   "logit_lens": {"layers": "all", "top_k": 5}}


class AnalyzeRequest(_Request):
    """Exactly one of `text`, `ids`, or `prompt` + `completion`."""

    model_config = ConfigDict(json_schema_extra={"examples": [ANALYZE_EXAMPLE]})

    model: ModelName = None
    text: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, description=(
        "The text to read; the beginning-of-sequence token is added as for generation."))
    ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(
        None, min_length=1, max_length=MAX_ANALYZE_IDS, description="Token ids, read as given (no BOS added).")
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, description=(
        "With completion: score the completion after this prompt."))
    completion: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS, description=(
        "With prompt: its tokens are those of prompt + completion after the prompt's; "
        "`completion_logprob` is the sum of their logprobs."))
    attention: AttentionRequest | None = Field(None, description=(
        "Return the attention [layer][head][q][k ≤ q] (include_prompt is ignored); null: none."))
    logprobs: int = Field(0, ge=0, le=MAX_LOGPROBS, description=(
        "Each token's logprob; N > 0: plus the top N the model expected at that position."))
    logit_lens: LensRequest | None = Field(None, description="Return the logit lens; null: none.")

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("text", "ids", "prompt") if getattr(self, name) is not None]
        if (self.prompt is None) != (self.completion is None):
            raise ValueError("prompt and completion go together: give both, or text, or ids")
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, ids, or prompt + completion; got {given or 'none'}")
        return self


class AnalyzedToken(_OmitNone):
    id: int
    text: str
    logprob: Logprob | None = Field(description="log p(this token | the tokens before); null at position 0.")
    top_logprobs: list[TopLogprob] | None = Field(None, description=(
        "The top N of the distribution this token was drawn against (empty at position 0)."))

    @model_serializer(mode="wrap")
    def _keep_null_logprob(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Like every native response, None is left out; but logprob stays null at position 0 (API.md).
        return {k: v for k, v in handler(self).items() if v is not None or k == "logprob"}


class LogitLens(_OmitNone):
    layers: list[int] = Field(description="The layers of `top`, in order.")
    top: list[list[list[LensEntry]]] = Field(description=(
        "[layer index in `layers`][position q][k]: the top-k for position q + 1 after that layer."))


class AnalyzeUsage(_OmitNone):
    prompt_tokens: int
    total_tokens: int


class AnalyzeResponse(_OmitNone):
    id: str
    model: str
    tokens: list[AnalyzedToken]
    attention: AttentionMatrix | None = Field(None, description="[layer][head][q][k ≤ q], when asked for.")
    logit_lens: LogitLens | None = None
    completion_logprob: float | None = Field(None, description="With prompt + completion: the completion's "
                                             "total logprob.")
    usage: AnalyzeUsage
