"""The fused decode step (model/decode_step.py, model/native/decode.c) against the Python path it
replaces: the same logits, attention, layer outputs and KV cache, step after step; used where it
was measured faster, named in weights_info, and absent where the native kernels are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import native
from model.checkpoint import load_checkpoint
from model.engine import Engine
from model.events import GenerationRequest, Token

CALCULATOR = Path(__file__).resolve().parents[2] / "checkpoints" / "calculator"

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("setting, rows", [(dict(dtype="float32"), 3), (dict(dtype="float32"), 37),
                                           (dict(dtype="bfloat16"), 3), (dict(dtype="bfloat16"), 37),
                                           (dict(dtype="bfloat16", quantization="int8", int8_max_rows=64), 3),
                                           (dict(dtype="bfloat16", quantization="int8", int8_max_rows=64), 37)])
def test_the_fused_step_is_the_python_path(setting, rows):
    """Rows in scattered slots at different positions (37: more than two AMX tiles of rows, where
    the CPU has them), every layer's attention, output and lens asked for: twelve steps, fused and
    not, each on its own cache filled by the same prefills."""
    model, _ = load_checkpoint(CALCULATOR, fused_max_rows=64, **setting)
    fused = model.fused_decode
    assert fused is not None
    c = model.config
    slots = torch.randperm(rows + 1, generator=torch.Generator().manual_seed(0))[:rows]   # one slot unused
    lengths = [5 + (7 * i) % 11 for i in range(rows)]
    caches = [model.new_cache(rows + 1, 64), model.new_cache(rows + 1, 64)]
    layers = range(c.n_layers)
    with torch.inference_mode():
        for cache in caches:
            for row, n in enumerate(lengths):
                ids = torch.randint(3, c.vocab_size, (1, n), generator=torch.Generator().manual_seed(row))
                model(ids, positions=torch.arange(n)[None], cache=cache, slots=slots[row: row + 1])
        tokens, positions = torch.arange(7, 7 + rows)[:, None], torch.tensor([[n] for n in lengths])
        for _ in range(12):
            caches[0].kv.copy_(caches[1].kv)        # each step from the same state: no drift between the two
            model.fused_decode = fused
            ours = model(tokens, positions=positions, cache=caches[0], slots=slots, attn_layers=layers,
                         hidden_layers=layers, lens_logits=True)
            model.fused_decode = None
            theirs = model(tokens, positions=positions, cache=caches[1], slots=slots, attn_layers=layers,
                           hidden_layers=layers)
            scale = theirs.logits.abs().max()
            assert ours.logits.dtype == torch.float32 and ours.logits.shape == theirs.logits.shape
            # bf16 results: a last-bit difference here and there (sums taken in another order).
            # Measured: 3 rows (the Python path on the same kernels) logits within 0.002 of their
            # scale, attention within 1e-6; 37 rows (it on the library GEMM) 0.003 and 0.009 (one
            # bf16 step in a q or k element moves a score by ~0.4%).
            assert (ours.logits - theirs.logits).abs().max() <= 0.01 * scale
            assert torch.equal(ours.logits.argmax(-1), theirs.logits.argmax(-1))
            for i in layers:
                assert ours.attentions[i].shape == theirs.attentions[i].shape          # (B, nh, 1, S)
                assert (ours.attentions[i] - theirs.attentions[i]).abs().max() <= 2e-2
                assert torch.allclose(ours.attentions[i].sum(-1), torch.ones(rows, c.n_heads, 1), atol=1e-5)
                assert (ours.hidden[i].float() - theirs.hidden[i].float()).abs().max() <= \
                    0.02 * theirs.hidden[i].float().abs().max()
                lens = model.logit_lens(ours.hidden[i])               # the lens of the same residuals
                assert (ours.lens_logits[i] - lens).abs().max() <= 0.01 * lens.abs().max()
            tokens, positions = theirs.logits.argmax(-1), positions + 1
    a, b = (cache.kv.float() for cache in caches)
    unused = sorted(set(range(rows + 1)) - set(slots.tolist()))
    assert (a - b).abs().max() <= 0.02 * b.abs().max() and not a[:, unused].any()   # never written


@needs_native
def test_the_fused_step_runs_the_engine_and_is_named(monkeypatch):
    model, tokenizer = load_checkpoint(CALCULATOR, dtype="bfloat16")
    rows = model.kernel_choice.fused_max_rows
    assert model.fused_decode is not None and rows >= 1                # measured faster at one row at least
    info = Engine(model, tokenizer, max_batch=1).weights_info
    assert info["decode_step"].startswith(f"rows <= {rows}: one native call")
    assert set(info["measured_ms"]["decode_step"]) >= {"1"}
    calls = []
    step = native.decode_step
    monkeypatch.setattr(native, "decode_step", lambda *a: calls.append(1) or step(*a))
    ids = [e.id for e in Engine(model, tokenizer, max_batch=1).generate(
        GenerationRequest(prompt_ids=tokenizer.encode("two plus three equals"), max_tokens=4)) if isinstance(e, Token)]
    assert tokenizer.decode(ids) == " five" and len(calls) >= 1


def test_without_native_kernels_or_rows_the_python_path_runs(monkeypatch):
    off, tokenizer = load_checkpoint(CALCULATOR, dtype="bfloat16", fused_max_rows=0)
    assert off.fused_decode is None
    assert Engine(off, tokenizer, max_batch=1).weights_info["decode_step"] == "the layers in PyTorch"
    import model.quantization as quantization
    monkeypatch.setattr(quantization.native, "available", lambda: False)
    monkeypatch.setattr(native, "available", lambda: False)
    unavailable, _ = load_checkpoint(CALCULATOR, dtype="bfloat16")
    assert unavailable.fused_decode is None
    f32, _ = load_checkpoint(CALCULATOR)
    assert f32.fused_decode is None                                     # float32: always the Python path
