"""Every request, response and streamed event of the HTTP API (API.md) as Pydantic models.

Torch-free on purpose: this module imports only pydantic and the standard library, so the Python
client can import it without torch, LitServe or FastAPI.

Requests validate everything a schema can know (types, ranges, list sizes). What needs the model
(prompt tokens vs max_context, layer / head indices vs the model's shape, token ids vs the
vocabulary) is the server's check, answered with 400.

Serialising:
- native responses and events (`/v1/generate`, tokenizer, models, errors) leave out every field that
  is None: the optional parts (`logprob`, `top_logprobs`, `attention`, `prompt_attention`) appear
  only when asked for. `model_dump()`, `model_dump_json()` and FastAPI all do this by themselves, so
  `exclude_none=True` is harmless but not needed.
- OpenAI-compatible responses keep OpenAI's nulls (`"finish_reason": null` in a chunk is part of the
  wire format the `openai` SDK reads) and leave out only our extensions when they are None.
- `model_construct` skips validators, including the logprob floor (-inf → LOGPROB_FLOOR).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

# -- limits: the one place the server, the client and the docs take them from ------------------
MAX_PROMPT_CHARS = 1_000_000  # a cheap bound; the real limit is tokens (max_context), the server's
MAX_NEW_TOKENS = 1_000_000  # past the context end a request just finishes with "length"
DEFAULT_MAX_TOKENS = 64  # /v1/generate
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20  # native logprobs and chat top_logprobs (as OpenAI's top_logprobs)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions logprobs, as OpenAI
MIN_TEMPERATURE = 1e-6  # "> 0", but far enough from 0 that logits / t stays finite in float32
MAX_TEMPERATURE = 100.0
OPENAI_MAX_TEMPERATURE = 2.0
MIN_TOP_P = 1e-30  # a "> 0" top_p below this is raised to it (see sampling_params_dict)
MAX_TOP_K = 2**31 - 1  # k >= vocabulary size keeps every token
MIN_REPETITION_PENALTY = 1e-3  # "> 0", but logits / r must stay finite in float32
MAX_REPETITION_PENALTY = 10.0  # 1.0 is off; 2 already all but forbids repeats
MAX_PENALTY = 2.0  # |frequency_penalty| and |presence_penalty|, as OpenAI
MAX_SEED = 2**63  # exclusive: seeds are in [0, 2**63)
MAX_ATTENTION_ENTRIES = 256  # per `layers` / `heads` list
MAX_ATTENTION_INDEX = 4095  # the server checks indices against the model's shape
MAX_TOKEN_ID = 2**31 - 1  # the server checks ids against the vocabulary
MAX_DETOKENIZE_IDS = 1_000_000
MAX_CHAT_MESSAGES = 1024
LOGPROB_FLOOR = -9999.0  # -inf logprobs (tokens a filter removed) are sent as this, as OpenAI does

FinishReason = Literal["stop", "length"]


# -- bases --------------------------------------------------------------------------------------
class _Request(BaseModel):
    """Native requests: unknown fields are a 422 (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _OmitNone(BaseModel):
    """Native responses: fields that are None are left out of every dump."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler):
        return {k: v for k, v in handler(self).items() if v is not None}


class _OpenAIResponse(BaseModel):
    """OpenAI-compatible responses: OpenAI's nulls stay; our extensions are left out when None."""

    extension_fields: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none_extensions(self, handler: SerializerFunctionWrapHandler):
        return {k: v for k, v in handler(self).items()
                if v is not None or k not in self.extension_fields}


def _floor_logprob(value: Any) -> Any:
    return LOGPROB_FLOOR if isinstance(value, float) and value == -math.inf else value


def _as_list(value: Any) -> Any:
    """OpenAI accepts one stop string or a list; null is the default (no stop strings)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


Logprob = Annotated[float, BeforeValidator(_floor_logprob)]
AttentionRows = list[list[list[float]]]  # [layer][head][key]
AttentionMatrix = list[list[list[list[float]]]]  # [layer][head][query][key]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
_STOP_ITEM_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
Stop = Annotated[
    list[StopString], Field(max_length=MAX_STOP_STRINGS), BeforeValidator(_as_list),
    WithJsonSchema({"anyOf": [_STOP_ITEM_SCHEMA, {"type": "array", "items": _STOP_ITEM_SCHEMA,
                                                  "maxItems": MAX_STOP_STRINGS}]},
                   mode="validation")]
Seed = Annotated[int, Field(ge=0, lt=MAX_SEED)]
STOP_DESCRIPTION = (f"Up to {MAX_STOP_STRINGS} strings (or one string); generation ends when the "
                    "text ends with one, and the stop string is not returned.")


# -- sampling: a discriminated union on `strategy` ----------------------------------------------
Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description=(
    f"Divides the logits before sampling; > 0 (at least {MIN_TEMPERATURE}), "
    f"at most {MAX_TEMPERATURE}."))]


def _strategy_required(schema: dict[str, Any]) -> None:
    # `strategy` has a default (GreedySampling() is the default sampling), but it is the union's
    # discriminator: a request must send it, and the published schema says so.
    schema["required"] = ["strategy", *schema.get("required", [])]


class _Sampling(_Request):
    model_config = ConfigDict(json_schema_extra=_strategy_required)

    def params(self) -> dict[str, Any]:
        """strategy / temperature / k / p for model.sampling.SamplingParams (unused ones None)."""
        return {"strategy": self.strategy, "temperature": getattr(self, "temperature", 1.0),
                "k": getattr(self, "k", None), "p": getattr(self, "p", None)}


class GreedySampling(_Sampling):
    """The most probable token (argmax); no randomness."""

    strategy: Literal["greedy"] = "greedy"


class RandomSampling(_Sampling):
    """Plain softmax sampling at a temperature."""

    strategy: Literal["random"] = "random"
    temperature: Temperature = 1.0


class TopKSampling(_Sampling):
    """Sample among the k most probable tokens."""

    strategy: Literal["top_k"] = "top_k"
    k: int = Field(ge=1, le=MAX_TOP_K, description="How many of the most probable tokens to keep.")
    temperature: Temperature = 1.0


class TopPSampling(_Sampling):
    """Nucleus sampling: the fewest most probable tokens holding probability >= p."""

    strategy: Literal["top_p"] = "top_p"
    p: float = Field(gt=0, le=1, description="Probability mass to keep, in (0, 1].")
    temperature: Temperature = 1.0


class MinPSampling(_Sampling):
    """Keep tokens at least p times as probable as the most probable one."""

    strategy: Literal["min_p"] = "min_p"
    p: float = Field(ge=0, lt=1, description="Fraction of the top probability, in [0, 1).")
    temperature: Temperature = 1.0


class TypicalSampling(_Sampling):
    """Locally typical sampling (Meister et al. 2022)."""

    strategy: Literal["typical"] = "typical"
    p: float = Field(gt=0, le=1, description="Probability mass to keep, in (0, 1].")
    temperature: Temperature = 1.0


Sampling = Annotated[
    GreedySampling | RandomSampling | TopKSampling | TopPSampling | MinPSampling | TypicalSampling,
    Field(discriminator="strategy")]


# -- attention selection ------------------------------------------------------------------------
def _unique(indices: list[int]) -> list[int]:
    repeated = sorted(i for i, n in Counter(indices).items() if n > 1)
    if repeated:
        raise ValueError(f"indices must be unique, repeated: {repeated}")
    return indices


def _words(*words: str) -> BeforeValidator:
    """A clear error for a misspelt word ("max") instead of one per member of the union."""
    def check(value: Any) -> Any:
        if isinstance(value, str) and value not in words:
            raise ValueError(f"must be {' or '.join(map(repr, words))} or a list of indices, "
                             f"got {value!r}")
        return value
    return BeforeValidator(check)


def _word_or_list(value: Any) -> str:
    return "word" if isinstance(value, str) else "list"


Indices = Annotated[list[Annotated[int, Field(ge=0, le=MAX_ATTENTION_INDEX)]],
                    Field(min_length=1, max_length=MAX_ATTENTION_ENTRIES), AfterValidator(_unique),
                    Tag("list")]


class AttentionRequest(_Request):
    """Which attention weights to return; layout [layer][head][query][key] (API.md)."""

    layers: Annotated[Annotated[Literal["all"], Tag("word")] | Indices,
                      Discriminator(_word_or_list), _words("all")] = Field(
        "all", description='"all" or a list of layer indices (unique, in the order returned).')
    heads: Annotated[Annotated[Literal["all", "mean"], Tag("word")] | Indices,
                     Discriminator(_word_or_list), _words("all", "mean")] = Field(
        "all", description='"all", "mean" (the average over heads: one head entry) '
                           "or a list of head indices.")
    include_prompt: bool = Field(True, description="Also return the prompt's (prefill) attention.")

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for model.events.AttentionSpec (lists become tuples)."""
        return {"layers": self.layers if isinstance(self.layers, str) else tuple(self.layers),
                "heads": self.heads if isinstance(self.heads, str) else tuple(self.heads),
                "include_prompt": self.include_prompt}


# -- POST /v1/generate --------------------------------------------------------------------------
GENERATE_EXAMPLE = {
    "prompt": "two plus three equals", "max_tokens": 16, "stream": False,
    "sampling": {"strategy": "top_p", "p": 0.9, "temperature": 0.8}, "seed": 1234,
    "stop": ["\n"], "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "logprobs": 0, "attention": {"layers": "all", "heads": "all", "include_prompt": True}}

RepetitionPenalty = Annotated[float, Field(
    ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
    description="CTRL / HF repetition penalty over prompt and generated tokens; 1 is off, "
                f"> 1 discourages repeats. In [{MIN_REPETITION_PENALTY}, "
                f"{MAX_REPETITION_PENALTY}].")]
FrequencyPenalty = Annotated[float, Field(
    ge=-MAX_PENALTY, le=MAX_PENALTY,
    description="OpenAI frequency penalty: logit -= count * f over generated tokens; in [-2, 2].")]
PresencePenalty = Annotated[float, Field(
    ge=-MAX_PENALTY, le=MAX_PENALTY,
    description="OpenAI presence penalty: logit -= p once a token was generated; in [-2, 2].")]


class GenerateRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"examples": [GENERATE_EXAMPLE]})

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

    def sampling_params(self) -> dict[str, Any]:
        """Keyword arguments for model.sampling.SamplingParams (see `sampling_params_dict`)."""
        return sampling_params_dict(self.sampling.params(), self)


def sampling_params_dict(strategy: dict[str, Any], penalties: Any) -> dict[str, Any]:
    """The SamplingParams contract: all seven keys, k / p None where the strategy ignores them,
    temperature 1.0 for greedy."""
    if strategy["strategy"] == "top_p":
        # The engine samples in float32, where a p as small as 1e-46 is 0 and keeps no token. Any
        # p below the top token's probability keeps just that token, so raising it changes nothing.
        strategy = strategy | {"p": max(strategy["p"], MIN_TOP_P)}
    return {**strategy, "repetition_penalty": penalties.repetition_penalty,
            "frequency_penalty": penalties.frequency_penalty,
            "presence_penalty": penalties.presence_penalty}


# -- native responses and events ----------------------------------------------------------------
class TokenInfo(_OmitNone):
    id: int = Field(description="Token id.")
    text: str = Field(description="The token's text.")


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


class Usage(_OmitNone):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class StartEvent(_OmitNone):
    type: Literal["start"] = "start"
    id: str
    model: str
    prompt_tokens: list[TokenInfo]
    prompt_attention: AttentionMatrix | None = None


class TokenEvent(_OmitNone):
    type: Literal["token"] = "token"
    index: int = Field(ge=0, description="0-based position among the generated tokens.")
    id: int
    text: str
    logprob: Logprob | None = None
    top_logprobs: list[TopLogprob] | None = None
    attention: AttentionRows | None = None


class DoneEvent(_OmitNone):
    type: Literal["done"] = "done"
    finish_reason: FinishReason
    text: str
    usage: Usage
    timings: Timings


class ErrorInfo(_OmitNone):
    """A refusal or failure; more fields may follow (extra fields are kept)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="Machine-readable kind, e.g. context_length_exceeded.")
    message: str
    param: str | None = Field(None, description="The request field at fault, when one is.")
    prompt_tokens: int | None = None
    max_context: int | None = None


class ErrorResponse(_OmitNone):
    error: ErrorInfo


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
    text: str = Field(max_length=MAX_PROMPT_CHARS, description=(
        "Text to tokenize; may be empty (then only the special tokens, if added)."))
    add_special_tokens: bool = Field(True, description="Add BOS etc. as /v1/generate does.")


class TokenizeResponse(_OmitNone):
    tokens: list[TokenInfo]
    count: int
    max_context: int


class DetokenizeRequest(_Request):
    ids: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] = Field(
        max_length=MAX_DETOKENIZE_IDS, description="Token ids (checked against the vocabulary).")


class DetokenizeResponse(_OmitNone):
    text: str


class ModelCard(_OmitNone):
    id: str = Field(description="The served model name.")
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "attnserve"
    max_context: int


class ModelList(_OmitNone):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- OpenAI-compatible requests -----------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with usage and no choices.")


def _unsupported(name: str, value: Any, why: str) -> None:
    raise ValueError(f"{name}={value!r} is not supported: {why}")


class _OpenAIRequest(BaseModel):
    """The knobs /v1/completions and /v1/chat/completions share.

    Unknown fields are ignored (the openai SDK and tools send fields we do not use); null means the
    default, as in OpenAI. Knobs that would change the output and that we cannot honour (n > 1,
    logit_bias) are refused rather than ignored.

    One sampling strategy per request (`sampling_params`): temperature 0 (below MIN_TEMPERATURE)
    => greedy, whatever else is set; else the one truncation knob that is set: top_k > 0 => top_k,
    min_p > 0 => min_p, typical_p < 1 => typical, top_p < 1 => top_p; none => random. Two or more
    set (with temperature > 0) is a validation error naming them.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="Accepted and ignored: one model is served.")
    temperature: float = Field(1.0, ge=0, le=OPENAI_MAX_TEMPERATURE,
                               description="0 => greedy; else as OpenAI, in (0, 2].")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; 1 is off.")
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K,
                              description="Extension (as vLLM): top-k sampling; null, 0, -1: off.")
    min_p: float = Field(0.0, ge=0, lt=1, description="Extension: min-p sampling; 0 is off.")
    typical_p: float = Field(1.0, gt=0, le=1,
                             description="Extension: locally typical sampling; 1 is off.")
    repetition_penalty: RepetitionPenalty = 1.0
    frequency_penalty: FrequencyPenalty = 0.0
    presence_penalty: PresencePenalty = 0.0
    seed: Seed | None = None
    stop: Stop = Field(default_factory=list, description=STOP_DESCRIPTION)
    stream: bool = Field(False, description="Answer server-sent events, ending `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Only 1 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (must be empty).")
    user: str | None = Field(None, description="Accepted and ignored.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    attention: AttentionRequest | None = Field(None, description=(
        "Extension: return attention weights (`prompt_attention` on the response or first chunk; "
        "`tokens` and `attention` per choice)."))

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].default is None
                or fields[k].is_required()}

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            _unsupported("n", n, "attnserve returns exactly one choice (n must be 1)")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias:
            _unsupported("logit_bias", bias, "leave it out or send {}")
        return bias

    def _truncation(self) -> list[tuple[str, str, float | int]]:
        """(strategy, field, value) of every truncation knob that is set, in precedence order."""
        knobs = [("top_k", "top_k", self.top_k), ("min_p", "min_p", self.min_p),
                 ("typical", "typical_p", self.typical_p), ("top_p", "top_p", self.top_p)]
        on = {"top_k": (self.top_k or 0) > 0, "min_p": self.min_p > 0,
              "typical": self.typical_p < 1, "top_p": self.top_p < 1}
        return [knob for knob in knobs if on[knob[0]]]

    @model_validator(mode="after")
    def _one_strategy(self):
        knobs = self._truncation()
        if self.temperature >= MIN_TEMPERATURE and len(knobs) > 1:
            got = ", ".join(f"{name}={value}" for _, name, value in knobs)
            raise ValueError(
                f"{' and '.join(name for _, name, _ in knobs)} cannot be combined ({got}): "
                "attnserve applies one truncation strategy per request; leave the others at "
                "their defaults (top_k null, min_p 0, typical_p 1, top_p 1)")
        return self

    def sampling_params(self) -> dict[str, Any]:
        """Keyword arguments for model.sampling.SamplingParams (see the class docstring)."""
        if self.temperature < MIN_TEMPERATURE:
            strategy = GreedySampling().params()
        else:
            strategy = {"strategy": "random", "temperature": self.temperature, "k": None,
                        "p": None}
            for name, field, value in self._truncation()[:1]:
                strategy |= {"strategy": name, "k" if field == "top_k" else "p": value}
        return sampling_params_dict(strategy, self)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


def _one_prompt(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        raise ValueError("prompt must be a string or a list holding exactly one string; batched "
                         "and token-id prompts are not supported")
    return value


class CompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "calculator", "prompt": "two plus three equals", "max_tokens": 8,
         "temperature": 0}]})

    prompt: Annotated[str, BeforeValidator(_one_prompt)] = Field(
        min_length=1, max_length=MAX_PROMPT_CHARS,
        description="The text to continue (non-empty); a list with exactly one string is accepted.")
    max_tokens: int = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=1, le=MAX_NEW_TOKENS,
                            description="Most tokens to generate (default 16, as OpenAI).")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, description=(
        "null: none; N: each token's logprob and the top N alternatives (OpenAI completions)."))
    echo: bool = Field(False, description="Only false is supported.")
    best_of: int | None = Field(None, description="Only 1 (or null) is supported.")
    suffix: str | None = Field(None, description="Not supported (must be null or empty).")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            _unsupported("echo", echo, "the prompt is not returned; use /v1/tokenize")
        return echo

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            _unsupported("best_of", best_of, "attnserve generates one sequence (best_of must be 1)")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            _unsupported("suffix", suffix, "insertion is not supported")
        return suffix

    def num_logprobs(self) -> int | None:
        """GenerationRequest.logprobs: None, or how many alternatives besides the chosen token."""
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


_TEXT_PARTS = TypeAdapter(list[TextPart])


def _join_parts(value: Any) -> Any:
    """Content as OpenAI sends it: a string, a list of text parts (joined with newlines, as vLLM)
    or null (an empty message)."""
    if value is None:
        return ""
    if isinstance(value, list):
        # str(): a type may be any JSON value, and a dict or list one is not hashable
        kinds = sorted({str(p.get("type")) for p in value if isinstance(p, dict)} - {"text"})
        if kinds:
            raise ValueError(f"only text content parts are supported, got {kinds}")
        return "\n".join(part.text for part in _TEXT_PARTS.validate_python(value))
    return value


_PART_SCHEMA = {"type": "object", "properties": {"type": {"const": "text"},
                                                  "text": {"type": "string"}},
                "required": ["type", "text"]}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"] = Field(
        description='"developer" is accepted as "system".')
    content: Annotated[
        str, BeforeValidator(_join_parts),
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _PART_SCHEMA}]},
                       mode="validation"),
    ] = Field(max_length=MAX_PROMPT_CHARS, description="A string or a list of text parts.")

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, role: Any) -> Any:
        return "system" if role == "developer" else role


class ChatCompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "calculator", "messages": [{"role": "user", "content": "two plus three?"}],
         "max_tokens": 8, "temperature": 0}]})

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description=(
        "Most tokens to generate; null: until end-of-sequence or the context end."))
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS,
                                              description="The same as max_tokens (newer name).")
    logprobs: bool = Field(False, description="Return each generated token's logprob.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="Also the top N alternatives (needs logprobs).")
    tools: list[Any] | None = Field(None, description="Not supported (must be null or empty).")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')

    @model_validator(mode="after")
    def _consistent(self):
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError(f"max_tokens={self.max_tokens} and max_completion_tokens="
                             f"{self.max_completion_tokens} disagree; send one of them")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        if sum(len(m.content) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold more than {MAX_PROMPT_CHARS} characters")
        if self.tools:
            _unsupported("tools", f"[{len(self.tools)} tools]", "no tool calling")
        if self.response_format and self.response_format.get("type", "text") != "text":
            _unsupported("response_format", self.response_format, 'only {"type": "text"}')
        return self

    def max_new_tokens(self) -> int:
        """max_tokens or max_completion_tokens; unbounded (MAX_NEW_TOKENS) when neither is set:
        the request then ends at end-of-sequence or with "length" at the context end."""
        return self.max_completion_tokens or self.max_tokens or MAX_NEW_TOKENS

    def num_logprobs(self) -> int | None:
        """GenerationRequest.logprobs: None, or how many alternatives besides the chosen token."""
        return (self.top_logprobs or 0) if self.logprobs else None


# -- OpenAI-compatible responses ----------------------------------------------------------------
def _created() -> int:
    return int(time.time())


class _Extensions(_OpenAIResponse):
    """Our extensions on a choice: the generated tokens and their attention, when asked for."""

    extension_fields: ClassVar[frozenset[str]] = frozenset({"tokens", "attention"})

    tokens: list[TokenInfo] | None = Field(None, description=(
        "Extension: this choice's (or chunk's) generated tokens; present with attention."))
    attention: list[AttentionRows] | None = Field(None, description=(
        "Extension: per generated token [token][layer][head][key], as /v1/generate's."))


class _PromptExtensions(_OpenAIResponse):
    """Our extensions on a response (or the first chunk): the prompt tokens and attention."""

    extension_fields: ClassVar[frozenset[str]] = frozenset({"prompt_tokens", "prompt_attention"})

    prompt_tokens: list[TokenInfo] | None = Field(None, description=(
        "Extension: the prompt's tokens; present with attention."))
    prompt_attention: AttentionMatrix | None = Field(None, description=(
        "Extension: [layer][head][query][key] over the prompt, when attention.include_prompt."))


class CompletionLogprobs(_OpenAIResponse):
    tokens: list[str]
    token_logprobs: list[Logprob]
    top_logprobs: list[dict[str, Logprob]] | None = None
    text_offset: list[int]


class CompletionChoice(_Extensions):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionChunkChoice(_Extensions):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = Field(None, description="null until the last chunk.")
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_PromptExtensions):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_PromptExtensions):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[CompletionChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="Only in the last chunk, with include_usage.")


class ChatTopLogprob(_OpenAIResponse):
    token: str
    logprob: Logprob
    bytes: list[int] | None = None


class ChatTokenLogprob(_OpenAIResponse):
    token: str
    logprob: Logprob
    bytes: list[int] | None = None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_OpenAIResponse):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(_OpenAIResponse):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatDelta(_OmitNone):
    role: Literal["assistant"] | None = Field(None, description="Only in the first chunk.")
    content: str | None = None


class ChatChoice(_Extensions):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatChunkChoice(_Extensions):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = Field(None, description="null until the last chunk.")
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_PromptExtensions):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_PromptExtensions):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_created)
    model: str
    choices: list[ChatChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: Usage | None = Field(None, description="Only in the last chunk, with include_usage.")
