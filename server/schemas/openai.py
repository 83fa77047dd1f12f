"""The OpenAI-compatible API: `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

Requests ignore unknown fields (the openai SDK and tools send fields we do not use) and refuse the
knobs that would change the output and that attnserve cannot honour. Responses keep OpenAI's nulls
(`"finish_reason": null` in a chunk is part of the wire format the `openai` SDK reads) and leave out
only our extensions when they are None.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from server.schemas.common import (
    MAX_CHAT_MESSAGES,
    MAX_COMPLETION_LOGPROBS,
    MAX_LOGPROBS,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    OPENAI_DEFAULT_MAX_TOKENS,
    OPENAI_MAX_TEMPERATURE,
    STOP_DESCRIPTION,
    AttentionMatrix,
    AttentionRequest,
    AttentionRows,
    FinishReason,
    FrequencyPenalty,
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
    _OpenAIResponse,
    sampling_params_dict,
    strategy_from_knobs,
)


class Example(_OmitNone):
    prompt: str
    completion: str | None = Field(None, description="What the model is expected to continue with.")


class AttentionFocus(_OmitNone):
    layer: int
    head: int
    position: Literal["last"] = Field("last", description="The query position it is measured at: the prompt's last.")


class ModelCard(_OmitNone):
    id: str = Field(description="The served model name.")
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "attnserve"
    max_context: int
    examples: list[Example] | None = Field(None, description="Extension: example prompts from the model card.")
    weights: dict[str, Any] | None = Field(None, description=(
        "Extension: how the workers hold the weights (dtype, quantization, the kernel per batch size, "
        "KV-cache dtype); absent until a worker has loaded."))
    attention_focus: AttentionFocus | None = Field(None, description=(
        "Extension: the head the model card's attention probe found doing the task (the viewer opens on it)."))


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

    One sampling strategy per request, by `strategy_from_knobs` (the rule the Python client uses
    too); two truncation knobs on (with temperature > 0) is a validation error naming them.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: ModelName = None
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

    @model_validator(mode="after")
    def _one_strategy(self):
        self.sampling()                   # two truncation knobs on: a ValueError naming them
        return self

    def sampling(self) -> Sampling:
        """The one strategy these knobs ask for (`strategy_from_knobs`)."""
        return strategy_from_knobs(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                   min_p=self.min_p, typical_p=self.typical_p)

    def sampling_params(self) -> dict[str, Any]:
        """Keyword arguments for model.sampling.SamplingParams."""
        return sampling_params_dict(self.sampling().params(), self)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


MAX_PROMPTS = 64  # prompts per /v1/completions request (each a choice; they batch together)
TokenIds = Annotated[list[Annotated[int, Field(ge=-MAX_TOKEN_ID, le=MAX_TOKEN_ID)]],
                     Field(min_length=1, max_length=MAX_PROMPT_CHARS)]   # checked against the vocabulary: 400
PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class CompletionRequest(_OpenAIRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "calculator", "prompt": "two plus three equals", "max_tokens": 8,
         "temperature": 0}]})

    prompt: PromptText | TokenIds | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(description=(
            "The text to continue (non-empty), token ids (read as given: no BOS is added), or a list "
            f"of up to {MAX_PROMPTS} of either: each prompt is a choice with its index."))
    max_tokens: int = Field(OPENAI_DEFAULT_MAX_TOKENS, ge=0, le=MAX_NEW_TOKENS, description=(
        "Most tokens to generate (default 16, as OpenAI); 0 only with echo: score the prompt."))
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, description=(
        "null: none; N: each token's logprob and the top N alternatives (OpenAI completions); "
        "with echo, the prompt's tokens too (the first one's null)."))
    echo: bool = Field(False, description="Return the prompt before the completion (text and logprobs).")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "Extension (as vLLM): each choice's `prompt_logprobs`, per prompt token {id: {logprob, rank, "
        "decoded_token}} for the actual token and the top N (null for the first)."))
    best_of: int | None = Field(None, description="Only 1 (or null) is supported.")
    suffix: str | None = Field(None, description="Not supported (must be null or empty).")

    @model_validator(mode="after")
    def _scoring_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 generates nothing: it needs echo=true (score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice: strings or token-id lists."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)

    def prompt_logprobs_wanted(self) -> int | None:
        """GenerationRequest.prompt_logprobs: how many alternatives per prompt token (None: none)."""
        wanted = [n for n in (self.logprobs if self.echo else None, self.prompt_logprobs) if n is not None]
        return max(wanted) if wanted else None

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

    def max_new_tokens(self) -> int:
        return self.max_tokens

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
    token_logprobs: list[Logprob | None] = Field(description="null for an echoed prompt's first token.")
    top_logprobs: list[dict[str, Logprob] | None] | None = None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: Logprob
    rank: int | None = Field(description="1 for the most probable; null: the actual token, outside the top N.")
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class _CompletionExtensions(_Extensions):
    extension_fields: ClassVar[frozenset[str]] = frozenset({"tokens", "attention", "prompt_logprobs"})

    prompt_logprobs: PromptLogprobs | None = Field(None, description=(
        "Extension (as vLLM), with prompt_logprobs: per prompt token, by token id, the actual token "
        "and the top N; null for the first (in a stream: on the choice's first chunk)."))


class CompletionChoice(_CompletionExtensions):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionChunkChoice(_CompletionExtensions):
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

