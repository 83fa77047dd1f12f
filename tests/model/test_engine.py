"""The engine: continuous batching must not change what any one request gets."""

from __future__ import annotations

import pytest
import torch

from model.engine import Engine
from model.events import (
    AttentionSpec,
    Finished,
    GenerationRequest,
    QueueFull,
    Started,
    Token,
)
from model.limits import ContextLengthExceeded
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from tests.conftest import tiny_model

TEXTS = ["two plus three equals five", "forty two minus seven equals thirty five", "naïve café 日本語 🙂"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS * 20, vocab_size=320)


@pytest.fixture
def model(tokenizer):
    return tiny_model(vocab_size=tokenizer.vocab_size, max_context=48)


def run_alone(model, tokenizer, request: GenerationRequest):
    events = list(Engine(model, tokenizer, max_batch=1).generate(request))
    return [e for e in events if isinstance(e, Token)], events[-1]


def run_together(engine: Engine, requests: list[GenerationRequest]):
    """Submit all, step until all finish; return each request's tokens and Finished event."""
    handles = [engine.submit(r) for r in requests]
    while not all(h.finished for h in handles):
        engine.step()
    out = []
    for h in handles:
        events = list(h.events)
        out.append(([e for e in events if isinstance(e, Token)], events[-1]))
    return out


def request(tokenizer, text, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tokenizer.encode(text), **({"max_tokens": 12, "ignore_eos": True} | kw))


def test_event_order_and_usage(model, tokenizer):
    events = list(Engine(model, tokenizer).generate(request(tokenizer, "two plus", max_tokens=5)))
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    tokens = events[1:-1]
    assert [t.index for t in tokens] == list(range(5)) and all(isinstance(t, Token) for t in tokens)
    done = events[-1]
    assert (done.finish_reason, done.completion_tokens, done.prompt_tokens) == ("length", 5, 3)
    assert done.text == "".join(t.text for t in tokens) == tokenizer.decode([t.id for t in tokens])
    assert 0 <= done.queue_time <= done.ttft <= done.total_time


def test_batched_greedy_equals_unbatched_token_for_token(model, tokenizer):
    prompts = ["two", "forty two minus seven equals", "café", "two plus three equals five two plus"]
    engine = Engine(model, tokenizer, max_batch=3)            # 4 requests, 3 slots: one waits
    together = run_together(engine, [request(tokenizer, p, max_tokens=10 + i) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        alone = run_alone(model, tokenizer, request(tokenizer, p, max_tokens=10 + i))
        assert [t.id for t in together[i][0]] == [t.id for t in alone[0]]


def test_greedy_logprobs_match_a_full_recompute(model, tokenizer):
    req = request(tokenizer, "two plus three", max_tokens=6, logprobs=3)
    tokens, _ = run_alone(model, tokenizer, req)
    ids = req.prompt_ids + [t.id for t in tokens]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(req.prompt_ids)
    for i, t in enumerate(tokens):
        row = logprobs[n - 1 + i]
        assert t.id == int(row.argmax())
        assert abs(t.logprob - float(row[t.id])) < 1e-4
        assert [i for i, _ in t.top_logprobs] == row.topk(3).indices.tolist()


def test_same_seed_same_tokens_alone_and_in_a_busy_batch(model, tokenizer):
    sampling = SamplingParams(strategy="top_p", p=0.9, temperature=1.3)
    seeded = request(tokenizer, "two plus", max_tokens=15, sampling=sampling, seed=1234)
    alone, _ = run_alone(model, tokenizer, seeded)
    noise = [request(tokenizer, t, max_tokens=20, sampling=SamplingParams(strategy="random", temperature=2.0))
             for t in ("café", "forty", "two plus three")]
    engine = Engine(model, tokenizer, max_batch=4)
    engine.submit(noise[0])
    engine.step()                                             # the seeded request lands in another slot
    together = run_together(engine, [noise[1], request(tokenizer, "two plus", max_tokens=15, sampling=sampling,
                                                                seed=1234), noise[2]])
    assert [t.id for t in together[1][0]] == [t.id for t in alone]
    other = request(tokenizer, "two plus", max_tokens=15, sampling=sampling, seed=99)
    other_seed, _ = run_alone(model, tokenizer, other)
    assert [t.id for t in other_seed] != [t.id for t in alone]


def test_stop_string_split_across_tokens_is_caught_and_never_leaked(model, tokenizer):
    free, _ = run_alone(model, tokenizer, request(tokenizer, "two plus three", max_tokens=20))
    pieces = [t.text for t in free]
    full = "".join(pieces)
    # A stop string made of the end of one token and the start of the next.
    cut = next(i for i in range(1, len(pieces)) if pieces[i - 1] and pieces[i] and len(pieces[i - 1] + pieces[i]) >= 2)
    before = "".join(pieces[: cut - 1])
    stop = pieces[cut - 1][-1] + pieces[cut][0]
    assert stop not in before + pieces[cut - 1][:-1]
    stopped = request(tokenizer, "two plus three", max_tokens=20, stop=(stop, "never"))
    tokens, done = run_alone(model, tokenizer, stopped)
    assert done.finish_reason == "stop"
    assert done.text == full[: full.index(stop)]
    assert "".join(t.text for t in tokens) == done.text and stop not in done.text
    assert len(tokens) == cut + 1                             # ended on the token that completed it


def test_eos_stops_unless_ignored(model, tokenizer):
    def eos_everywhere(module, inputs, logits):               # make EOS the argmax at every position
        logits[..., tokenizer.eos_id] = logits.max() + 10.0
        return logits
    model.lm_head.register_forward_hook(eos_everywhere)
    _, done = run_alone(model, tokenizer, request(tokenizer, "two", max_tokens=5, ignore_eos=False))
    assert (done.finish_reason, done.completion_tokens, done.text) == ("stop", 1, "")
    _, done = run_alone(model, tokenizer, request(tokenizer, "two", max_tokens=5, ignore_eos=True))
    assert (done.finish_reason, done.completion_tokens) == ("length", 5)


def test_cancel_frees_the_slot_for_the_next_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    first = engine.submit(request(tokenizer, "two", max_tokens=40))
    second = engine.submit(request(tokenizer, "café", max_tokens=3))
    engine.step()
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(first.request_id)
    engine.step()                                             # the cancel and the admission, one step
    assert first.finished and first.events[-1].finish_reason == "cancelled"
    assert engine.num_running == 1 and engine.num_waiting == 0
    while not second.finished:
        engine.step()
    assert second.events[-1].finish_reason == "length" and engine.num_running == 0


def test_cancel_a_waiting_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    engine.submit(request(tokenizer, "two", max_tokens=5))
    waiting = engine.submit(request(tokenizer, "two", max_tokens=5))
    engine.cancel(waiting.request_id)
    engine.step()
    assert waiting.finished and waiting.events[-1].completion_tokens == 0


def test_closing_the_generator_cancels(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    stream = engine.generate(request(tokenizer, "two", max_tokens=30))
    next(stream), next(stream)
    stream.close()
    engine.step()
    assert engine.num_running == 0


@pytest.mark.parametrize("heads", ["all", "mean", (3, 0)])
def test_attention_rows_equal_the_models_explicit_path(model, tokenizer, heads):
    spec = AttentionSpec(layers=(1,) if heads != "all" else "all", heads=heads)
    req = request(tokenizer, "two plus three", max_tokens=6, attention=spec)
    engine = Engine(model, tokenizer, max_batch=2)
    engine.submit(request(tokenizer, "café café", max_tokens=10))  # a batch-mate that asks for nothing
    engine.step()
    (tokens, _), = run_together(engine, [req])
    ids = req.prompt_ids + [t.id for t in tokens]
    layers = spec.layer_ids(model.config.n_layers)
    with torch.no_grad():
        full = model(torch.tensor([ids]), attn_layers=layers).attentions
    ref = torch.stack([full[layer][0] for layer in layers])        # (L, nh, T, T)
    ref = ref.mean(1, keepdim=True) if heads == "mean" else ref if heads == "all" else ref[:, list(heads)]
    n = len(req.prompt_ids)
    for i, t in enumerate(tokens):
        assert torch.allclose(t.attention, ref[:, :, n - 1 + i, : n + i], atol=1e-5)
        assert torch.allclose(t.attention.sum(-1), torch.ones(t.attention.shape[:-1]), atol=1e-5)


def test_prompt_attention_and_first_row(model, tokenizer):
    req = request(tokenizer, "two plus three", max_tokens=2, attention=AttentionSpec())
    events = list(Engine(model, tokenizer).generate(req))
    prompt = events[0].prompt_attention                             # (L, nh, T, T)
    n = len(req.prompt_ids)
    assert prompt.shape == (model.config.n_layers, model.config.n_heads, n, n)
    assert (prompt.triu(1) == 0).all()
    assert torch.equal(events[1].attention, prompt[:, :, -1])
    no_prompt = list(Engine(model, tokenizer).generate(
        request(tokenizer, "two plus three", max_tokens=2, attention=AttentionSpec(include_prompt=False))))
    assert no_prompt[0].prompt_attention is None and no_prompt[1].attention is not None


def forward_shapes(model, work) -> list[tuple[int, int]]:
    """The (B, T) token shapes of every model forward that `work()` runs."""
    shapes = []
    hook = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        work()
    finally:
        hook.remove()
    return shapes


def test_prompts_admitted_together_are_prefilled_in_one_forward_as_if_alone(model, tokenizer):
    spec = AttentionSpec(layers="all", heads="all")
    prompts = ["two plus", "forty two minus", "café café"]
    requests = [request(tokenizer, p, max_tokens=4, logprobs=2, attention=spec) for p in prompts]
    lengths = [len(r.prompt_ids) for r in requests]
    assert len(set(lengths)) > 1                                     # right padding is exercised
    engine = Engine(model, tokenizer, max_batch=3)
    handles = [engine.submit(r) for r in requests]
    assert forward_shapes(model, engine.step) == [(3, max(lengths))]  # one prefill for all three
    while not all(h.finished for h in handles):
        engine.step()
    for handle, req in zip(handles, requests):
        together, alone = list(handle.events), list(Engine(model, tokenizer, max_batch=1).generate(req))
        assert torch.allclose(together[0].prompt_attention, alone[0].prompt_attention, atol=1e-5)
        for a, b in zip(together[1:-1], alone[1:-1], strict=True):
            assert a.id == b.id and abs(a.logprob - b.logprob) < 1e-4
            assert torch.allclose(a.attention, b.attention, atol=1e-5)


def test_a_long_prompt_is_not_padded_together_with_short_ones(model, tokenizer):
    short, long = tokenizer.encode("two"), tokenizer.encode("two plus three equals five " * 3)
    engine = Engine(model, tokenizer, max_batch=3)
    for ids in (short, long, short):
        engine.submit(GenerationRequest(prompt_ids=ids, max_tokens=2))
    assert forward_shapes(model, engine.step) == [(2, len(short)), (1, len(long))]


def test_no_attention_asked_means_none_computed(model, tokenizer):
    events = list(Engine(model, tokenizer).generate(request(tokenizer, "two", max_tokens=3)))
    assert events[0].prompt_attention is None and all(e.attention is None for e in events[1:-1])


def test_context_overflow_is_a_typed_error_with_both_numbers(model, tokenizer):
    engine = Engine(model, tokenizer, max_context=16)
    with pytest.raises(ContextLengthExceeded) as err:
        engine.submit(GenerationRequest(prompt_ids=[5] * 17))
    assert (err.value.prompt_tokens, err.value.max_context) == (17, 16)


def test_a_prompt_of_exactly_max_context_gets_one_token_then_length(model, tokenizer):
    engine = Engine(model, tokenizer, max_context=16)
    events = list(engine.generate(GenerationRequest(prompt_ids=[5] * 16, max_tokens=10, ignore_eos=True)))
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 1
    events = list(engine.generate(GenerationRequest(prompt_ids=[5] * 10, max_tokens=100, ignore_eos=True)))
    assert events[-1].completion_tokens == 16 - 10 + 1                # positions 9 … 15 each produced one


def test_invalid_requests_name_the_field(model, tokenizer):
    engine = Engine(model, tokenizer)
    bad = {"prompt_ids": dict(prompt_ids=[]), "max_tokens": dict(prompt_ids=[1], max_tokens=0),
           "logprobs": dict(prompt_ids=[1], logprobs=21),
           "attention.layers": dict(prompt_ids=[1], attention=AttentionSpec(layers=(7,))),
           "attention.heads": dict(prompt_ids=[1], attention=AttentionSpec(heads=(4,)))}
    for field, kwargs in bad.items():
        with pytest.raises(ValueError, match=field):
            engine.submit(GenerationRequest(**kwargs))


def test_queue_is_bounded(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2)
    engine.submit(request(tokenizer, "two"))
    engine.submit(request(tokenizer, "two"))
    with pytest.raises(QueueFull):
        engine.submit(request(tokenizer, "two"))


def test_penalties_change_greedy_output_and_stay_per_request(model, tokenizer):
    favourite = tokenizer.encode(" five", add_bos=False)[0]

    def repetitive(module, inputs, logits):                  # the model loves one token
        logits[..., favourite] = logits.abs().max() + 1.0
        return logits
    model.lm_head.register_forward_hook(repetitive)
    plain, _ = run_alone(model, tokenizer, request(tokenizer, "two", max_tokens=20))
    penalised = SamplingParams(repetition_penalty=1e3, presence_penalty=2.0)
    alone, _ = run_alone(model, tokenizer, request(tokenizer, "two", max_tokens=20, sampling=penalised))
    assert [t.id for t in plain] == [favourite] * 20
    assert [t.id for t in alone].count(favourite) == 1       # said once, then penalised away
    engine = Engine(model, tokenizer, max_batch=2)
    together = run_together(engine, [request(tokenizer, "two", max_tokens=20),
                                     request(tokenizer, "two", max_tokens=20, sampling=penalised)])
    assert [t.id for t in together[0][0]] == [t.id for t in plain]
    assert [t.id for t in together[1][0]] == [t.id for t in alone]


def test_each_request_samples_with_its_own_settings(model, tokenizer):
    """The engine caches a batch's sampling settings; a request that follows a finished one (whose
    bookkeeping object may be freed and its memory, so its id(), reused) must never inherit them."""
    engine = Engine(model, tokenizer, max_batch=1)
    prompt = tokenizer.encode("two plus")
    for i in range(30):
        temperature = 1.0 if i % 2 else 3.0
        sampling = SamplingParams() if i % 2 else SamplingParams(strategy="random", temperature=temperature)
        handle = engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=1 + i % 4, sampling=sampling, logprobs=0,
                                                 seed=i, ignore_eos=True))
        while not handle.finished:
            engine.step()
        tokens = [e for e in handle.events if isinstance(e, Token)]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [t.id for t in tokens]])).logits[0, len(prompt) - 1:]
        for t, row in zip(tokens, logits):
            expected = float((row / temperature).log_softmax(-1)[t.id])
            assert abs(t.logprob - expected) < 1e-4, (i, t.index, t.logprob, expected)
