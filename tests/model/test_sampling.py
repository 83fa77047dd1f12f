"""Tests for model/sampling.py: each strategy's kept set, the sampled distribution, penalties,
seeding, batching and logprobs. References are computed independently, in plain Python or by hand."""

from __future__ import annotations

import math

import pytest
import torch

from model.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_penalties,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    filter_typical,
    inverse_cdf,
    sample,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROBS = [0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02]  # a fixed distribution over 8 tokens
CHI2_CRIT_DF7 = 24.322  # chi-square critical value, 7 degrees of freedom, alpha = 0.001


def logits_of(probs: list[float], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(probs, device=device).log()


def batch_of(params: list[SamplingParams], device: str = "cpu") -> SamplingBatch:
    return SamplingBatch.from_params(params, device)


def gens(seeds: list[int], device: str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def draws(logits_row: torch.Tensor, sp: SamplingParams, n: int, *, seed: int = 0) -> torch.Tensor:
    """n independent draws: n identical rows, each with its own seeded generator."""
    out = sample(logits_row.expand(n, -1), batch_of([sp] * n, logits_row.device),
                 gens(list(range(seed, seed + n)), logits_row.device))
    return out.token_ids.cpu()


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


def chi2(counts: torch.Tensor, probs: list[float]) -> float:
    n = counts.sum().item()
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts.tolist(), probs))


def normalised(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights]


# -- greedy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_and_consumes_no_randomness(device):
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0)).to(device)
    params = [SamplingParams("greedy", temperature=t) for t in (1.0, 0.1, 3.0, 1.0, 0.5)]
    g = gens([7] * 5, device)
    before = [x.get_state() for x in g]
    out = sample(logits, batch_of(params, device), g)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None
    assert all(torch.equal(x.get_state(), s) for x, s in zip(g, before))


# -- truncation filters -------------------------------------------------------------------------
def test_top_k_keeps_the_k_best_per_row():
    row = torch.randn(30, generator=torch.Generator().manual_seed(1))
    best = row.argsort(descending=True).tolist()
    out = filter_top_k(row.expand(4, -1), torch.tensor([1, 3, 30, 99]))
    assert [kept(r) for r in out] == [set(best[:1]), set(best[:3]), set(range(30)), set(range(30))]
    assert torch.equal(out[0, best[0]], row[best[0]])  # kept logits are untouched


def test_top_k_never_samples_outside_the_k_best():
    row = torch.randn(20, generator=torch.Generator().manual_seed(2)) * 0.3  # a flat-ish row
    best = set(row.argsort(descending=True)[:3].tolist())
    tokens = draws(row, SamplingParams("top_k", k=3, temperature=1.5), 3000)
    assert set(tokens.tolist()) == best


def test_top_p_keeps_exactly_the_smallest_nucleus():
    probs = [0.12, 0.45, 0.05, 0.25, 0.13]  # descending: 1, 3, 4, 0, 2; mass .45 .70 .83 .95 1
    p = torch.tensor([0.3, 0.6, 0.8, 0.9, 0.97, 1.0])
    out = filter_top_p(logits_of(probs).expand(6, -1), p)
    expected = [{1}, {1, 3}, {1, 3, 4}, {1, 3, 4, 0}, set(range(5)), set(range(5))]
    assert [kept(r) for r in out] == expected
    assert set(draws(logits_of(probs), SamplingParams("top_p", p=0.8), 2000).tolist()) == {1, 3, 4}
    # Dyadic probabilities are exact in float: a prefix reaching exactly p is enough.
    out = filter_top_p(logits_of([0.5, 0.25, 0.25])[None], torch.tensor([0.5]))
    assert kept(out[0]) == {0}


def test_top_p_and_typical_at_p_1_keep_everything():
    # A float32 cumsum over many tokens reaches 1 early; p = 1 must still keep all of them.
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(filter_top_p(logits, torch.ones(4)), logits)
    assert torch.equal(filter_typical(logits, torch.ones(4)), logits)


def test_batch_skips_what_no_row_needs():
    assert batch_of([SamplingParams("greedy")] * 3).all_greedy
    no_ops = [SamplingParams("top_p", p=1.0), SamplingParams("min_p", p=0.0),
              SamplingParams("typical", p=1.0), SamplingParams("random")]
    b = batch_of(no_ops)
    assert not (b.filter_rows or b.any_penalty or b.any_temperature or b.all_greedy)
    b = batch_of([SamplingParams("top_k", k=7), SamplingParams("top_k", k=3),
                  SamplingParams("top_p", p=0.5, presence_penalty=0.1)])
    assert b.max_k == 7 and b.filter_rows["top_p"].tolist() == [2] and b.any_penalty
    assert b.filter_rows["top_k"].tolist() == [0, 1] and not b.any_repetition


def test_top_p_keeps_tokens_tied_with_the_last_one():
    # The smallest nucleus for p = 0.5 is {0, one of 1/2/3}; which one would depend on the sort.
    out = filter_top_p(logits_of([0.4, 0.2, 0.2, 0.2, 0.0])[None], torch.tensor([0.5]))
    assert kept(out[0]) == {0, 1, 2, 3}


def test_min_p_threshold_is_exact():
    probs = [0.4, 0.2004, 0.1996, 0.11, 0.0896]  # threshold p · 0.4 straddled by 0.2004 / 0.1996
    out = filter_min_p(logits_of(probs).expand(4, -1), torch.tensor([0.5, 0.25, 0.9, 0.0]))
    assert [kept(r) for r in out] == [{0, 1}, {0, 1, 2, 3}, {0}, set(range(5))]


def test_typical_on_a_hand_computed_example():
    # probs       0.5     0.3     0.15    0.05
    # -ln p       0.6931  1.2040  1.8971  2.9957     entropy H = sum p·(-ln p) = 1.1421
    # |-ln p - H| 0.4490  0.0619  0.7550  1.8536
    # most typical first: token 1 (0.3), 0 (0.5), 2 (0.15), 3 (0.05); mass .3 .8 .95 1
    probs = [0.5, 0.3, 0.15, 0.05]
    out = filter_typical(logits_of(probs).expand(5, -1), torch.tensor([0.2, 0.5, 0.9, 0.99, 1.0]))
    expected = [{1}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    assert [kept(r) for r in out] == expected  # p = 0.2 drops the most likely token
    assert set(draws(logits_of(probs), SamplingParams("typical", p=0.2), 200).tolist()) == {1}


def test_filters_leave_unmasked_rows_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([True, False, True])
    for out in (filter_top_k(logits, torch.tensor([2, 2, 2]), mask),
                filter_top_p(logits, torch.full((3,), 0.5), mask),
                filter_min_p(logits, torch.full((3,), 0.5), mask),
                filter_typical(logits, torch.full((3,), 0.5), mask)):
        assert torch.equal(out[1], logits[1]) and len(kept(out[0])) < 50


def test_filters_match_hf_transformers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    scores = torch.randn(16, 300, generator=torch.Generator().manual_seed(4)) * 2
    ids = torch.randint(0, 300, (16, 40), generator=torch.Generator().manual_seed(5))
    full = torch.ones(16)
    for k in (1, 5, 50):
        assert torch.equal(filter_top_k(scores, full.long() * k),
                           lp.TopKLogitsWarper(k)(ids, scores.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(filter_top_p(scores, full * p), lp.TopPLogitsWarper(p)(ids, scores))
        assert torch.equal(filter_min_p(scores, full * p), lp.MinPLogitsWarper(p)(ids, scores))
        assert torch.equal(filter_typical(scores, full * p),
                           lp.TypicalLogitsWarper(p)(ids, scores))
    seen = torch.zeros(16, 300, dtype=torch.bool).scatter(1, ids, True)
    b = batch_of([SamplingParams(repetition_penalty=1.3)] * 16)
    assert torch.allclose(apply_penalties(scores, b, generated_counts=None, seen=seen),
                          lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))


# -- the sampled distribution -------------------------------------------------------------------
def test_random_sampling_matches_the_distribution():
    tokens = draws(logits_of(PROBS), SamplingParams("random"), 20_000)
    stat = chi2(torch.bincount(tokens, minlength=8), PROBS)
    assert stat < CHI2_CRIT_DF7, stat


@pytest.mark.parametrize("temperature, power", [(0.5, 2.0), (2.0, 0.5)])
def test_temperature_sharpens_or_flattens(temperature, power):
    tokens = draws(logits_of(PROBS), SamplingParams("random", temperature=temperature), 20_000)
    counts = torch.bincount(tokens, minlength=8)
    assert chi2(counts, normalised([q ** power for q in PROBS])) < CHI2_CRIT_DF7  # p^(1/T)
    assert chi2(counts, PROBS) > CHI2_CRIT_DF7  # and clearly not the untempered distribution


def test_inverse_cdf_picks_only_tokens_with_probability():
    probs = torch.tensor([[0.5, 0.5, 0, 0], [0, 1, 0, 0], [0.25, 0.25, 0.25, 0.25]])
    for u, expected in ([0.0, 0.0, 0.0], [0, 1, 0]), ([0.5, 0.5, 0.5], [1, 1, 2]), \
                       ([1 - 2 ** -24] * 3, [1, 1, 3]), ([1.0] * 3, [1, 1, 3]):
        assert inverse_cdf(probs, torch.tensor(u)).tolist() == expected


# -- penalties ----------------------------------------------------------------------------------
def test_penalties_match_reference_formulas():
    logits = torch.tensor([[2.0, -1.5, 0.0, 0.7, -3.0, 1.2]] * 3)
    seen = torch.tensor([[True, True, True, False, True, False]] * 3)
    counts = torch.tensor([[2, 1, 0, 0, 3, 0]] * 3)
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.4,
                             presence_penalty=-0.3),
              SamplingParams("random", frequency_penalty=-1.0, presence_penalty=2.0),
              SamplingParams("top_k", k=2)]  # no penalties: this row must come back as it was
    out = apply_penalties(logits, batch_of(params), generated_counts=counts, seen=seen)
    for row, sp in enumerate(params):
        for v in range(6):
            x, c = logits[row, v].item(), counts[row, v].item()
            if seen[row, v]:
                x = x / sp.repetition_penalty if x > 0 else x * sp.repetition_penalty
            x -= c * sp.frequency_penalty + (1 if c > 0 else 0) * sp.presence_penalty
            assert out[row, v].item() == pytest.approx(x, rel=1e-6), (row, v)
    assert torch.equal(out[2], logits[2])
    assert out[0, 0] < logits[0, 0] and out[0, 1] < logits[0, 1]  # both signs pushed down


def test_penalties_need_their_inputs_and_leave_the_callers_logits_alone():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(6))
    b = batch_of([SamplingParams(repetition_penalty=1.2), SamplingParams(presence_penalty=1.0)])
    with pytest.raises(ValueError, match="seen"):
        sample(logits, b, [None, None], generated_counts=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="generated_counts"):
        sample(logits, b, [None, None], seen=torch.zeros(2, 10, dtype=torch.bool))
    copy = logits.clone()
    sample(logits, b, [None, None], generated_counts=torch.ones(2, 10),
           seen=torch.ones(2, 10, dtype=torch.bool), want_logprobs=True)
    assert torch.equal(logits, copy)


# -- seeding and batching -----------------------------------------------------------------------
OTHERS = [SamplingParams("greedy"), SamplingParams("top_k", k=5, temperature=1.3),
          SamplingParams("min_p", p=0.1), SamplingParams("typical", p=0.8),
          SamplingParams("random", temperature=0.7, repetition_penalty=1.1)]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_alone_and_anywhere_in_a_batch(device):
    steps, V = 12, 64
    target = SamplingParams("top_p", p=0.9, temperature=1.2)
    rng = torch.Generator().manual_seed(8)
    mine = torch.randn(steps, V, generator=rng).to(device)
    g = gens([1234], device)
    alone = [sample(mine[s][None], batch_of([target], device), g).token_ids.item()
             for s in range(steps)]
    assert len(set(alone)) > 3  # the row really is random
    for pos in (0, 2, 5):
        params = OTHERS[:pos] + [target] + OTHERS[pos:]
        g = gens([100 + i if i != pos else 1234 for i in range(len(params))], device)
        b = batch_of(params, device)
        seen = torch.zeros(len(params), V, dtype=torch.bool, device=device)
        for s in range(steps):
            logits = torch.randn(len(params), V, generator=rng).to(device)
            logits[pos] = mine[s]
            assert sample(logits, b, g, seen=seen).token_ids[pos].item() == alone[s], (pos, s)


def test_each_random_row_draws_exactly_one_uniform():
    g, ref = gens([5, 5])
    sample(torch.randn(1, 10), batch_of([SamplingParams("top_p", p=0.5)]), [g])
    torch.rand(1, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_batched_sampling_equals_per_row_sampling():
    V = 200
    params = OTHERS + [SamplingParams("top_p", p=0.7, frequency_penalty=0.5)]
    B = len(params)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(9)) * 3
    counts = torch.randint(0, 3, (B, V), generator=torch.Generator().manual_seed(10))
    seen = counts > 0
    seeds = list(range(50, 50 + B))
    out = sample(logits, batch_of(params), gens(seeds), generated_counts=counts, seen=seen,
                 num_logprobs=5, want_logprobs=True)
    for i in range(B):
        one = sample(logits[i:i + 1], batch_of([params[i]]), gens([seeds[i]]),
                     generated_counts=counts[i:i + 1], seen=seen[i:i + 1], num_logprobs=5)
        assert torch.equal(out.token_ids[i:i + 1], one.token_ids), i
        assert torch.equal(out.logprobs[i:i + 1], one.logprobs), i
        assert torch.equal(out.top_ids[i:i + 1], one.top_ids), i


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_keeps_every_row_in_its_own_set(device):
    rows = {  # strategy -> (params, tokens it may pick from PROBS); sets worked out from PROBS
        "greedy": (SamplingParams("greedy", temperature=0.2), {0}),
        "top_k": (SamplingParams("top_k", k=2, temperature=1.5), {0, 1}),
        "top_p": (SamplingParams("top_p", p=0.6), {0, 1, 2}),  # mass .3 .5 .65
        "min_p": (SamplingParams("min_p", p=0.4), {0, 1, 2}),  # prob >= 0.12
        # H = 1.858 nats; most typical first: 2, 1, 3 = 4 (tied), 0, ...; mass .15 .35 .45 .55
        "typical": (SamplingParams("typical", p=0.4), {1, 2, 3, 4}),
        "random": (SamplingParams("random"), set(range(8))),
    }
    n = 300
    params = [sp for sp, _ in rows.values()] * n
    out = sample(logits_of(PROBS, device).expand(len(params), -1), batch_of(params, device),
                 gens(list(range(len(params))), device), want_logprobs=True)
    picked = out.token_ids.view(n, len(rows)).cpu()
    for j, (name, (_, allowed)) in enumerate(rows.items()):
        got = set(picked[:, j].tolist())
        assert got <= allowed, name
        assert got == allowed or name == "random", name  # and reaches all of it


# -- logprobs -----------------------------------------------------------------------------------
def test_logprobs_come_from_the_drawn_distribution():
    row = torch.randn(10, generator=torch.Generator().manual_seed(11))
    sp = SamplingParams("top_k", k=4, temperature=0.7)
    best = row.argsort(descending=True)[:4]
    scaled = row / 0.7
    ref = torch.full_like(row, -math.inf)
    ref[best] = scaled[best] - scaled[best].logsumexp(0)  # log of the renormalised top-4
    n = 64
    out = sample(row.expand(n, -1), batch_of([sp] * n), gens(list(range(n))), num_logprobs=6)
    assert torch.allclose(out.logprobs, ref[out.token_ids], atol=1e-6)
    assert torch.equal(out.top_ids[:, :4], best.expand(n, -1))
    assert torch.allclose(out.top_logprobs[:, :4], ref[best].expand(n, -1), atol=1e-6)
    assert torch.isneginf(out.top_logprobs[:, 4:]).all()  # alternatives the filter removed
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()  # sorted, descending


def test_greedy_logprobs_are_untempered_and_penalised():
    rows = torch.tensor([[1.0, 3.0, -2.0, 2.5]] * 2)
    seen = torch.tensor([[False, True, False, False]] * 2)
    params = [SamplingParams("greedy", temperature=0.3, repetition_penalty=2.0),
              SamplingParams("random", temperature=2.0)]  # a tempered neighbour
    out = sample(rows, batch_of(params), [None, None], seen=seen, num_logprobs=2)
    penalised = torch.tensor([1.0, 1.5, -2.0, 2.5])  # 3.0 / 2
    assert out.token_ids[0].item() == 3
    assert torch.allclose(out.logprobs[0], penalised.log_softmax(0)[3])
    assert out.top_ids[0].tolist() == [3, 1]
    assert torch.allclose(out.top_logprobs[0], penalised.log_softmax(0)[[3, 1]])
    assert torch.allclose(out.top_logprobs[1], (rows[1] / 2).log_softmax(0)[[1, 3]])


# -- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, limit", [
    ({"strategy": "beam"}, "strategy", "one of"),
    ({"temperature": 0.0}, "temperature", "> 0"),
    ({"temperature": float("nan")}, "temperature", "> 0"),
    ({"strategy": "top_k"}, "k", ">= 1"),
    ({"strategy": "top_k", "k": 0}, "k", ">= 1"),
    ({"strategy": "top_k", "k": 2.0}, "k", "int"),
    ({"strategy": "greedy", "k": 3}, "k", "only used by top_k"),
    ({"strategy": "top_p"}, "p", "(0, 1]"),
    ({"strategy": "top_p", "p": 0.0}, "p", "(0, 1]"),
    ({"strategy": "top_p", "p": 1.1}, "p", "(0, 1]"),
    ({"strategy": "min_p", "p": 1.0}, "p", "[0, 1)"),
    ({"strategy": "min_p", "p": -0.1}, "p", "[0, 1)"),
    ({"strategy": "typical", "p": 0.0}, "p", "(0, 1]"),
    ({"strategy": "random", "p": 0.5}, "p", "only used by"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
    ({"presence_penalty": -3.0}, "presence_penalty", "[-2, 2]"),
])
def test_params_validation_names_the_field_and_limit(kwargs, field, limit):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value).startswith(field + " ") and limit in str(err.value)


def test_params_accept_the_edges_and_sample_checks_its_arguments():
    for kwargs in ({"strategy": "top_k", "k": 1}, {"strategy": "top_p", "p": 1.0},
                   {"strategy": "min_p", "p": 0.0}, {"strategy": "typical", "p": 1.0},
                   {"frequency_penalty": -2.0, "presence_penalty": 2.0}):
        SamplingParams(**kwargs)
    b = batch_of([SamplingParams()] * 2)
    with pytest.raises(ValueError, match="generators"):
        sample(torch.zeros(2, 30), b, [None])
    with pytest.raises(ValueError, match="num_logprobs"):
        sample(torch.zeros(2, 30), b, [None, None], num_logprobs=21)


def test_top_p_that_underflows_in_float32_keeps_the_top_token():
    from model.sampling import filter_top_p
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    kept = filter_top_p(logits, torch.tensor([5e-324], dtype=torch.float32))
    assert torch.isfinite(kept).tolist() == [[False, True, False]]
