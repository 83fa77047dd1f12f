"""The model against an implementation nobody here wrote (HF transformers), and against itself:
explicit vs fast attention, cached vs recomputed, batched over slots vs alone."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.attention import explicit_attention, fast_attention
from model.checkpoint import save_checkpoint
from tests.conftest import tiny_model


def hf_twin(model, tmp_path) -> LlamaForCausalLM:
    save_checkpoint(model, None, tmp_path)
    return LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()


@pytest.mark.parametrize("overrides", [
    dict(),                                   # GQA (4 query heads, 2 kv heads), untied head
    dict(n_kv_heads=4),                       # plain multi-head
    dict(n_kv_heads=1, tie_embeddings=True),  # multi-query, tied head
])
def test_logits_and_attention_match_transformers(overrides, tmp_path):
    model = tiny_model(**overrides)
    hf = hf_twin(model, tmp_path)
    tokens = torch.randint(0, model.config.vocab_size, (3, 24))
    with torch.no_grad():
        ours = model(tokens, attn_layers=range(model.config.n_layers))
        theirs = hf(tokens, output_attentions=True)
    assert (ours.logits - theirs.logits).abs().max() <= 1e-4
    for layer, weights in ours.attentions.items():
        assert (weights - theirs.attentions[layer]).abs().max() <= 1e-5


def test_attention_rows_are_causal_distributions(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        weights = model(tokens, attn_layers=[0, 1]).attentions
    for w in weights.values():                               # (B, nh, T, T)
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)
        above = torch.ones(16, 16, dtype=torch.bool).triu(1)
        assert (w[..., above] == 0).all()


def test_fast_path_equals_explicit_path(model):
    q = torch.randn(3, 4, 5, 8)
    k, v = torch.randn(3, 2, 9, 8), torch.randn(3, 2, 9, 8)
    positions = torch.tensor([[4, 5, 6, 7, 8], [0, 1, 2, 3, 4], [2, 3, 4, 5, 6]])
    mask = (torch.arange(9) <= positions.unsqueeze(-1)).unsqueeze(1)
    explicit, _ = explicit_attention(q, k, v, mask)
    assert torch.allclose(fast_attention(q, k, v, mask), explicit, atol=1e-6)
    # causal self-attention without a cache, and the whole model both ways
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    assert torch.allclose(fast_attention(q, k, v, None), explicit_attention(q, k, v, None)[0], atol=1e-6)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, model(tokens, attn_layers=[0, 1]).logits, atol=1e-5)


def cached_decode(model, cache, slot: int, tokens: list[int], *, attn_layers=()):
    """Prefill the first token, then feed the rest one at a time; logits and weights per step."""
    logits, weights = [], []
    for pos, tok in enumerate(tokens):
        out = model(torch.tensor([[tok]]), positions=torch.tensor([[pos]]), cache=cache,
                    slots=torch.tensor([slot]), attn_layers=attn_layers)
        logits.append(out.logits[0, -1])
        weights.append({layer: w[0, :, -1] for layer, w in out.attentions.items()})
    return torch.stack(logits), weights


def test_cached_step_by_step_equals_full_recompute(model):
    tokens = torch.randint(0, model.config.vocab_size, (20,)).tolist()
    cache = model.new_cache(max_batch=3)
    with torch.no_grad():
        full = model(torch.tensor([tokens]), attn_layers=[0, 1])
        stepped, weights = cached_decode(model, cache, slot=2, tokens=tokens, attn_layers=[0, 1])
    assert (stepped - full.logits[0]).abs().max() <= 1e-5
    for pos, per_layer in enumerate(weights):                 # each cached row = the full row
        for layer, row in per_layer.items():
            assert torch.allclose(row, full.attentions[layer][0, :, pos, : pos + 1], atol=1e-6)


def test_prefill_then_decode_equals_recompute(model):
    tokens = torch.randint(0, model.config.vocab_size, (15,)).tolist()
    cache = model.new_cache(max_batch=2)
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0]
        prefill = model(torch.tensor([tokens[:10]]), positions=torch.arange(10)[None], cache=cache,
                        slots=slice(1, 2)).logits[0]
        steps = [model(torch.tensor([[t]]), positions=torch.tensor([[10 + i]]), cache=cache,
                       slots=slice(1, 2)).logits[0, -1] for i, t in enumerate(tokens[10:])]
    assert (prefill - full[:10]).abs().max() <= 1e-5
    assert (torch.stack(steps) - full[10:]).abs().max() <= 1e-5


def test_batched_decode_over_slots_of_different_lengths_equals_alone(model):
    lengths = [3, 11, 7]
    prompts = [torch.randint(0, model.config.vocab_size, (n,)).tolist() for n in lengths]
    nxt = torch.randint(0, model.config.vocab_size, (3,))
    cache = model.new_cache(max_batch=4)
    slots = torch.tensor([3, 0, 2])                           # deliberately out of order
    with torch.no_grad():
        for slot, prompt in zip(slots.tolist(), prompts):
            model(torch.tensor([prompt]), positions=torch.arange(len(prompt))[None], cache=cache,
                  slots=torch.tensor([slot]))
        batched = model(nxt[:, None], positions=torch.tensor(lengths)[:, None], cache=cache,
                        slots=slots, attn_layers=[1])
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt + [int(nxt[row])]]), attn_layers=[1])
            assert (batched.logits[row, -1] - alone.logits[0, -1]).abs().max() <= 1e-5
            n = lengths[row]
            assert torch.allclose(batched.attentions[1][row, :, 0, : n + 1], alone.attentions[1][0, :, -1], atol=1e-6)
            assert (batched.attentions[1][row, :, 0, n + 1:] == 0).all()   # other rows' longer keys masked


def test_contiguous_slot_range_equals_index_tensor(model):
    prompts = torch.randint(0, model.config.vocab_size, (2, 6))
    outs = []
    for slots in (slice(0, 2), torch.tensor([0, 1])):
        cache = model.new_cache(max_batch=2)
        with torch.no_grad():
            model(prompts, positions=torch.arange(6).expand(2, 6), cache=cache, slots=slots)
            outs.append(model(prompts[:, :1], positions=torch.full((2, 1), 6), cache=cache, slots=slots).logits)
    assert torch.equal(outs[0], outs[1])


def test_position_beyond_cache_is_refused(model):
    cache = model.new_cache(max_batch=1, max_context=8)
    with pytest.raises(ValueError, match="max_context=8"):
        model(torch.tensor([[1]]), positions=torch.tensor([[8]]), cache=cache, slots=torch.tensor([0]))


def test_config_round_trips_through_hf_llama_config(tmp_path):
    model = tiny_model(n_kv_heads=1)
    model.config.save(tmp_path)
    hf_config = LlamaConfig.from_pretrained(tmp_path)
    assert (hf_config.num_key_value_heads, hf_config.hidden_size, hf_config.tie_word_embeddings) == (1, 32, False)
    from model.config import ModelConfig
    assert ModelConfig.from_hf_dict(hf_config.to_dict()) == model.config
