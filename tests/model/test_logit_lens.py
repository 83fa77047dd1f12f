"""The logit lens: the model's residual streams against `transformers`' hidden states, and the
lens while generating against analyze on the generated text."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from model.checkpoint import save_checkpoint
from model.engine import Engine
from model.events import AnalysisRequest, GenerationRequest, LensSpec, Started, Token
from model.logit_lens import LENS_CHUNK, lens_top
from model.tokenizer import Tokenizer
from tests.conftest import tiny_model

TEXTS = ["two plus three equals five", "forty two minus seven equals thirty five", "naïve café 日本語 🙂"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS * 20, vocab_size=320)


@pytest.fixture
def model(tokenizer):
    return tiny_model(vocab_size=tokenizer.vocab_size, max_context=48, n_layers=3)


def test_lens_equals_transformers_hidden_states_through_norm_and_head(model, tmp_path):
    save_checkpoint(model, None, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ours = model(tokens, hidden_layers=range(3))
        theirs = hf(tokens, output_hidden_states=True)
        for layer in range(2):                                # HF's hidden_states[ℓ + 1]: after layer ℓ
            ref = hf.lm_head(hf.model.norm(theirs.hidden_states[layer + 1]))
            assert (model.logit_lens(ours.hidden[layer]) - ref).abs().max() <= 1e-4
        # the last layer's lens is the logits (HF's last hidden state is already normed)
        assert (model.logit_lens(ours.hidden[2]) - theirs.logits).abs().max() <= 1e-4
        assert torch.equal(model.logit_lens(ours.hidden[2]), ours.logits)


def test_cached_prefill_returns_the_same_streams(model):
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    cache = model.new_cache(max_batch=2)
    with torch.no_grad():
        full = model(tokens, hidden_layers=(0, 2))
        cached = model(tokens, positions=torch.arange(12)[None], cache=cache, slots=slice(1, 2), hidden_layers=(0, 2))
        none = model(tokens)
    assert sorted(full.hidden) == [0, 2] and none.hidden == {}
    for layer in (0, 2):
        assert (full.hidden[layer] - cached.hidden[layer]).abs().max() <= 1e-5


def test_lens_top_in_chunks_equals_all_at_once(model, monkeypatch):
    states = torch.randn(3, 50, model.config.dim)
    with torch.no_grad():
        probs = model.logit_lens(states).softmax(-1)
        ids, top = lens_top(model, states, 7)
        monkeypatch.setattr("model.logit_lens.LENS_CHUNK", 3 * model.config.vocab_size)   # 3 rows a chunk
        chunked = lens_top(model, states, 7)
    assert 3 * model.config.vocab_size < LENS_CHUNK
    ref = probs.topk(7)
    assert torch.equal(ids, ref.indices) and torch.equal(chunked[0], ids)
    assert (top - ref.values).abs().max() <= 1e-6 and (chunked[1] - top).abs().max() <= 1e-6


def test_lens_while_generating_matches_analyze_on_the_generated_text(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3)
    prompt = tokenizer.encode("forty two minus")
    lens = LensSpec(layers="all", top_k=5, include_prompt=True)
    mate = engine.submit(GenerationRequest(prompt_ids=tokenizer.encode("café"), max_tokens=12, ignore_eos=True))
    engine.step()                                              # a batch-mate that asks for nothing
    other = engine.submit(GenerationRequest(prompt_ids=tokenizer.encode("two plus"), max_tokens=9, ignore_eos=True,
                                            lens=LensSpec(layers=(2, 0), top_k=2)))
    handle = engine.submit(GenerationRequest(prompt_ids=prompt, max_tokens=8, ignore_eos=True, lens=lens))
    while not (handle.finished and other.finished and mate.finished):
        engine.step()

    def check(h, req_prompt, spec, *, with_prompt):
        events = list(h.events)
        tokens = [e for e in events if isinstance(e, Token)]
        ids = req_prompt + [t.id for t in tokens]
        ref = engine.analyze(AnalysisRequest(ids=ids, lens=LensSpec(layers=spec.layers, top_k=spec.top_k))).lens
        n = len(req_prompt)
        start = events[0]
        assert isinstance(start, Started)
        if with_prompt:
            assert torch.equal(start.prompt_lens.ids, ref.ids[:, :n])
            assert (start.prompt_lens.probs - ref.probs[:, :n]).abs().max() <= 1e-5
        else:
            assert start.prompt_lens is None
        for i, t in enumerate(tokens):                         # the step at position n - 1 + i made token i
            assert t.lens.layers == ref.layers and t.lens.ids.shape == (len(ref.layers), spec.top_k)
            assert torch.equal(t.lens.ids, ref.ids[:, n - 1 + i])
            assert (t.lens.probs - ref.probs[:, n - 1 + i]).abs().max() <= 1e-5
            assert t.id == int(t.lens.ids[list(ref.layers).index(2), 0])   # greedy: the last layer's top-1
        return tokens

    assert len(check(handle, prompt, lens, with_prompt=True)) == 8
    assert len(check(other, tokenizer.encode("two plus"), LensSpec(layers=(2, 0), top_k=2), with_prompt=False)) == 9
    mate_events = list(mate.events)
    assert mate_events[0].prompt_lens is None and all(e.lens is None for e in mate_events[1:-1])


def test_no_lens_asked_means_no_streams_returned(model, tokenizer):
    asked = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: asked.append(tuple(kwargs["hidden_layers"])),
                                       with_kwargs=True)
    engine = Engine(model, tokenizer, max_batch=2)
    events = list(engine.generate(GenerationRequest(prompt_ids=tokenizer.encode("two plus"), max_tokens=4)))
    assert asked and set(asked) == {()}
    assert events[0].prompt_lens is None and all(e.lens is None for e in events[1:-1])
    asked.clear()
    list(engine.generate(GenerationRequest(prompt_ids=tokenizer.encode("two plus"), max_tokens=3, ignore_eos=True,
                                           lens=LensSpec(layers=(1,)))))
    assert set(asked) == {(1,)}                                 # only the layer asked for
    hook.remove()
