"""The native API's requests, responses and streamed events: `POST /v1/generate` (one JSON object,
or NDJSON start / token… / done | error events), `/v1/tokenize` and `/v1/detokenize`.

Native responses and events leave out every field that is None: the optional parts (`logprob`,
`top_logprobs`, `attention`, `prompt_attention`) appear only when asked for. `model_dump()`,
`model_dump_json()` and FastAPI all do this by themselves.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
)

from server.schemas.common import (
    DEFAULT_MAX_TOKENS,
    LOGPROB_FLOOR,
    MAX_DETOKENIZE_IDS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_TOKEN_ID,
    STOP_DESCRIPTION,
    AttentionMatrix,
    AttentionRequest,
    AttentionRows,
    ErrorInfo,
    FinishReason,
    FrequencyPenalty,
    GenerateLensRequest,
    GreedySampling,
    LensRows,
    Logprob,
    ModelName,
    PresencePenalty,
    RepetitionPenalty,
    Sampling,
    Seed,
    Stop,
    TokenInfo,
    Usage,
    _OmitNone,
    _Request,
    sampling_params_dict,
)

# -- POST /v1/generate --------------------------------------------------------------------------
GENERATE_EXAMPLE = {
    "prompt": "two plus three equals", "max_tokens": 16, "stream": False,
    "sampling": {"strategy": "top_p", "p": 0.9, "temperature": 0.8}, "seed": 1234,
    "stop": ["\n"], "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "logprobs": 0, "attention": {"layers": "all", "heads": "all", "include_prompt": True}}



class GenerateRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [GENERATE_EXAMPLE]})

    model: ModelName = None
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The text to "
                        "continue (non-empty; it must fit in the model's context in tokens).")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_NEW_TOKENS, description=(
        "Most tokens to generate; a request that reaches the context end finishes with length."))
    stream: bool = Field(False, description="Answer NDJSON events instead of one JSON object.")
    sampling: Sampling = Field(default_factory=GreedySampling,
                               description="How to choose each token (default greedy).")
    seed: Seed | None = Field(None, description="Same seed + request + model => same output.")
    stop: Stop = Field(default_factory=list, description=STOP_DESCRIPTION)
    repetition_penalty: RepetitionPenalty = 1.0
    frequency_penalty: FrequencyPenalty = 0.0
    presence_penalty: PresencePenalty = 0.0
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "null: none; 0: each generated token's logprob; N: plus the top N alternatives."))
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    attention: AttentionRequest | None = Field(None, description=(
        "Return attention weights; null (the default) does no attention work at all."))
    logit_lens: GenerateLensRequest | None = Field(None, description=(
        "Return each token's logit lens (the step that produced it); null: none."))

    def sampling_params(self) -> dict[str, Any]:
        """Keyword arguments for model.sampling.SamplingParams (see `sampling_params_dict`)."""
        return sampling_params_dict(self.sampling.params(), self)

    def max_new_tokens(self) -> int:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """GenerationRequest.logprobs: None, or how many alternatives besides the chosen token."""
        return self.logprobs



class TopLogprob(_OmitNone):
    id: int
    text: str
    logprob: Logprob = Field(description=f"Natural log probability (-inf is sent as "
                                         f"{LOGPROB_FLOOR}).")


class GeneratedToken(_OmitNone):
    id: int
    text: str = Field(description="The text this token added (deltas join to the full text).")
    logprob: Logprob | None = Field(None, description="Present when logprobs was asked for.")
    top_logprobs: list[TopLogprob] | None = Field(None, description="Present when logprobs > 0.")
    attention: AttentionRows | None = Field(None, description=(
        "[layer][head][key]: the attention row of the step that produced this token."))
    logit_lens: LensRows | None = Field(None, description=(
        "[layer][k]: the logit lens of the step that produced this token."))


class Timings(_OmitNone):
    queue_ms: float = Field(description="From arrival to admission into the running batch.")
    ttft_ms: float | None = Field(None, description="From arrival to the first token (left out "
                                                    "when no token was generated).")
    total_ms: float = Field(description="From arrival to the end.")
    tokens_per_second: float = Field(description="Decode speed after the first token.")


class GenerateResponse(_OmitNone):
    id: str
    model: str
    text: str = Field(description="The generated text (without a matched stop string).")
    tokens: list[GeneratedToken]
    prompt_tokens: list[TokenInfo]
    prompt_attention: AttentionMatrix | None = Field(None, description=(
        "[layer][head][query][key] over the prompt; present when attention.include_prompt."))
    prompt_logit_lens: list[LensRows] | None = Field(None, description=(
        "[layer][q][k] over the prompt; present when logit_lens.include_prompt."))
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class StartEvent(_OmitNone):
    type: Literal["start"] = "start"
    id: str
    model: str
    prompt_tokens: list[TokenInfo]
    prompt_attention: AttentionMatrix | None = None
    prompt_logit_lens: list[LensRows] | None = None


class TokenEvent(_OmitNone):
    type: Literal["token"] = "token"
    index: int = Field(ge=0, description="0-based position among the generated tokens.")
    id: int
    text: str
    logprob: Logprob | None = None
    top_logprobs: list[TopLogprob] | None = None
    attention: AttentionRows | None = None
    logit_lens: LensRows | None = None


class DoneEvent(_OmitNone):
    type: Literal["done"] = "done"
    finish_reason: FinishReason
    text: str
    usage: Usage
    timings: Timings



class ErrorEvent(_OmitNone):
    type: Literal["error"] = "error"
    error: ErrorInfo


StreamEvent = Annotated[StartEvent | TokenEvent | DoneEvent | ErrorEvent,
                        Field(discriminator="type")]
STREAM_EVENT = TypeAdapter(StreamEvent)


def parse_stream_event(line: str | bytes) -> StartEvent | TokenEvent | DoneEvent | ErrorEvent:
    """One NDJSON line of a /v1/generate stream as its event model."""
    return STREAM_EVENT.validate_json(line)



# -- tokenizer and models -----------------------------------------------------------------------
class TokenizeRequest(_Request):
    model: ModelName = None
    text: str = Field(max_length=MAX_PROMPT_CHARS, description=(
        "Text to tokenize; may be empty (then only the special tokens, if added)."))
    add_special_tokens: bool = Field(True, description="Add BOS etc. as /v1/generate does.")


class TokenizeResponse(_OmitNone):
    tokens: list[TokenInfo]
    count: int
    max_context: int


class DetokenizeRequest(_Request):
    model: ModelName = None
    ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] = Field(
        max_length=MAX_DETOKENIZE_IDS, description="Token ids (checked against the vocabulary).")


class DetokenizeResponse(_OmitNone):
    text: str

