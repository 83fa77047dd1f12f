"""bfloat16 and int8 weights: the kernels against dequantised float32 arithmetic, the whole model
against its float32 self (calculator greedy answers, attention probabilities), and the settings'
names and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import native
from model.attention import explicit_attention
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import calculator_split
from model.engine import Engine
from model.eval import greedy_answers
from model.events import AnalysisRequest, AttentionSpec, GenerationRequest, Token
from model.quantization import Int8Weight, KernelChoice, dense_mm, int8_mm, resolve_dtype, resolve_kv_cache_dtype
from tests.conftest import tiny_model

CALCULATOR = Path(__file__).resolve().parents[2] / "checkpoints" / "calculator"


def test_int8_quantisation_is_per_output_channel_and_within_half_a_step():
    w = torch.randn(48, 32) * torch.logspace(-2, 1, 48)[:, None]       # rows of very different scale
    q = Int8Weight.from_dense(w, KernelChoice())
    assert q.weight.dtype == torch.int8 and q.weight.shape == (48, 32) and q.scales.shape == (48,)
    assert (q.weight.abs().amax(dim=1) >= 126).all()                     # each row uses the full range
    step = q.scales.float()[:, None]
    assert ((q.dequantised(torch.float32) - w).abs() <= step * 0.5 + step * 1e-2).all()


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_int8_kernel_equals_dequantised_matmul(rows):
    torch.manual_seed(1)
    w = torch.randn(96, 64) * 0.05                                      # (out, in)
    q = Int8Weight.from_dense(w, KernelChoice(int8_max_rows=8))
    x = torch.randn(rows, 64).bfloat16()
    reference = x.float() @ q.dequantised(torch.float32).t()            # the same numbers in f32
    got = q.mm(x).float()
    # The kernel's only differences: f32 accumulation order and the bf16 rounding of its output.
    assert (got - reference).abs().max() <= 2 ** -8 * reference.abs().max() + 1e-3
    # int8_mm: the int8 kernel up to int8_max_rows, the dense GEMM over dequantised weights above.
    dense = q.dequantised(torch.bfloat16).t()                           # (in, out) as the model holds it
    residual = torch.randn(rows, 96).bfloat16()
    fused = int8_mm(x, dense, q, residual).float()
    assert torch.allclose(fused, got + residual.float(), atol=0.05, rtol=0.02)
    q.choice.int8_max_rows = 0
    assert torch.allclose(int8_mm(x, dense, q).float(), reference, atol=0.05, rtol=0.02)


needs_native = pytest.mark.skipif(not native.available(),
                                  reason=f"hand-written kernels unavailable: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("rows, k, n", [(1, 512, 256), (3, 100, 37), (5, 64, 8), (2, 1376, 70)])
def test_bf16_gemv_is_the_float32_product_rounded_once(rows, k, n):
    torch.manual_seed(2)
    w = torch.randn(n, k).bfloat16().t()                                # (in, out), (out, in) in memory
    x, residual = torch.randn(rows, k).bfloat16(), torch.randn(rows, n).bfloat16()
    assert native.fits(w) and not native.fits(w.contiguous())
    for r in (None, residual):
        exact = x.double() @ w.double() + (0 if r is None else r.double())
        got = native.bf16_gemv(x, w, r)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        # float32 accumulation, one rounding to bf16: within one bf16 step of the exact value
        assert ((got.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-4).all()
    # a row's result does not depend on the other rows (batch invariance), ragged K and N included
    assert torch.equal(native.bf16_gemv(x[:1], w), native.bf16_gemv(x, w)[:1])


@needs_native
def test_decode_attention_kernel_is_the_explicit_path_on_a_cache_view():
    """Ragged rows (each attends to its own length), grouped-query heads, k/v as the engine passes
    them: views into a cache with more slots and positions than the step uses."""
    torch.manual_seed(3)
    B, nh, nkv, hs, S = 5, 8, 2, 64, 40
    cache = torch.randn(B + 2, 2, nkv, 64, hs).bfloat16()                # (slots, k|v, nkv, max_context, hs)
    k, v = cache[1: B + 1, :, :, :S].unbind(1)
    q = torch.randn(B, 1, nh + 2 * nkv, hs).bfloat16()[:, :, :nh].transpose(1, 2)   # (B, nh, 1, hs) view
    lengths = torch.tensor([40, 3, 17, 40, 1])
    assert native.decode_attention_fits(q, k, v)
    got = native.bf16_decode_attention(q, k, v, lengths)
    mask = (torch.arange(S)[None] < lengths[:, None])[:, None, None, :]
    reference, _ = explicit_attention(q, k, v, mask)
    assert got.shape == reference.shape == (B, nh, 1, hs) and got.dtype == torch.bfloat16
    assert (got.float() - reference.float()).abs().max() <= 2 ** -7 * reference.abs().max()
    assert not native.decode_attention_fits(q.float(), k.float(), v.float())


@needs_native
def test_the_bf16_kernel_is_used_up_to_its_measured_rows_and_named():
    model, tokenizer = load_checkpoint(CALCULATOR, dtype="bfloat16", gemv_max_rows=4)
    library, _ = load_checkpoint(CALCULATOR, dtype="bfloat16", gemv_max_rows=0)
    choice = model.kernel_choice
    assert model.layers[0].mlp.kernels is choice and model.layers[0].self_attn.kernels is choice
    x = torch.randn(3, model.config.dim).bfloat16()
    w = model.layers[0].mlp.w_gate_up
    assert torch.equal(dense_mm(x, w, choice), native.bf16_gemv(x, w))   # 3 rows <= 4: the kernel
    choice_off = library.kernel_choice
    assert torch.equal(dense_mm(x, w, choice_off), x @ w)               # 0: the library GEMM
    info = Engine(model, tokenizer, max_batch=1).weights_info
    assert info["kernels"]["rows <= 4"].startswith("bf16 matrix-vector") and "rows > 4" in info["kernels"]
    assert info["decode_attention"].startswith("hand-written")
    # the whole model: the same greedy answers either way, on held-out calculator problems
    prompts = [p.prompt for p in calculator_split()[2][:60]]
    assert greedy_answers(model, tokenizer, prompts, batch_size=4) == greedy_answers(library, tokenizer, prompts)
    measured, _ = load_checkpoint(CALCULATOR, dtype="bfloat16")
    assert set(measured.kernel_choice.measured["gemv"]) >= {1}                # measured at load
    # one token analysed: no position predicts another, so no row goes through the head
    analyzed = Engine(model, tokenizer, max_batch=1).analyze(AnalysisRequest(ids=[0], logprobs=1))
    assert analyzed.logprobs == [None]


def test_without_the_bf16_kernel_the_library_gemm_runs_and_says_why(monkeypatch):
    import model.quantization as quantization
    monkeypatch.setattr(quantization.native, "available", lambda: False)
    monkeypatch.setattr(quantization.native, "unavailable_reason", lambda: "no C compiler (cc) on PATH")
    model, tokenizer = load_checkpoint(CALCULATOR, dtype="bfloat16")
    assert model.kernel_choice.gemv_max_rows == 0
    info = Engine(model, tokenizer, max_batch=1).weights_info
    assert info["kernels"] == {"all rows": "bfloat16 GEMM, weights (out, in)"}
    assert info["native_unavailable"] == "no C compiler (cc) on PATH"
    assert info["decode_attention"] == "PyTorch SDPA" and not model.kernel_choice.native_attention
    ids = [e.id for e in Engine(model, tokenizer, max_batch=1).generate(
        GenerationRequest(prompt_ids=tokenizer.encode("two plus three equals"), max_tokens=4)) if isinstance(e, Token)]
    assert tokenizer.decode(ids) == " five"


def test_a_tiny_int8_model_is_its_dequantised_self(tmp_path):
    save_checkpoint(tiny_model(), None, tmp_path)
    (tmp_path / "tokenizer.json").write_text(
        (CALCULATOR / "tokenizer.json").read_text())                    # any tokenizer will do
    m8, _ = load_checkpoint(tmp_path, dtype="float32", quantization="int8", int8_max_rows=64)
    dense, _ = load_checkpoint(tmp_path, dtype="float32", quantization="int8", int8_max_rows=0)
    tokens = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        a, b = m8(tokens).logits, dense(tokens).logits
    # int8 kernel with bf16 activations vs f32 GEMM over the same dequantised weights
    assert a.dtype == torch.float32 and (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.fixture(scope="module")
def held_out_prompts() -> tuple[list[str], list[str]]:
    problems = calculator_split()[2]
    return [p.prompt for p in problems], [p.completion for p in problems]


@pytest.fixture(scope="module")
def f32_answers(held_out_prompts):
    model, tokenizer = load_checkpoint(CALCULATOR)
    return greedy_answers(model, tokenizer, held_out_prompts[0])


@pytest.mark.parametrize("setting", [
    dict(dtype="bfloat16"),
    dict(dtype="bfloat16", quantization="int8", int8_max_rows=256),     # every row on the int8 kernel
    dict(dtype="bfloat16", quantization="int8", int8_max_rows=0),       # every row dense (dequantised)
    dict(dtype="float32", quantization="int8", int8_max_rows=256),
])
def test_calculator_greedy_answers_equal_float32s(setting, held_out_prompts, f32_answers):
    """Every held-out problem (1,368): the same greedy answer as float32, right or wrong."""
    model, tokenizer = load_checkpoint(CALCULATOR, **setting)
    answers = greedy_answers(model, tokenizer, held_out_prompts[0])
    differ = [(p, a, b) for p, a, b in zip(held_out_prompts[0], answers, f32_answers) if a != b]
    assert not differ, f"{len(differ)} answers differ from float32's, e.g. {differ[:3]}"


@pytest.mark.parametrize("setting, tolerance", [
    # bf16 rounding of activations and the KV cache alone: measured ≤ 0.0100 on a Xeon (AMX) and
    # 0.0104 on an AMD EPYC (Zen 4), with the library GEMM and the hand-written kernel alike.
    (dict(dtype="bfloat16"), 1.5e-2),
    # int8 changes the weights themselves (by up to half a quantisation step each): the
    # probabilities move more than bf16 rounding alone moves them; measured 0.023 at most.
    (dict(dtype="bfloat16", quantization="int8"), 5e-2),
])
def test_engine_tokens_and_attention_match_float32(setting, tolerance):
    """Streamed through the engine (4 rows decoding together): the same greedy tokens as float32,
    and attention rows that are float32 distributions within `tolerance` of float32's."""
    f32, tokenizer = load_checkpoint(CALCULATOR)
    other, _ = load_checkpoint(CALCULATOR, **setting)
    prompts = ["two plus three equals", "forty two minus seven equals", "ninety nine plus one equals",
               "six times seven equals"]
    spec = AttentionSpec(layers="all", heads="all", include_prompt=True)

    def run(model):
        engine = Engine(model, tokenizer, max_batch=4)
        handles = [engine.submit(GenerationRequest(prompt_ids=tokenizer.encode(p), max_tokens=6, attention=spec))
                   for p in prompts]
        while engine.has_work():
            engine.step()
        return [[e for e in h.events if isinstance(e, Token)] for h in handles]

    for ours, theirs in zip(run(other), run(f32)):
        assert [t.id for t in ours] == [t.id for t in theirs]
        for a, b in zip(ours, theirs):
            assert a.attention.dtype == torch.float32
            assert torch.allclose(a.attention.sum(-1), torch.ones(a.attention.shape[:-1]), atol=1e-5)
            assert (a.attention - b.attention).abs().max() <= tolerance


def test_kv_cache_dtype_follows_the_compute_dtype_unless_set():
    model, tokenizer = load_checkpoint(CALCULATOR, dtype="bfloat16")
    assert Engine(model, tokenizer, max_batch=1).cache.kv.dtype == torch.bfloat16
    engine = Engine(model, tokenizer, max_batch=1, kv_cache_dtype="float32")
    assert engine.cache.kv.dtype == torch.float32
    assert engine.weights_info["kv_cache_dtype"] == "float32"
    ids = [e.id for e in engine.generate(GenerationRequest(prompt_ids=tokenizer.encode("two plus three equals"),
                                                            max_tokens=4)) if isinstance(e, Token)]
    assert tokenizer.decode(ids) == " five"
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        resolve_kv_cache_dtype("fp8", torch.float32)


def test_weights_info_names_the_kernels():
    model, tokenizer = load_checkpoint(CALCULATOR, dtype="bfloat16", quantization="int8")
    info = Engine(model, tokenizer, max_batch=1).weights_info
    assert info["dtype"] == "bfloat16" and info["quantization"] == "int8" and info["kv_cache_dtype"] == "bfloat16"
    rows = model.kernel_choice.int8_max_rows
    if rows:                                          # 0 where a dense path beat it even at one row
        assert info["kernels"][f"rows <= {rows}"].startswith("int8")
    else:
        assert not any(name.startswith("int8") for name in info["kernels"].values())
    assert set(info["measured_ms"]["int8"]) >= {"1"}                    # measured at load
    assert json.loads(json.dumps(info)) == info                         # ready for /v1/models
    f32_info = Engine(load_checkpoint(CALCULATOR)[0], tokenizer, max_batch=1).weights_info
    # a step of one row reads int8 bytes where the int8 kernel runs it, else the dense bf16 copy
    assert f32_info["weight_bytes_per_token"] > (3.5 if rows else 1.9) * info["weight_bytes_per_token"]


def test_settings_are_named_as_in_vllm_and_refusals_name_the_field(monkeypatch):
    assert resolve_dtype("float32", device="cpu") == torch.float32
    assert resolve_dtype(torch.bfloat16, device="cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("float16", device="cpu")
    with pytest.raises(ValueError, match="quantization must be one of"):
        load_checkpoint(CALCULATOR, quantization="fp8")
    import model.quantization as quantization
    monkeypatch.setattr(quantization, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", device="cpu") == torch.float32           # no bf16 instructions: f32
    with pytest.warns(RuntimeWarning, match="without bf16 instructions"):
        assert resolve_dtype("bfloat16", device="cpu") == torch.bfloat16


def test_int8_off_the_cpu_is_refused_with_the_alternative():
    from model.quantization import apply_weights
    model = tiny_model().to("meta")
    with pytest.raises(ValueError, match=r"CPU only.*dtype='bfloat16'"):
        apply_weights(model, dtype=torch.bfloat16, quantization="int8")
