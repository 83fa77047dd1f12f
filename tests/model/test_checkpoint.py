"""Checkpoint directories: ours → ours, ours → transformers, transformers → ours; no pickle."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.tokenizer import Tokenizer
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(["two plus three equals five", "naïve café 日本語 🙂"] * 20, vocab_size=300)


def test_save_load_round_trip(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    save_checkpoint(model, tokenizer, tmp_path)
    loaded, loaded_tok = load_checkpoint(tmp_path)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    assert loaded.config == model.config
    text = "two plus three equals naïve 🙂"
    assert loaded_tok.encode(text) == tokenizer.encode(text)


def test_tied_head_is_saved_once_and_reloads_tied(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size, tie_embeddings=True)
    save_checkpoint(model, tokenizer, tmp_path)
    loaded, _ = load_checkpoint(tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_transformers_save_pretrained_directory_loads(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token="<|bos|>",
                            eos_token="<|eos|>").save_pretrained(tmp_path)
    ours, ours_tok = load_checkpoint(tmp_path)
    tokens = torch.randint(0, tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(tokens).logits - hf(tokens).logits).abs().max() <= 1e-4
    assert ours_tok.eos_id == tokenizer.eos_id and ours_tok.bos_id == tokenizer.bos_id


def test_our_directory_opens_in_transformers_with_its_tokenizer(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    save_checkpoint(model, tokenizer, tmp_path)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert hf_tok.decode(tokenizer.encode("café 🙂"), skip_special_tokens=True) == "café 🙂"
    hf = LlamaForCausalLM.from_pretrained(tmp_path)
    tokens = torch.tensor([tokenizer.encode("two plus three")])
    with torch.no_grad():
        assert (model(tokens).logits - hf(tokens).logits).abs().max() <= 1e-4


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    save_checkpoint(model, tokenizer, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    # A file that would run code if anything unpickled it.
    (tmp_path / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    with pytest.raises(CheckpointError, match="only from safetensors"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_shape_mismatch_names_the_tensor(tmp_path, tokenizer):
    save_checkpoint(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"intermediate_size": 48', '"intermediate_size": 40')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.\w+_proj\.weight: shape"):
        load_checkpoint(tmp_path)


def test_missing_directory_parts_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
