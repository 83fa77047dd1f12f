"""Training on your own text: the time budget (--minutes), the plan, and bits per byte."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from model.bits import bits_per_byte, perplexity, token_byte_lengths
from model.config import ModelConfig
from model.plan import BUDGET_MARGIN, plan_run
from model.tokenizer import Tokenizer
from model.train import TrainArgs, lr_at, train
from model.transformer import Transformer

TEXT = "Ünïcödé lines, with 日本語 and emoji 🙂, and plain words.\n" * 40 + "def f(x):\n    return x + 1\n" * 30


def test_token_byte_lengths_add_up_to_the_text_s_bytes():
    tokenizer = Tokenizer.train_bpe(TEXT.splitlines(keepends=True), vocab_size=300)
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer.encode(TEXT)                                   # BOS first: a special token, 0 bytes
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    assert lengths[tokenizer.bos_id] == lengths[tokenizer.eos_id] == 0


def test_bits_per_byte_is_the_loss_spread_over_the_bytes_of_a_fixed_text():
    tokenizer = Tokenizer.train_bpe(TEXT.splitlines(keepends=True), vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2,
                                    intermediate_size=48, max_context=2048))
    model.init_weights(seed=0)
    ids = torch.tensor([tokenizer.encode(TEXT) + [tokenizer.eos_id]])
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, -1] = -100                                          # like padding: not counted (EOS, 0 bytes)
    with torch.no_grad():
        logits = model(inputs).logits[0]
    total_nats = F.cross_entropy(logits, targets[0], ignore_index=-100, reduction="sum").item()
    mean = total_nats / int((targets != -100).sum())
    expected = total_nats / math.log(2) / len(TEXT.encode("utf-8"))   # the targets spell the whole text
    assert bits_per_byte(mean, targets, token_byte_lengths(tokenizer)) == pytest.approx(expected, rel=1e-9)
    assert perplexity(mean) == pytest.approx(math.exp(mean))


def test_refit_follows_the_pace_and_keeps_a_cosine_after_the_warmup():
    plan = plan_run(tokens_per_step=100, seconds_per_step=0.1, steps=None, minutes=1, warmup_steps=10)
    usable = 60 * (1 - BUDGET_MARGIN)
    refit = lambda done, elapsed, recent: plan.refit(done=done, elapsed=elapsed, recent_pace=recent, warmup_steps=10)
    assert refit(100, 10.0, 0.1) == 100 + int((usable - 10) / 0.1)      # on pace
    assert refit(100, 20.0, 0.2) == 100 + int((usable - 20) / 0.2)      # twice slower
    assert refit(100, 10.0, 0.4) == 100 + int((usable - 10) / 0.4)      # slowing down: the recent pace counts
    assert refit(100, 59.0, 0.1) == 101                                 # out of time
    assert refit(3, 59.0, 0.1) == 11                                    # the warmup still gets its cosine


def test_plan_fits_the_budget_and_refuses_one_too_small():
    plan = plan_run(tokens_per_step=4096, seconds_per_step=0.05, steps=None, minutes=2, warmup_steps=100)
    assert plan.steps == int(120 * (1 - BUDGET_MARGIN) / 0.05)
    assert plan.estimated_seconds <= 120
    assert "4,096 tokens per step" in plan.describe() and f"{plan.steps:,} steps" in plan.describe()
    assert plan_run(tokens_per_step=10, seconds_per_step=1.0, steps=7, minutes=None, warmup_steps=1).steps == 7
    with pytest.raises(SystemExit, match=r"--minutes 0\.01"):
        plan_run(tokens_per_step=10, seconds_per_step=0.1, steps=None, minutes=0.01, warmup_steps=100)


def test_steps_or_minutes_and_the_text_corpus_trains_for_time():
    assert TrainArgs(corpus="text").resolved().minutes is not None
    assert TrainArgs(corpus="text").resolved().steps is None
    given = TrainArgs(corpus="text", steps=50).resolved()
    assert (given.steps, given.minutes) == (50, None)
    assert TrainArgs(corpus="calculator").resolved().minutes is None
    with pytest.raises(SystemExit, match="not both"):
        TrainArgs(steps=5, minutes=1.0).resolved()


def test_a_run_asked_for_seconds_stops_within_them_with_the_schedule_complete(tmp_path, capsys):
    path = tmp_path / "book.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    budget_minutes = 0.2
    args = TrainArgs(corpus="text", text_file=str(path), out=str(tmp_path / "t"), minutes=budget_minutes,
                     vocab_size=300, batch_size=8, block_size=32, warmup_steps=2, eval_every=10_000, threads=1,
                     progress=False)
    threads = torch.get_num_threads()
    try:    # one thread: a step's time on a busy shared CPU then varies least (no OpenMP thread waits)
        metrics = train(args)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    card = json.loads((tmp_path / "t" / "model_card.json").read_text())
    plan, steps = card["plan"], card["training"]["steps"]
    assert out.index("corpus text defaults") < out.index("plan:")     # what it picked, then the plan
    assert plan["budget_seconds"] == budget_minutes * 60 and plan["steps"] == steps > args.warmup_steps
    assert plan["estimated_seconds"] <= budget_minutes * 60
    assert card["training_loop_seconds"] <= budget_minutes * 60
    # the schedule was planned for the steps that ran: the cosine reaches its floor right after the last
    run = TrainArgs(**card["training"] | {"progress": False})
    assert lr_at(steps, run) == pytest.approx(run.lr * run.min_lr_ratio)
    assert lr_at(steps - 1, run) > lr_at(steps, run)
    assert metrics["final_val_bits_per_byte"] == card["metrics"]["final_val_bits_per_byte"] > 0
    assert metrics["final_val_perplexity"] == pytest.approx(math.exp(metrics["final_val_loss"]))
