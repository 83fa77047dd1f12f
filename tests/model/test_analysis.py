"""Analyze (teacher-forced) through the engine, against `transformers` on the same random weights,
and against itself: alone vs in a busy batch, scored prompt + completion vs per-token logprobs."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import LlamaForCausalLM

from model.checkpoint import save_checkpoint
from model.engine import Engine
from model.events import (
    AnalysisRequest,
    Analyzed,
    AttentionSpec,
    Finished,
    GenerationRequest,
    LensSpec,
)
from model.limits import AttentionPayloadTooLarge, ContextLengthExceeded, Limits
from model.tokenizer import Tokenizer
from tests.conftest import tiny_model

TEXTS = ["two plus three equals five", "forty two minus seven equals thirty five", "naïve café 日本語 🙂"]
TEXT = "forty two minus seven equals thirty five"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS * 20, vocab_size=320)


def make_model(tokenizer, **overrides):
    return tiny_model(vocab_size=tokenizer.vocab_size, max_context=48, n_layers=3, **overrides)


@pytest.fixture
def model(tokenizer):
    return make_model(tokenizer)


def everything(ids, **kw) -> AnalysisRequest:
    return AnalysisRequest(ids=ids, attention=AttentionSpec(), logprobs=5, lens=LensSpec(top_k=4), **kw)


def hf_reference(model, ids, tmp_path):
    """HF's eager forward on the same weights: logits (T, V), attentions [layer] (nh, T, T) and the
    lens distribution per layer (T, V): lm_head(norm(hidden_states[ℓ + 1])), except the last
    layer's (HF's last hidden state is already normed): softmax of the logits."""
    save_checkpoint(model, None, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
        n_layers = model.config.n_layers
        lens = [hf.lm_head(hf.model.norm(out.hidden_states[layer + 1][0])).softmax(-1) for layer in range(n_layers - 1)]
        lens.append(out.logits[0].softmax(-1))
    return out.logits[0], [a[0] for a in out.attentions], lens


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_heads=1, tie_embeddings=True)])
def test_analyze_matches_transformers(tokenizer, overrides, tmp_path):
    model = make_model(tokenizer, **overrides)
    ids = tokenizer.encode(TEXT)
    n = len(ids)
    result = Engine(model, tokenizer).analyze(everything(ids))
    logits, attentions, lens = hf_reference(model, ids, tmp_path)

    logprobs = logits.log_softmax(-1)                         # row q predicts token q + 1
    assert result.logprobs[0] is None and result.top_logprobs[0] == []
    for i in range(1, n):
        assert abs(result.logprobs[i] - float(logprobs[i - 1, ids[i]])) <= 1e-4
        top = logprobs[i - 1].topk(5)
        assert [t for t, _ in result.top_logprobs[i]] == top.indices.tolist()
        assert max(abs(lp - float(ref)) for (_, lp), ref in zip(result.top_logprobs[i], top.values)) <= 1e-4

    assert result.attention.dtype == torch.float32
    assert result.attention.shape == (3, model.config.n_heads, n, n)
    for layer in range(3):
        assert (result.attention[layer] - attentions[layer]).abs().max() <= 1e-5

    assert result.lens.layers == (0, 1, 2) and result.lens.ids.shape == result.lens.probs.shape == (3, n, 4)
    for layer in range(3):
        ref = lens[layer].topk(4)
        assert torch.equal(result.lens.ids[layer], ref.indices)
        assert (result.lens.probs[layer] - ref.values).abs().max() <= 1e-4


def test_last_layers_lens_is_the_models_own_distribution(model, tokenizer):
    ids = tokenizer.encode(TEXT)
    result = Engine(model, tokenizer).analyze(AnalysisRequest(ids=ids, logprobs=6, lens=LensSpec(layers=(2,), top_k=6)))
    with torch.no_grad():
        probs = model(torch.tensor([ids])).logits[0].softmax(-1)          # (T, V)
    top = probs.topk(6)
    assert torch.equal(result.lens.ids[0], top.indices)
    assert (result.lens.probs[0] - top.values).abs().max() <= 1e-5
    for i in range(1, len(ids)):                           # the same numbers as the logprobs
        assert [t for t, _ in result.top_logprobs[i]] == result.lens.ids[0, i - 1].tolist()
        lens_lp = result.lens.probs[0, i - 1].log()
        assert max(abs(lp - float(ref)) for (_, lp), ref in zip(result.top_logprobs[i], lens_lp)) <= 1e-4


def test_prompt_plus_completion_score_is_the_sum_of_completion_logprobs(model, tokenizer):
    prompt = tokenizer.encode("forty two minus seven equals")
    ids = tokenizer.encode(TEXT)
    assert ids[: len(prompt)] == prompt and len(ids) > len(prompt) + 1
    result = Engine(model, tokenizer).analyze(AnalysisRequest(ids=ids, completion_start=len(prompt)))
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(prompt), len(ids)))
    assert abs(result.completion_logprob - expected) <= 1e-4
    assert abs(result.completion_logprob - sum(result.logprobs[len(prompt):])) <= 1e-6
    assert result.top_logprobs is None and result.attention is None and result.lens is None
    assert Engine(model, tokenizer).analyze(AnalysisRequest(ids=ids)).completion_logprob is None


def test_analyze_yields_its_result_then_finished_and_frees_its_slot_in_the_same_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    handle = engine.submit(AnalysisRequest(ids=tokenizer.encode(TEXT)))
    engine.step()
    assert handle.finished and engine.num_running == 0 and engine._free == [0]
    result, done = list(handle.events)
    assert isinstance(result, Analyzed) and isinstance(done, Finished)
    assert (done.prompt_tokens, done.completion_tokens, done.finish_reason) == (len(result.ids), 0, "stop")
    assert 0 <= done.queue_time <= done.ttft <= done.total_time


def assert_same_analysis(a: Analyzed, b: Analyzed) -> None:
    assert a.ids == b.ids and a.logprobs[0] is None is b.logprobs[0]
    assert max(abs(x - y) for x, y in zip(a.logprobs[1:], b.logprobs[1:])) <= 1e-5
    assert [[t for t, _ in row] for row in a.top_logprobs] == [[t for t, _ in row] for row in b.top_logprobs]
    assert (a.attention - b.attention).abs().max() <= 1e-5
    assert torch.equal(a.lens.ids, b.lens.ids) and (a.lens.probs - b.lens.probs).abs().max() <= 1e-5


def test_analyze_in_a_busy_batch_equals_alone(model, tokenizer):
    ids = tokenizer.encode(TEXT)
    alone = Engine(model, tokenizer, max_batch=1).analyze(everything(ids))
    engine = Engine(model, tokenizer, max_batch=4)
    busy = [engine.submit(GenerationRequest(prompt_ids=tokenizer.encode(t), max_tokens=30, ignore_eos=True,
                                            attention=AttentionSpec(layers=(1,)), lens=LensSpec(layers=(0,))))
            for t in ("two plus", "café")]
    engine.step()
    engine.step()                                              # two requests decoding
    shapes = []
    hook = model.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    # Prefilled together with a new generation prompt (right-padded to the longer one), while the
    # two others decode, in one step.
    together = engine.submit(everything(ids))
    newcomer = engine.submit(GenerationRequest(prompt_ids=tokenizer.encode("two plus three"), max_tokens=5,
                                               ignore_eos=True))
    engine.step()
    hook.remove()
    assert shapes == [(2, len(ids)), (2, 1)]                  # one prefill for both, one decode
    assert together.finished and not newcomer.finished and engine.num_running == 3
    assert_same_analysis(together.events[0], alone)
    assert not any(h.finished for h in busy)
    for h in (*busy, newcomer):
        while not h.finished:
            engine.step()


def test_a_cancelled_analyze_ends_cancelled_without_a_result(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    engine.submit(GenerationRequest(prompt_ids=tokenizer.encode("two"), max_tokens=20, ignore_eos=True))
    engine.step()                                              # the one slot is busy: the analysis waits
    waiting = engine.submit(everything(tokenizer.encode(TEXT)))
    engine.step()
    assert engine.num_waiting == 1
    engine.cancel(waiting.request_id)
    engine.step()
    events = list(waiting.events)
    assert waiting.finished and len(events) == 1
    assert events[0].finish_reason == "cancelled" and events[0].prompt_tokens == len(tokenizer.encode(TEXT))
    assert engine.num_waiting == 0 and engine.num_running == 1


def test_invalid_analyze_requests_name_the_field_and_limit(model, tokenizer):
    engine = Engine(model, tokenizer, max_context=16)
    ids = tokenizer.encode("two plus three")
    bad = {
        "ids is empty": AnalysisRequest(ids=[]),
        r"ids must be token ids in \[0, ": AnalysisRequest(ids=[1, model.config.vocab_size]),
        r"logprobs must be in \[0, 20\]": AnalysisRequest(ids=ids, logprobs=21),
        r"lens.layers .* \[0, 3\), got \[3\]": AnalysisRequest(ids=ids, lens=LensSpec(layers=(3,))),
        r"lens.layers must be a non-empty": AnalysisRequest(ids=ids, lens=LensSpec(layers=())),
        r"lens.top_k must be an int in \[1, 20\], got 0": AnalysisRequest(ids=ids, lens=LensSpec(top_k=0)),
        r"lens.top_k .* got 21": AnalysisRequest(ids=ids, lens=LensSpec(top_k=21)),
        r"attention.heads .* \[0, 4\)": AnalysisRequest(ids=ids, attention=AttentionSpec(heads=(4,))),
        r"completion_start must be in \[1, 3\]": AnalysisRequest(ids=ids, completion_start=4),
        r"completion_start .* got 0": AnalysisRequest(ids=ids, completion_start=0),
    }
    for message, req in bad.items():
        with pytest.raises(ValueError, match=message):
            engine.submit(req)
    with pytest.raises(ContextLengthExceeded) as err:
        engine.submit(AnalysisRequest(ids=[5] * 17))
    assert (err.value.prompt_tokens, err.value.max_context) == (17, 16)
    for gen in (GenerationRequest(prompt_ids=ids, lens=LensSpec(layers=(5,))),
                GenerationRequest(prompt_ids=ids, lens=LensSpec(top_k=25))):
        with pytest.raises(ValueError, match=r"lens\.(layers|top_k)"):
            engine.submit(gen)
    assert engine.num_waiting == 0


def test_payload_size_counts_what_comes_back(model, tokenizer):
    config = model.config                                       # 3 layers, 4 heads
    ids = tokenizer.encode(TEXT)
    n = len(ids)
    analyze = everything(ids)
    result = Engine(model, tokenizer).analyze(analyze)
    causal = 3 * 4 * n * (n + 1) // 2                          # (L, H, n, n) weights, rows of q + 1 keys
    assert result.attention.shape == (3, 4, n, n)
    limits = Limits.of(config, max_context=48)
    assert limits.payload_floats(analyze) == causal + 2 * result.lens.ids.numel()
    mean = AnalysisRequest(ids=ids, attention=AttentionSpec(layers=(0, 2), heads="mean"))
    assert limits.payload_floats(mean) == 2 * n * (n + 1) // 2

    gen = GenerationRequest(prompt_ids=ids, max_tokens=5, ignore_eos=True, attention=AttentionSpec(heads=(1,)),
                            lens=LensSpec(layers=(0, 1), top_k=3, include_prompt=True))
    events = list(Engine(model, tokenizer).generate(gen))
    assert events[0].prompt_attention.shape == (3, 1, n, n)
    numbers = 3 * n * (n + 1) // 2 + 2 * events[0].prompt_lens.ids.numel()
    numbers += sum(e.attention.numel() + 2 * e.lens.ids.numel() for e in events[1:-1])
    assert limits.payload_floats(gen) == int(numbers)
    # near the context's end only the tokens that fit count
    assert limits.payload_floats(GenerationRequest(prompt_ids=[1] * 47, max_tokens=100,
                                                   lens=LensSpec(top_k=1))) == 2 * 3 * 1 * 2

    with pytest.raises(AttentionPayloadTooLarge) as err:
        Limits.of(config, max_context=48, max_attention_floats=causal).check(analyze)
    assert (err.value.floats, err.value.limit) == (causal + 2 * result.lens.ids.numel(), causal)
    Limits.of(config, max_context=48, max_attention_floats=causal + 2 * result.lens.ids.numel()).check(analyze)


def test_requests_and_results_cross_a_process_boundary(model, tokenizer):
    """The server builds the request once and sends it to the worker as it is; results come back."""
    request = everything(tokenizer.encode(TEXT), completion_start=3)
    again = pickle.loads(pickle.dumps(request))
    assert again == request
    here = Engine(model, tokenizer).analyze(again)
    result = pickle.loads(pickle.dumps(here))
    assert isinstance(result, Analyzed) and result.completion_logprob == here.completion_logprob
    assert torch.equal(result.attention, here.attention) and torch.equal(result.lens.probs, here.lens.probs)
    gen = GenerationRequest(prompt_ids=[1, 2], lens=LensSpec(layers=(0,), top_k=2, include_prompt=True))
    assert pickle.loads(pickle.dumps(gen)) == gen


def test_prompt_logprobs_of_a_generation_equal_analyze_and_transformers(model, tokenizer, tmp_path):
    """A generation that asks for its prompt's logprobs gets them on Started from its own prefill
    (batched with one that does not ask): the same numbers as analyze's, and as HF's log-softmax."""
    ids = tokenizer.encode(TEXT)
    engine = Engine(model, tokenizer, max_batch=4, max_context=48)
    asking = engine.submit(GenerationRequest(prompt_ids=ids, max_tokens=3, prompt_logprobs=3))
    plain = engine.submit(GenerationRequest(prompt_ids=tokenizer.encode(TEXTS[0]), max_tokens=3))
    engine.step()
    started = asking.events[0]
    assert plain.events[0].prompt_logprobs is None and plain.events[0].prompt_top_logprobs is None
    alone = engine.analyze(AnalysisRequest(ids=ids, logprobs=3))
    assert started.prompt_logprobs[0] is None and alone.logprobs[0] is None
    assert torch.allclose(torch.tensor(started.prompt_logprobs[1:]), torch.tensor(alone.logprobs[1:]), atol=1e-5)
    assert [[t for t, _ in row] for row in started.prompt_top_logprobs] == \
        [[t for t, _ in row] for row in alone.top_logprobs]
    logits, _, _ = hf_reference(model, ids, tmp_path)
    reference = logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(started.prompt_logprobs[1:]), reference, atol=1e-4)


def test_prompt_logprobs_are_checked_naming_the_field(model, tokenizer):
    limits = Limits.of(model.config)
    with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\], got 21"):
        limits.check(GenerationRequest(prompt_ids=tokenizer.encode(TEXT), prompt_logprobs=21))
