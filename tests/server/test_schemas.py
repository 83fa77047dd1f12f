"""Tests for server/schemas.py: what each request accepts and refuses (and names in the error),
the mapping to model.sampling.SamplingParams, the wire shape of responses and events, and that
the OpenAI-compatible ones parse with the official openai SDK's types."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._models import construct_type
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatChunk
from pydantic import BaseModel, ValidationError

from model.events import AttentionSpec
from model.sampling import SamplingParams
from server import schemas
from server.schemas import (
    MAX_STOP_STRINGS,
    AttentionRequest,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DoneEvent,
    ErrorEvent,
    ErrorResponse,
    GeneratedToken,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
    StartEvent,
    TokenEvent,
    TokenizeRequest,
    parse_stream_event,
)

ROOT = Path(__file__).resolve().parents[2]

# API.md's example request, verbatim.
API_EXAMPLE = json.loads("""{
  "prompt": "two plus three equals",
  "max_tokens": 16,
  "stream": false,
  "sampling": {"strategy": "top_p", "p": 0.9, "temperature": 0.8},
  "seed": 1234,
  "stop": ["\\n"],
  "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
  "logprobs": 0,
  "attention": {"layers": "all", "heads": "all", "include_prompt": true}
}""")


def error_locs(model: type[BaseModel], data: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [e["loc"] for e in info.value.errors()]


def error_text(model: type[BaseModel], data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return str(info.value)


# -- /v1/generate requests ----------------------------------------------------------------------
def test_api_example_parses():
    request = GenerateRequest.model_validate_json(json.dumps(API_EXAMPLE))
    assert request.sampling.strategy == "top_p" and request.sampling.p == 0.9
    assert request.stop == ["\n"] and request.logprobs == 0
    assert request.attention == AttentionRequest()


@pytest.mark.parametrize("model", [GenerateRequest, CompletionRequest, ChatCompletionRequest])
def test_schema_examples_parse(model):
    examples = model.model_json_schema()["examples"]
    assert examples
    for example in examples:
        model.model_validate(example)


def test_defaults():
    request = GenerateRequest(prompt="hi")
    assert (request.max_tokens, request.stream, request.seed, request.stop) == (64, False, None, [])
    assert request.sampling.strategy == "greedy" and request.attention is None
    assert request.logprobs is None and request.ignore_eos is False


STRATEGIES = {
    "greedy": ({"strategy": "greedy"}, {"temperature": 1.0, "k": None, "p": None}),
    "random": ({"strategy": "random", "temperature": 0.7},
               {"temperature": 0.7, "k": None, "p": None}),
    "top_k": ({"strategy": "top_k", "k": 5, "temperature": 0.5},
              {"temperature": 0.5, "k": 5, "p": None}),
    "top_p": ({"strategy": "top_p", "p": 0.9}, {"temperature": 1.0, "k": None, "p": 0.9}),
    "min_p": ({"strategy": "min_p", "p": 0.0, "temperature": 2.0},
              {"temperature": 2.0, "k": None, "p": 0.0}),
    "typical": ({"strategy": "typical", "p": 1.0, "temperature": 1.5},
                {"temperature": 1.5, "k": None, "p": 1.0}),
}


@pytest.mark.parametrize("name", STRATEGIES)
def test_sampling_params_per_strategy(name):
    sampling, expected = STRATEGIES[name]
    request = GenerateRequest(prompt="x", sampling=sampling, repetition_penalty=1.2,
                              frequency_penalty=-0.5, presence_penalty=2.0)
    params = request.sampling_params()
    assert params == {"strategy": name, **expected, "repetition_penalty": 1.2,
                      "frequency_penalty": -0.5, "presence_penalty": 2.0}
    assert SamplingParams(**params).strategy == name  # its __post_init__ accepts the dict


BAD_REQUESTS = [  # (change to a valid request, a field the error must name)
    ({"sampling": {"strategy": "top_k", "k": 0}}, "k"),
    ({"sampling": {"strategy": "top_k"}}, "k"),
    ({"sampling": {"strategy": "top_p", "p": 0}}, "p"),
    ({"sampling": {"strategy": "top_p", "p": 1.01}}, "p"),
    ({"sampling": {"strategy": "min_p", "p": 1}}, "p"),
    ({"sampling": {"strategy": "typical", "p": 0}}, "p"),
    ({"sampling": {"strategy": "random", "temperature": 0}}, "temperature"),
    ({"sampling": {"strategy": "random", "temperature": -1}}, "temperature"),
    ({"sampling": {"strategy": "random", "temperature": 1000}}, "temperature"),
    ({"sampling": {"strategy": "top_k", "k": 3, "temperature": math.nan}}, "temperature"),
    ({"sampling": {"strategy": "top_p", "p": 0.5, "temperature": math.inf}}, "temperature"),
    ({"sampling": {"strategy": "greedy", "k": 3}}, "k"),
    ({"sampling": {"strategy": "greedy", "temperature": 0.5}}, "temperature"),
    ({"sampling": {"strategy": "top_p", "p": 0.5, "k": 3}}, "k"),
    ({"sampling": {"strategy": "beam"}}, "sampling"),
    ({"sampling": {"temperature": 1.0}}, "sampling"),
    ({"promt": "typo"}, "promt"),
    ({"prompt": ""}, "prompt"),
    ({"stop": ["a"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -math.inf}, "presence_penalty"),
    ({"attention": {"heads": "max"}}, "heads"),
    ({"attention": {"layers": "mean"}}, "layers"),
    ({"attention": {"layers": []}}, "layers"),
    ({"attention": {"layers": [-1]}}, "layers"),
    ({"attention": {"heads": [0, 1, 1]}}, "heads"),
    ({"attention": {"heads": list(range(257))}}, "heads"),
    ({"attention": {"layer": [0]}}, "layer"),
]


@pytest.mark.parametrize("change,field", BAD_REQUESTS,
                         ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_REQUESTS)])
def test_bad_generate_request_names_the_field(change, field):
    locs = error_locs(GenerateRequest, {"prompt": "x"} | change)
    assert any(field in loc for loc in locs), locs


def test_stop_accepts_one_string_or_null():
    assert GenerateRequest(prompt="x", stop="\n").stop == ["\n"]
    assert GenerateRequest.model_validate({"prompt": "x", "stop": None}).stop == []
    assert GenerateRequest(prompt="x", stop=["a", "b"]).stop == ["a", "b"]


def test_attention_request_maps_to_attention_spec():
    request = AttentionRequest(layers=[3, 0], heads="mean", include_prompt=False)
    assert AttentionSpec(**request.spec_kwargs()) == AttentionSpec(
        layers=(3, 0), heads="mean", include_prompt=False)
    assert AttentionSpec(**AttentionRequest().spec_kwargs()) == AttentionSpec()


def test_tokenizer_requests():
    assert TokenizeRequest(text="").add_special_tokens is True  # empty text is allowed
    assert "ids" in str(error_locs(DetokenizeRequest, {"ids": [1, -2]}))
    assert "extra" in error_text(TokenizeRequest, {"text": "a", "txt": "b"}).lower()


# -- OpenAI-compatible requests -----------------------------------------------------------------
OPENAI_MAPPING = [  # (knobs, strategy, temperature, k, p)
    ({}, "random", 1.0, None, None),
    ({"temperature": 0}, "greedy", 1.0, None, None),
    ({"temperature": 0, "top_k": 40, "top_p": 0.9}, "greedy", 1.0, None, None),
    ({"temperature": 0.7}, "random", 0.7, None, None),
    ({"top_k": 40, "temperature": 0.5}, "top_k", 0.5, 40, None),
    ({"top_k": 0}, "random", 1.0, None, None),
    ({"top_k": -1, "top_p": 0.8}, "top_p", 1.0, None, 0.8),
    ({"min_p": 0.05}, "min_p", 1.0, None, 0.05),
    ({"typical_p": 0.9}, "typical", 1.0, None, 0.9),
    ({"top_p": 0.9, "temperature": 1.3}, "top_p", 1.3, None, 0.9),
    ({"top_p": 1.0, "min_p": 0.0, "typical_p": 1.0}, "random", 1.0, None, None),
]


@pytest.mark.parametrize("knobs,strategy,temperature,k,p", OPENAI_MAPPING)
def test_openai_knobs_map_to_one_strategy(knobs, strategy, temperature, k, p):
    for request in (CompletionRequest(prompt="x", **knobs),
                    ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **knobs)):
        params = request.sampling_params()
        assert params == {"strategy": strategy, "temperature": temperature, "k": k, "p": p,
                          "repetition_penalty": 1.0, "frequency_penalty": 0.0,
                          "presence_penalty": 0.0}
        SamplingParams(**params)


@pytest.mark.parametrize("knobs", [{"top_k": 40, "top_p": 0.9}, {"min_p": 0.1, "typical_p": 0.5},
                                   {"top_p": 0.5, "min_p": 0.2}])
def test_openai_conflicting_knobs_are_refused_by_name(knobs):
    message = error_text(CompletionRequest, {"prompt": "x", "temperature": 0.8, **knobs})
    assert all(name in message for name in knobs), message


@pytest.mark.parametrize("change,field", [
    ({"n": 2}, "n"), ({"best_of": 3}, "best_of"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"suffix": "end"}, "suffix"),
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0}, "top_p"), ({"min_p": 1}, "min_p"),
    ({"top_k": -2}, "top_k"), ({"logprobs": 6}, "logprobs"), ({"prompt": ["a"] * 65}, "prompt"),
    ({"prompt": [[1]] * 65}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [""]}, "prompt"),
    ({"stop": ["a"] * 9}, "stop"), ({"max_tokens": -1}, "max_tokens"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"),
])
def test_bad_completion_request_names_the_field(change, field):
    locs = error_locs(CompletionRequest, {"prompt": "x"} | change)
    assert any(field in loc for loc in locs), locs


def test_completion_prompts_in_openais_four_forms():
    forms = [("x", ["x"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]), ([[1, 2], [3]], [[1, 2], [3]])]
    for prompt, prompts in forms:
        assert CompletionRequest(prompt=prompt).prompts() == prompts
    assert "needs echo=true" in error_text(CompletionRequest, {"prompt": "x", "max_tokens": 0})
    scoring = CompletionRequest(prompt="x", max_tokens=0, echo=True, logprobs=1, prompt_logprobs=3)
    assert scoring.prompt_logprobs_wanted() == 3
    assert CompletionRequest(prompt="x", logprobs=2).prompt_logprobs_wanted() is None


def test_n_greater_than_one_is_refused_with_a_clear_message():
    assert "n must be 1" in error_text(CompletionRequest, {"prompt": "x", "n": 2})
    assert "n must be 1" in error_text(
        ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}], "n": 2})


def test_openai_requests_ignore_unknown_fields_and_null_means_default():
    request = CompletionRequest.model_validate({
        "prompt": ["only one"], "model": "whatever", "temperature": None, "top_p": None,
        "n": None, "stop": None, "max_tokens": None, "logprobs": None, "frequency_penalty": None,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        "metadata": {"a": 1}, "logit_bias": {}, "stream": True})
    assert request.prompts() == ["only one"]
    assert (request.temperature, request.top_p, request.n, request.stop) == (1.0, 1.0, 1, [])
    assert request.max_tokens == 16 and request.num_logprobs() is None
    assert request.include_usage and not CompletionRequest(prompt="x").include_usage
    assert CompletionRequest(prompt="x", stop="###").stop == ["###"]


def test_chat_messages():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "two plus"},
                                     {"type": "text", "text": "three?"}], "name": "bob"},
        {"role": "assistant", "content": None}]})
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "be brief"), ("user", "two plus\nthree?"), ("assistant", "")]
    assert request.max_new_tokens() == schemas.MAX_NEW_TOKENS
    assert request.num_logprobs() is None


@pytest.mark.parametrize("change,expected", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "image_url"),
    ({"top_logprobs": 3}, "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "disagree"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 3}, "n"),
])
def test_bad_chat_request(change, expected):
    data = {"messages": [{"role": "user", "content": "x"}]} | change
    assert expected in error_text(ChatCompletionRequest, data)


def test_chat_token_budget_and_logprobs():
    base = {"messages": [{"role": "user", "content": "x"}]}
    assert ChatCompletionRequest(**base, max_completion_tokens=7).max_new_tokens() == 7
    assert ChatCompletionRequest(**base, max_tokens=5).max_new_tokens() == 5
    assert ChatCompletionRequest(**base, logprobs=True).num_logprobs() == 0
    assert ChatCompletionRequest(**base, logprobs=True, top_logprobs=4).num_logprobs() == 4


# -- responses and events -----------------------------------------------------------------------
USAGE = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
TIMINGS = {"queue_ms": 0.1, "ttft_ms": 2.0, "total_ms": 3.1, "tokens_per_second": 950.0}
ATTENTION_ROWS = [[[0.25, 0.25, 0.5]]]  # [layer][head][key]
PROMPT_ATTENTION = [[[[1.0], [0.4, 0.6]]]]  # [layer][head][query][key]


def test_optional_parts_are_left_out_unless_set():
    bare = GenerateResponse(
        id="gen-1", model="calculator", text=" five", tokens=[{"id": 17, "text": " five"}],
        prompt_tokens=[{"id": 3, "text": "two"}], finish_reason="stop", usage=USAGE,
        timings=TIMINGS)
    for dumped in (bare.model_dump(), json.loads(bare.model_dump_json()),
                   bare.model_dump(exclude_none=True)):
        assert "prompt_attention" not in dumped
        assert dumped["tokens"] == [{"id": 17, "text": " five"}]
        assert dumped["timings"] == TIMINGS and dumped["usage"] == USAGE
    full = bare.model_copy(update={
        "prompt_attention": PROMPT_ATTENTION,
        "tokens": [GeneratedToken(id=17, text=" five", logprob=-0.01, attention=ATTENTION_ROWS,
                                  top_logprobs=[{"id": 17, "text": " five", "logprob": -0.01}])]})
    dumped = json.loads(full.model_dump_json())
    assert dumped["prompt_attention"] == PROMPT_ATTENTION
    assert set(dumped["tokens"][0]) == {"id", "text", "logprob", "top_logprobs", "attention"}
    assert GenerateResponse.model_validate(dumped) == full


def test_minus_infinity_logprob_is_sent_as_the_floor():
    event = TokenEvent(index=0, id=1, text="a", logprob=-math.inf,
                       top_logprobs=[{"id": 2, "text": "b", "logprob": -math.inf}])
    dumped = json.loads(event.model_dump_json())
    assert dumped["logprob"] == dumped["top_logprobs"][0]["logprob"] == schemas.LOGPROB_FLOOR


EVENTS = [
    StartEvent(id="gen-1", model="calculator", prompt_tokens=[{"id": 3, "text": "two"}]),
    StartEvent(id="gen-1", model="calculator", prompt_tokens=[{"id": 3, "text": "two"}],
               prompt_attention=[[[[1.0]]]]),
    TokenEvent(index=0, id=17, text=" five"),
    TokenEvent(index=1, id=2, text="", logprob=-0.5, attention=ATTENTION_ROWS,
               top_logprobs=[{"id": 2, "text": "", "logprob": -0.5}]),
    DoneEvent(finish_reason="length", text=" five", usage=USAGE, timings=TIMINGS),
    ErrorEvent(error={"type": "internal", "message": "boom"}),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_stream_events_round_trip(event):
    line = event.model_dump_json()
    assert "\n" not in line and "null" not in line
    parsed = parse_stream_event(line)
    assert type(parsed) is type(event) and parsed == event
    assert json.loads(line)["type"] == event.type


def test_stream_event_union_refuses_unknown_types():
    with pytest.raises(ValidationError):
        parse_stream_event('{"type": "middle"}')


def test_error_response_keeps_extra_fields():
    error = ErrorResponse(error={"type": "context_length_exceeded", "message": "too long",
                                 "prompt_tokens": 3000, "max_context": 2048, "hint": "shorter"})
    assert error.model_dump() == {"error": {
        "type": "context_length_exceeded", "message": "too long", "prompt_tokens": 3000,
        "max_context": 2048, "hint": "shorter"}}


# -- OpenAI-compatible responses parse with the openai SDK ---------------------------------------
def test_completion_response_matches_openai():
    response = CompletionResponse(id="cmpl-1", model="calculator", usage=USAGE, choices=[{
        "text": " five", "finish_reason": "stop", "logprobs": {
            "tokens": [" five"], "token_logprobs": [-0.01], "text_offset": [21],
            "top_logprobs": [{" five": -0.01, " six": -math.inf}]}}])
    dumped = response.model_dump(mode="json")
    parsed = Completion.model_validate(dumped)
    assert parsed.choices[0].text == " five" and parsed.usage.total_tokens == 5
    assert parsed.choices[0].logprobs.top_logprobs[0][" six"] == schemas.LOGPROB_FLOOR
    assert "attention" not in dumped["choices"][0] and "prompt_attention" not in dumped


def test_completion_chunks_match_openai():
    middle = CompletionChunk(id="c", model="m", choices=[{"text": " fi"}]).model_dump(mode="json")
    assert middle["choices"][0]["finish_reason"] is None  # sent as null, as OpenAI does
    # The SDK reads stream chunks without validating (finish_reason is null until the end).
    assert construct_type(value=middle, type_=Completion).choices[0].text == " fi"
    last = CompletionChunk(id="c", model="m", choices=[{"text": "ve", "finish_reason": "length"}])
    assert Completion.model_validate(last.model_dump()).choices[0].finish_reason == "length"
    usage = CompletionChunk(id="c", model="m", choices=[], usage=USAGE)
    assert Completion.model_validate(usage.model_dump()).usage.completion_tokens == 1


def test_chat_completion_response_matches_openai():
    top = [{"token": " six", "logprob": -2.0, "bytes": [32, 115, 105, 120]}]
    response = ChatCompletionResponse(
        id="chatcmpl-1", model="calculator", usage=USAGE,
        prompt_tokens=[{"id": 3, "text": "two"}], prompt_attention=PROMPT_ATTENTION,
        choices=[{"message": {"content": " five"}, "finish_reason": "stop",
                  "tokens": [{"id": 17, "text": " five"}], "attention": [ATTENTION_ROWS],
                  "logprobs": {"content": [{"token": " five", "logprob": -0.01,
                                            "bytes": [32, 102, 105, 118, 101],
                                            "top_logprobs": top}]}}])
    dumped = response.model_dump(mode="json")
    parsed = ChatCompletion.model_validate(dumped)
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].message.content == " five"
    assert parsed.choices[0].logprobs.content[0].top_logprobs[0].token == " six"
    assert dumped["prompt_attention"] == PROMPT_ATTENTION  # our extension rides along
    assert dumped["choices"][0]["attention"] == [ATTENTION_ROWS]


def test_chat_chunks_match_openai():
    first = ChatCompletionChunk(id="c", model="m",
                                choices=[{"delta": {"role": "assistant", "content": ""}}])
    middle = ChatCompletionChunk(id="c", model="m", choices=[{"delta": {"content": " five"}}])
    last = ChatCompletionChunk(id="c", model="m", choices=[{"delta": {}, "finish_reason": "stop"}])
    usage = ChatCompletionChunk(id="c", model="m", choices=[], usage=USAGE)
    parsed = [OpenAIChatChunk.model_validate(c.model_dump(mode="json"))
              for c in (first, middle, last, usage)]
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[1].choices[0].delta.content == " five"
    assert "role" not in middle.model_dump()["choices"][0]["delta"]
    assert parsed[2].choices[0].finish_reason == "stop" and parsed[3].usage.total_tokens == 5
    assert middle.model_dump()["choices"][0]["finish_reason"] is None


def test_model_list_matches_openai():
    models = ModelList(data=[ModelCard(id="calculator", max_context=2048)])
    dumped = models.model_dump(mode="json")
    assert dumped["object"] == "list"
    card = Model.model_validate(dumped["data"][0])
    assert (card.id, card.object, card.owned_by) == ("calculator", "model", "attnserve")
    assert dumped["data"][0]["max_context"] == 2048


def test_every_model_has_a_json_schema():
    models = [m for m in vars(schemas).values() if isinstance(m, type)
              and issubclass(m, BaseModel) and m.__module__.startswith(schemas.__name__ + ".")]
    assert len(models) > 40
    for model in models:
        for mode in ("validation", "serialization"):
            assert model.model_json_schema(mode=mode)
    described = GenerateRequest.model_json_schema()["properties"]
    assert all("description" in described[name] for name in described if name != "sampling"
               and not name.endswith("penalty")) and "description" in described["frequency_penalty"]


# -- the module stays torch-free ----------------------------------------------------------------
def test_import_pulls_in_no_heavy_dependency():
    code = ("import sys, server.schemas; "
            "print([m for m in ('torch', 'litserve', 'fastapi', 'starlette') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


# -- property: any valid request survives a JSON round trip -------------------------------------
temperatures = st.floats(schemas.MIN_TEMPERATURE, schemas.MAX_TEMPERATURE)
samplings = st.one_of(
    st.just({"strategy": "greedy"}),
    st.fixed_dictionaries({"strategy": st.just("random")}, optional={"temperature": temperatures}),
    st.fixed_dictionaries({"strategy": st.just("top_k"), "k": st.integers(1, schemas.MAX_TOP_K),
                           "temperature": temperatures}),
    *(st.fixed_dictionaries({"strategy": st.just(name), "p": p, "temperature": temperatures})
      for name, p in [("top_p", st.floats(0, 1, exclude_min=True)),
                      ("min_p", st.floats(0, 1, exclude_max=True)),
                      ("typical", st.floats(0, 1, exclude_min=True))]),
)
indices = st.lists(st.integers(0, schemas.MAX_ATTENTION_INDEX), min_size=1, max_size=8,
                   unique=True)
penalties = st.floats(-2, 2)
generate_requests = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=40)}, optional={
    "max_tokens": st.integers(1, schemas.MAX_NEW_TOKENS),
    "stream": st.booleans(),
    "sampling": samplings,
    "seed": st.none() | st.integers(0, schemas.MAX_SEED - 1),
    "stop": st.text(min_size=1, max_size=5) | st.lists(st.text(min_size=1, max_size=5),
                                                       max_size=MAX_STOP_STRINGS),
    "repetition_penalty": st.floats(schemas.MIN_REPETITION_PENALTY,
                                    schemas.MAX_REPETITION_PENALTY),
    "frequency_penalty": penalties,
    "presence_penalty": penalties,
    "logprobs": st.none() | st.integers(0, schemas.MAX_LOGPROBS),
    "ignore_eos": st.booleans(),
    "attention": st.none() | st.fixed_dictionaries({}, optional={
        "layers": st.just("all") | indices, "heads": st.sampled_from(["all", "mean"]) | indices,
        "include_prompt": st.booleans()}),
})


@settings(max_examples=200, deadline=None)
@given(generate_requests)
def test_generate_request_json_round_trip(data):
    request = GenerateRequest.model_validate(data)
    assert GenerateRequest.model_validate_json(request.model_dump_json()) == request
    assert GenerateRequest.model_validate(request.model_dump()) == request
    SamplingParams(**request.sampling_params())


def test_fastapi_answers_422_naming_the_field_and_documents_the_models():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/v1/generate", response_model=GenerateResponse)
    def generate(request: GenerateRequest) -> GenerateResponse:
        return GenerateResponse(id="gen-1", model="m", text="", tokens=[], prompt_tokens=[],
                                finish_reason="length", usage=USAGE, timings=TIMINGS)

    client = TestClient(app)
    answer = client.post("/v1/generate", json={"prompt": "x"})
    assert answer.status_code == 200 and "prompt_attention" not in answer.json()
    answer = client.post("/v1/generate", json={"prompt": "x", "sampling": {"strategy": "greedy",
                                                                          "k": 3}})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "sampling", "greedy", "k"]
    components = client.get("/openapi.json").json()["components"]["schemas"]
    assert components["GenerateRequest"]["properties"]["prompt"]["description"]
    assert components["GenerateRequest"]["examples"] == [schemas.GENERATE_EXAMPLE]
