"""What the native and the OpenAI-compatible APIs share: the limits, the bases, sampling,
attention selection, the one rule from OpenAI's sampling knobs to a strategy, and the small parts
(tokens, usage, errors) both return.

Torch-free on purpose (pydantic and the standard library only), as is every schemas module.
"""

from __future__ import annotations

import math
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
    WithJsonSchema,
    model_serializer,
)

from model.limits import MAX_LENS_TOP_K, MAX_LOGPROBS, FinishReason  # noqa: F401  (the engine's bounds, published here)

# -- limits: the one place the server, the client and the docs take them from ------------------
MAX_PROMPT_CHARS = 1_000_000  # a cheap bound; the real limit is tokens (max_context), the server's
MAX_NEW_TOKENS = 1_000_000  # past the context end a request just finishes with "length"
DEFAULT_MAX_TOKENS = 64  # /v1/generate
OPENAI_DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
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


ModelName = Annotated[str | None, Field(max_length=256, description=(
    "The served model to use (`/v1/models` lists them); null: the first, the default."))]


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


def strategy_from_knobs(*, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                        min_p: float = 0.0, typical_p: float = 1.0) -> Sampling:
    """OpenAI's sampling knobs → one strategy: the rule of the OpenAI routes and the Python client.

    temperature 0 (below MIN_TEMPERATURE) => greedy, whatever else is set; else the one truncation
    knob that is on — top_k > 0, min_p > 0, typical_p < 1 or top_p < 1 — at that temperature; none
    on => plain random sampling. Two or more on is a ValueError naming them."""
    if temperature < MIN_TEMPERATURE:
        return GreedySampling()
    on = [(name, value) for name, value, is_on in (
        ("top_k", top_k, (top_k or 0) > 0), ("min_p", min_p, min_p > 0),
        ("typical_p", typical_p, typical_p < 1), ("top_p", top_p, top_p < 1)) if is_on]
    if len(on) > 1:
        got = ", ".join(f"{name}={value}" for name, value in on)
        raise ValueError(f"{' and '.join(name for name, _ in on)} cannot be combined ({got}): attnserve "
                         "applies one truncation strategy per request; leave the others off (top_k null "
                         "or 0, min_p 0, typical_p 1, top_p 1)")
    if not on:
        return RandomSampling(temperature=temperature)
    name, value = on[0]
    if name == "top_k":
        return TopKSampling(k=value, temperature=temperature)
    kind = {"min_p": MinPSampling, "typical_p": TypicalSampling, "top_p": TopPSampling}[name]
    return kind(p=value, temperature=temperature)


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


Layers = Annotated[Annotated[Literal["all"], Tag("word")] | Indices, Discriminator(_word_or_list), _words("all")]


class AttentionRequest(_Request):
    """Which attention weights to return; layout [layer][head][query][key] (API.md)."""

    layers: Layers = Field("all", description='"all" or a list of layer indices (unique, in the order returned).')
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


class LensRequest(_Request):
    """Which logit-lens rows to return: for each layer ℓ and position, the top_k of
    softmax(lm_head(final_norm(h_ℓ))), h_ℓ the residual stream after layer ℓ (0-based)."""

    layers: Layers = Field("all", description='"all" or a list of layer indices (unique, in the order returned).')
    top_k: int = Field(5, ge=1, le=MAX_LENS_TOP_K,
                       description=f"Entries per layer and position, 1 to {MAX_LENS_TOP_K}.")

    def spec_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for model.events.LensSpec."""
        return {"layers": self.layers if isinstance(self.layers, str) else tuple(self.layers), "top_k": self.top_k}


class GenerateLensRequest(LensRequest):
    include_prompt: bool = Field(False, description="Also return the prompt's lens (`prompt_logit_lens` on start).")

    def spec_kwargs(self) -> dict[str, Any]:
        return super().spec_kwargs() | {"include_prompt": self.include_prompt}


class LensEntry(_OmitNone):
    id: int
    text: str
    prob: float = Field(description="Its probability under that layer's lens.")


LensRows = list[list[LensEntry]]  # [layer][k]: one position's lens



# -- penalties, and the sampling contract -------------------------------------------------------
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



# -- parts every API returns ---------------------------------------------------------------------
class TokenInfo(_OmitNone):
    id: int = Field(description="Token id.")
    text: str = Field(description="The token's text.")



class Usage(_OmitNone):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int



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

