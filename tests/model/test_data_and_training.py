"""The calculator corpus, its held-out rule, and a tiny training run."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.data import all_problems, calculator_examples, calculator_split, is_held_out, number_words, pad_batch
from model.eval import greedy_answers
from model.pronouns import pronoun_split
from model.tokenizer import Tokenizer
from model.train import CORPORA, CORPUS_DEFAULTS, TrainArgs, completion_start, lr_at, parse_args, train


def test_number_words():
    assert [number_words(n) for n in (0, 7, 17, 20, 42, 99, 100, 119, 198)] == [
        "zero", "seven", "seventeen", "twenty", "forty two", "ninety nine", "one hundred",
        "one hundred nineteen", "one hundred ninety eight"]


def test_problem_set_matches_the_spec():
    problems = all_problems()
    assert len(problems) == 100 * 100 + 100 * 101 // 2          # every plus; minus only when a ≥ b
    assert all(p.answer >= 0 for p in problems)
    assert max(p.answer for p in problems) == 198
    assert problems[0].text == "zero plus zero equals zero"
    assert any(p.text == "forty two minus seven equals thirty five" for p in problems)


def test_held_out_rule_is_respected_by_the_split():
    train, val, held_out = calculator_split()
    assert len(held_out) == 1368
    assert all(is_held_out(p.a, p.b) for p in held_out)
    assert not any(is_held_out(p.a, p.b) for p in train + val)
    assert not {p.text for p in held_out} & {p.text for p in train}
    assert len(train) + len(val) + len(held_out) == len(all_problems())


def test_lr_schedule_warms_up_then_decays():
    args = TrainArgs(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, args) == 0.1 and lr_at(9, args) == 1.0
    assert abs(lr_at(99, args) - 0.1) < 1e-3
    assert all(lr_at(s, args) >= lr_at(s + 1, args) for s in range(10, 99))


def test_tiny_training_run_lowers_the_loss_and_writes_a_checkpoint(tmp_path):
    args = TrainArgs(out=str(tmp_path / "ck"), steps=40, batch_size=32, eval_every=20,
                     warmup_steps=5, progress=False, seed=3, eval_held_out=False)
    metrics = train(args)
    card = json.loads((tmp_path / "ck" / "model_card.json").read_text())
    first_losses = card["metrics"]
    assert metrics["final_val_loss"] < 3.0 < 5.5     # ln(vocab≈280) ≈ 5.6 at random init
    assert first_losses["final_train_loss"] == metrics["final_train_loss"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "model_card.md"):
        assert (tmp_path / "ck" / name).is_file()
    assert card["corpus_facts"]["held_out_problems"] == 1368


def test_training_is_deterministic_given_a_seed(tmp_path):
    runs = [train(TrainArgs(out=str(tmp_path / f"r{i}"), steps=6, batch_size=16, eval_every=3,
                            warmup_steps=2, progress=False, seed=5, eval_held_out=False)) for i in range(2)]
    assert runs[0]["final_train_loss"] == runs[1]["final_train_loss"]


def test_text_corpus_trains_a_bpe_tokenizer(tmp_path):
    text = "Ünïcödé lines, with 日本語 and emoji 🙂.\n" * 200
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    metrics = train(TrainArgs(corpus="text", text_file=str(path), out=str(tmp_path / "t"), preset="calculator",
                              vocab_size=300, steps=20, batch_size=8, block_size=32, eval_every=10,
                              warmup_steps=2, progress=False))
    assert metrics["final_val_loss"] < 4.0


def test_calculator_examples_are_the_origin_then_held_out_problems():
    examples = calculator_examples()
    assert examples[0] == {"prompt": "two plus three equals", "completion": " five"}
    problems = {p.prompt: p for p in all_problems()}
    for e in examples[1:]:
        p = problems[e["prompt"]]
        assert is_held_out(p.a, p.b) and p.completion == e["completion"]


def test_shipped_calculator_card_lists_examples_the_model_answers():
    directory = Path(__file__).resolve().parents[2] / "checkpoints" / "calculator"
    card = json.loads((directory / "model_card.json").read_text())
    assert card["examples"] == calculator_examples()
    model, tokenizer = load_checkpoint(directory)
    assert greedy_answers(model, tokenizer, [e["prompt"] for e in card["examples"]]) == \
        [e["completion"] for e in card["examples"]]


def test_help_explains_every_flag_with_its_default_and_lists_the_corpora(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for corpus in CORPORA:
        assert corpus in text
    for f in fields(TrainArgs):
        flag = ("--no-" if f.name in ("progress", "eval_held_out") else "--") + f.name.replace("_", "-")
        entry = re.search(rf"^  {re.escape(flag)}\b.*?(?=^  --|\Z)", text, re.S | re.M)
        assert entry, flag
        words = entry.group(0).split()
        assert len(words) > 4, f"{flag} has no description"
        if not flag.startswith("--no-"):
            assert "(default:" in entry.group(0), flag


def test_unset_options_take_the_corpus_defaults():
    args = TrainArgs(corpus="pronouns").resolved()
    assert (args.vocab_size, args.steps, args.batch_size, args.out) == (
        CORPUS_DEFAULTS["pronouns"]["vocab_size"], CORPUS_DEFAULTS["pronouns"]["steps"],
        CORPUS_DEFAULTS["pronouns"]["batch_size"], "runs/pronouns")
    assert TrainArgs(corpus="calculator", steps=7).resolved().steps == 7
    with pytest.raises(SystemExit, match="unknown corpus 'poems'"):
        TrainArgs(corpus="poems").resolved()


def test_bf16_autocast_trains_to_the_loss_float32_reaches(tmp_path):
    """The same tiny run in float32 and under bf16 autocast: both learn, to nearly the same
    validation loss (validation runs in float32 either way), and the card says which ran."""
    runs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        runs[precision] = train(TrainArgs(out=str(out), steps=40, batch_size=32, eval_every=20, warmup_steps=5,
                                          progress=False, seed=3, eval_held_out=False, precision=precision))
        card = json.loads((out / "model_card.json").read_text())
        assert card["training"]["precision"] == precision and card["compute_dtype"] == precision
    f32, bf16 = runs["float32"]["final_val_loss"], runs["bfloat16"]["final_val_loss"]
    assert f32 < 3.0 and bf16 < 3.0
    assert f32 != bf16 and abs(bf16 - f32) / f32 < 0.05


def test_an_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(SystemExit, match="--precision must be one of auto, float32, bfloat16"):
        TrainArgs(precision="fp16").resolved()


def test_the_completion_loss_counts_only_the_answer_s_targets():
    # BOS 5 6 | 7 EOS and BOS 8 | 9 EOS: the prompts end before 7 and before 9
    inputs, targets = pad_batch([[1, 5, 6, 7, 2], [1, 8, 9, 2]], pad_id=0, loss_from=[3, 2])
    assert inputs.tolist() == [[1, 5, 6, 7], [1, 8, 9, 0]]
    assert targets.tolist() == [[-100, -100, 7, 2], [-100, 9, 2, -100]]
    assert pad_batch([[1, 5, 6, 7, 2]], pad_id=0)[1].tolist() == [[5, 6, 7, 2]]    # all: every target
    problem = pronoun_split()[0][0]
    tokenizer = Tokenizer.train_bpe([p.text for p in pronoun_split()[0]], vocab_size=1024)
    start = completion_start(tokenizer, problem, tokenizer.encode(problem.text))
    assert tokenizer.token_text(tokenizer.encode(problem.text)[start]) == problem.completion
    with pytest.raises(SystemExit, match="--loss completion needs a corpus of prompts and completions"):
        TrainArgs(corpus="text", text_file="notes.txt", loss="completion").resolved()
    with pytest.raises(SystemExit, match="--loss must be one of all, completion"):
        TrainArgs(loss="prompt").resolved()
