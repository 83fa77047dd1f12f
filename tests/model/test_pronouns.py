"""The pronoun corpus (templates, held-out rule, vocabulary), the attention probe's arithmetic
against transformers' attentions, a tiny training run, and the shipped checkpoint's card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.eval import evaluate, greedy_answers
from model.probe import attention_probe, token_positions
from model.pronouns import (
    PREPOSITIONS,
    QUESTION,
    TEMPLATES,
    PronounProblem,
    all_problems,
    examples,
    is_held_out,
    pronoun_split,
)
from model.tokenizer import Tokenizer
from model.train import TrainArgs, train
from model.transformer import Transformer

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "pronouns"


@pytest.fixture(scope="module")
def split():
    return pronoun_split()


@pytest.fixture(scope="module")
def tokenizer(split) -> Tokenizer:
    return Tokenizer.train_bpe((p.text for p in split[0]), vocab_size=1024)


def test_the_prompt_has_the_issue_s_shape():
    trophy = PronounProblem(0, TEMPLATES[0].first_nouns.index("trophy"),
                            TEMPLATES[0].second_nouns.index("suitcase"), refers_to_first=True)
    assert trophy.prompt == "the trophy did not fit in the suitcase because it was too big . it refers to the"
    assert trophy.completion == " trophy"
    small = PronounProblem(trophy.template, trophy.first, trophy.second, refers_to_first=False)
    assert small.prompt.endswith("because it was too small . it refers to the") and small.completion == " suitcase"


def test_templates_have_both_answers_and_enough_nouns():
    assert len(TEMPLATES) >= 4
    problems = all_problems()
    for t, spec in enumerate(TEMPLATES):
        assert len(spec.first_nouns) >= 20 and len(spec.second_nouns) >= 20, spec.name
        for nouns in (spec.first_nouns, spec.second_nouns):
            assert len(set(nouns)) == len(nouns) and all(n.isalpha() and n.islower() for n in nouns)
        if not spec.same_role:
            assert not set(spec.first_nouns) & set(spec.second_nouns), spec.name   # one reading per noun
        mine = [p for p in problems if p.template == t]
        answers = {p.refers_to_first for p in mine}
        assert answers == {True, False}, spec.name
        # the referent is decided by the adjective, in both orders of the two nouns
        for p in mine:
            assert p.adjective == spec.adjectives[0 if p.refers_to_first else 1]
            assert p.referent == (p.first_noun if p.refers_to_first else p.second_noun)
            assert p.prompt.endswith(f"because it was too {p.adjective}{QUESTION}")
    # both orders: every two-role family also appears with its roles swapped
    roles = {(spec.first_nouns, spec.second_nouns) for spec in TEMPLATES}
    assert all((b, a) in roles for a, b in roles)


def test_no_single_word_decides_which_position_is_meant():
    """Each template has a twin with the same nouns and adjectives in which every adjective points
    at the other position: the verb and the adjective decide together."""
    for spec in TEMPLATES:
        twins = [other for other in TEMPLATES if other is not spec and set(other.adjectives) == set(spec.adjectives)
                 and {other.first_nouns, other.second_nouns} == {spec.first_nouns, spec.second_nouns}]
        assert twins and all(other.adjectives == spec.adjectives[::-1] for other in twins), spec.name


def test_every_sentence_comes_in_four_shapes_with_phrases_from_its_pool():
    problems = all_problems()
    by_sentence: dict[tuple, list[PronounProblem]] = {}
    for p in problems:
        by_sentence.setdefault((p.template, p.first, p.second, p.refers_to_first), []).append(p)
    assert all(len(shapes) == 4 for shapes in by_sentence.values())
    for shapes in list(by_sentence.values())[::97]:
        assert [(bool(p.first_phrase), bool(p.second_phrase)) for p in shapes] == \
            [(False, False), (True, False), (False, True), (True, True)]
        for p in shapes:
            for phrase, pool in ((p.first_phrase, p.spec.first_nouns), (p.second_phrase, p.spec.second_nouns)):
                if phrase:
                    *preposition, the, noun = phrase.split()
                    assert " ".join(preposition) in PREPOSITIONS and the == "the"
                    assert noun in pool and noun not in (p.first_noun, p.second_noun)   # never a candidate
    assert len({p.prompt for p in problems}) == len(problems)
    assert all_problems() == problems                                  # the same corpus every time


def test_held_out_rule_is_respected_by_the_split(split):
    train, val, held_out = split
    assert len(train) + len(val) + len(held_out) == len(all_problems())
    assert all(is_held_out(p.template, p.first, p.second) for p in held_out)
    assert not any(is_held_out(p.template, p.first, p.second) for p in train + val)
    assert not {p.text for p in held_out} & {p.text for p in train}
    assert not {p.prompt for p in held_out} & {p.prompt for p in train}
    # a held-out combination is held out with both of its answers, in every shape
    combos = {(p.template, p.first, p.second) for p in held_out}
    assert len(held_out) == 2 * 4 * len(combos)
    assert 0.05 < len(held_out) / len(all_problems()) < 0.15


def test_every_noun_appears_in_training_in_its_slot(split):
    train = split[0]
    for t, spec in enumerate(TEMPLATES):
        mine = [p for p in train if p.template == t]
        assert {p.first for p in mine} == set(range(len(spec.first_nouns))), spec.name
        assert {p.second for p in mine} == set(range(len(spec.second_nouns))), spec.name
        # and as the answer: each noun is the referent of some training sentence
        assert {p.referent for p in mine} == set(spec.first_nouns) | set(spec.second_nouns), spec.name


def test_vocabulary_every_word_is_one_token(tokenizer):
    words = {w for spec in TEMPLATES for w in (*spec.first_nouns, *spec.second_nouns, *spec.adjectives)}
    words |= {w for preposition in PREPOSITIONS for w in preposition.split()}
    for word in words:
        assert len(tokenizer.encode(" " + word, add_bos=False)) == 1, word
    assert tokenizer.vocab_size < 1024        # the BPE stopped early: the corpus needs fewer


def test_spans_and_token_positions_point_at_the_words(split, tokenizer):
    for p in split[2][:50] + split[0][:50] + [p for p in split[2] if p.first_phrase and p.second_phrase][:50]:
        spans = p.spans()
        assert p.prompt[slice(*spans["referent"])] == p.referent
        assert p.prompt[slice(*spans["distractor"])] == p.distractor
        assert p.prompt[slice(*spans["it"])] == "it"
        ids, where = token_positions(tokenizer, p)
        assert ids == tokenizer.encode(p.prompt)
        assert [tokenizer.token_text(ids[k]) for k in where["referent"]] == [" " + p.referent]
        assert [tokenizer.token_text(ids[k]) for k in where["distractor"]] == [" " + p.distractor]
        assert [tokenizer.token_text(ids[k]) for k in where["it"]] == [" it"]
        assert ids[-1] == tokenizer.encode(" the", add_bos=False)[0]


def test_examples_are_the_classic_pair_then_held_out_sentences():
    ex = examples()
    assert ex[0] == {"prompt": "the trophy did not fit in the suitcase because it was too big . it refers to the",
                     "completion": " trophy"}
    by_prompt = {p.prompt: p for p in all_problems()}
    assert all(by_prompt[e["prompt"]].completion == e["completion"] for e in ex)
    assert all(is_held_out(p.template, p.first, p.second) for p in (by_prompt[e["prompt"]] for e in ex[2:]))
    assert any(" near the " in e["prompt"] or " behind the " in e["prompt"] for e in ex)   # phrases shown too


def test_probe_arithmetic_matches_transformers_attentions(split, tokenizer, tmp_path):
    """The probe's means, recomputed by hand from HF LlamaForCausalLM's eager attentions."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         intermediate_size=48, max_context=64)
    model = Transformer(config)
    model.init_weights(seed=1, std=0.3)       # peaked, position-sensitive attention
    model.eval()
    problems = split[2][:6] + split[0][:5]    # different token lengths: several batches
    probe = attention_probe(model, tokenizer, problems, batch_size=4)
    save_checkpoint(model, None, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expect = torch.zeros(config.n_layers, config.n_heads, 4, dtype=torch.float64)
    for p in problems:
        ids = tokenizer.encode(p.prompt)
        texts = [tokenizer.token_text(i) for i in ids]
        ref, dist, it = texts.index(" " + p.referent), texts.index(" " + p.distractor), texts.index(" it")
        with torch.no_grad():
            att = hf(torch.tensor([ids]), output_attentions=True).attentions
        for layer in range(config.n_layers):
            a = att[layer][0].double()                                   # (nh, T, T)
            expect[layer, :, 0] += a[:, -1, ref]
            expect[layer, :, 1] += a[:, -1, dist]
            expect[layer, :, 2] += a[:, it, ref]
            expect[layer, :, 3] += a[:, it, dist]
    expect /= len(problems)
    got = torch.tensor([[[h["answer_referent"], h["answer_distractor"], h["it_referent"], h["it_distractor"]]
                         for h in heads] for heads in probe["layers"]], dtype=torch.float64)
    assert probe["prompts"] == len(problems)
    assert (got - expect).abs().max() <= 1e-4
    assert expect[..., 0].std() > 0.01        # heads differ: the comparison is not between constants
    best = int(expect[..., 0].argmax())
    assert (probe["best_head"]["layer"], probe["best_head"]["head"]) == divmod(best, config.n_heads)


def test_tiny_training_run_on_pronouns_writes_card_with_accuracy_probe_and_examples(tmp_path):
    metrics = train(TrainArgs(corpus="pronouns", out=str(tmp_path / "p"), steps=60, batch_size=32, eval_every=30,
                              warmup_steps=5, progress=False, seed=2))
    card = json.loads((tmp_path / "p" / "model_card.json").read_text())
    assert card["corpus"] == "pronouns" and card["training"]["vocab_size"] == 1024   # the corpus default
    # the loss counts the answers only (the corpus default): ln(vocab≈600) ≈ 6.4 at random init; 60
    # steps reach ~5.3, on the way to the ~96 nouns' ln 96 ≈ 4.6
    assert card["training"]["loss"] == "completion" and metrics["final_val_loss"] < 5.8 < 6.4
    assert card["metrics"]["held_out_exact_match"] == metrics["held_out_exact_match"]
    probe = card["metrics"]["attention_probe"]
    assert probe["prompts"] == card["corpus_facts"]["held_out_problems"] == len(pronoun_split()[2])
    assert len(probe["layers"]) == card["config"]["n_layers"] and len(probe["layers"][0]) == card["config"]["n_heads"]
    assert card["examples"] == examples()
    assert card["command"] == f"python -m model.train --corpus pronouns --out {tmp_path / 'p'} --steps 60 " \
                              "--batch-size 32 --warmup-steps 5 --eval-every 30 --seed 2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "model_card.md"):
        assert (tmp_path / "p" / name).is_file()
    assert "## Attention probe" in (tmp_path / "p" / "model_card.md").read_text()


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="checkpoints/pronouns is not shipped in this tree")
def test_shipped_checkpoint_meets_the_targets_and_its_card_records_them():
    card = json.loads((SHIPPED / "model_card.json").read_text())
    names = sorted(p.name for p in SHIPPED.iterdir())
    calculator = sorted(p.name for p in (SHIPPED.parent / "calculator").iterdir())
    assert names == calculator                                     # the server loads both the same way
    assert sum((SHIPPED / n).stat().st_size for n in names) <= 10 * 2 ** 20
    assert card["wall_time_seconds"] <= 15 * 60
    m = card["metrics"]
    assert m["held_out_exact_match"] >= 0.995
    best = m["attention_probe"]["best_head"]
    assert best["referent"] >= 5 * best["distractor"]
    # the card's numbers are what evaluation computes now
    model, tokenizer = load_checkpoint(SHIPPED)
    metrics, _ = evaluate(model, tokenizer, "pronouns")
    assert metrics["held_out_wrong"] == m["held_out_wrong"]
    now = metrics["attention_probe"]["best_head"]
    assert (now["layer"], now["head"]) == (best["layer"], best["head"])
    assert (now["referent"], now["distractor"]) == pytest.approx((best["referent"], best["distractor"]), abs=1e-3)
    assert greedy_answers(model, tokenizer, [e["prompt"] for e in card["examples"]]) == \
        [e["completion"] for e in card["examples"]]


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="checkpoints/pronouns is not shipped in this tree")
def test_shipped_best_head_puts_half_its_attention_on_the_referent():
    """Issue 16's target, from a head past layer 0 (a layer-0 head cannot pass 0.5: see README)."""
    best = json.loads((SHIPPED / "model_card.json").read_text())["metrics"]["attention_probe"]["best_head"]
    assert best["referent"] >= 0.5 and best["referent"] >= 5 * best["distractor"] and best["layer"] >= 1


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="checkpoints/pronouns is not shipped in this tree")
def test_shipped_checkpoint_opens_in_transformers_with_the_same_logits():
    model, tokenizer = load_checkpoint(SHIPPED)
    hf = LlamaForCausalLM.from_pretrained(SHIPPED).eval()
    ids = torch.tensor([tokenizer.encode(examples()[0]["prompt"])])
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert tokenizer.token_text(int(theirs[0, -1].argmax())) == " trophy"
