"""Train a model and write a checkpoint directory.

    python -m model.train --corpus calculator --out checkpoints/calculator
    python -m model.train --corpus text --text-file book.txt --preset small --out runs/book

AdamW, linear warmup then cosine decay, gradient clipping, periodic evaluation, a progress bar,
a loss curve (PNG) and a model card. Deterministic given --seed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import save_checkpoint
from model.config import PRESETS, preset
from model.data import SequenceBatches, WindowBatches, calculator_split, pad_batch, read_text_corpus
from model.eval import held_out_accuracy
from model.tokenizer import Tokenizer
from model.transformer import Transformer


@dataclass
class TrainArgs:
    corpus: str = "calculator"
    text_file: str | None = None
    out: str = "checkpoints/calculator"
    preset: str = "calculator"
    vocab_size: int = 512          # BPE upper bound; the calculator needs fewer and stops early
    steps: int = 2000
    batch_size: int = 256
    block_size: int = 256          # text corpus window length
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    eval_held_out: bool = True     # calculator: greedy exact match on every held-out problem at the end


def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup to args.lr, then cosine decay to args.lr · min_lr_ratio."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    t = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: Transformer, args: TrainArgs) -> torch.optim.AdamW:
    # Decay matrices only; norms' gains (1-d) stay free.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def loss_on(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs).logits                                        # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def prepare(args: TrainArgs):
    """Tokenizer, training batches, and a fixed validation batch for the chosen corpus."""
    if args.corpus == "calculator":
        train, val, held_out = calculator_split(seed=args.seed)
        tokenizer = Tokenizer.train_bpe((p.text for p in train), vocab_size=args.vocab_size)
        encode = lambda text: tokenizer.encode(text) + [tokenizer.eos_id]
        batches = SequenceBatches([encode(p.text) for p in train], batch_size=args.batch_size,
                                  pad_id=tokenizer.hf.token_to_id("<|pad|>"), seed=args.seed)
        val_batch = pad_batch([encode(p.text) for p in val], pad_id=batches.pad_id)
        facts = {"train_problems": len(train), "val_problems": len(val), "held_out_problems": len(held_out),
                 "held_out_rule": "(a, op, b) is held out iff (7a + 3b) mod 11 == 5"}
        return tokenizer, batches, val_batch, facts
    if args.corpus == "text":
        if not args.text_file:
            raise SystemExit("--corpus text needs --text-file PATH")
        train_text, val_text = read_text_corpus(args.text_file)
        tokenizer = Tokenizer.train_bpe(train_text.splitlines(keepends=True), vocab_size=args.vocab_size)
        train_ids = tokenizer.encode(train_text, add_bos=False)
        val_ids = tokenizer.encode(val_text, add_bos=False)
        block = min(args.block_size, len(val_ids) - 2)
        batches = WindowBatches(train_ids, batch_size=args.batch_size, block_size=block, seed=args.seed)
        val_batch = next(WindowBatches(val_ids, batch_size=min(64, args.batch_size), block_size=block,
                                       seed=args.seed + 1))
        facts = {"text_file": str(args.text_file), "train_tokens": len(train_ids), "val_tokens": len(val_ids),
                 "block_size": block}
        return tokenizer, batches, val_batch, facts
    raise SystemExit(f"unknown corpus {args.corpus!r}: choose calculator or text")


def train(args: TrainArgs) -> dict:
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer, batches, (val_x, val_y), facts = prepare(args)
    max_context = PRESETS[args.preset].get("max_context", 1024)
    if args.corpus == "text":
        max_context = max(max_context, facts["block_size"])
    config = preset(args.preset, vocab_size=tokenizer.vocab_size, max_context=max_context,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                    pad_token_id=tokenizer.hf.token_to_id("<|pad|>"))
    model = Transformer(config)
    model.init_weights(seed=args.seed)
    optimizer = make_optimizer(model, args)
    history: dict[str, list] = {"step": [], "loss": [], "val_step": [], "val_loss": []}

    bar = tqdm(range(args.steps), desc="train", disable=not args.progress, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, targets = next(batches)
        loss = loss_on(model, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            with torch.no_grad():
                val_loss = loss_on(model, val_x, val_y).item()
            model.train()
            history["val_step"].append(step + 1)
            history["val_loss"].append(val_loss)
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val_loss:.4f}")

    model.eval()
    train_seconds = time.perf_counter() - start
    metrics = {"final_train_loss": history["loss"][-1], "final_val_loss": history["val_loss"][-1]}
    if args.corpus == "calculator" and args.eval_held_out:
        accuracy, wrong = held_out_accuracy(model, tokenizer)
        metrics["held_out_exact_match"] = accuracy
        metrics["held_out_wrong"] = len(wrong)
    out = save_checkpoint(model, tokenizer, args.out)
    plot_loss(history, out / "loss.png")
    write_model_card(out, args, config, facts, metrics, train_seconds, model.num_parameters)
    return metrics


def plot_loss(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history["step"], history["loss"], lw=0.8, label="train")
    ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(out: Path, args: TrainArgs, config, facts: dict, metrics: dict,
                     seconds: float, n_params: int) -> None:
    card = {"corpus": args.corpus, "corpus_facts": facts, "parameters": n_params,
            "config": config.as_dict(), "training": {k: v for k, v in vars(args).items() if k != "progress"},
            "wall_time_seconds": round(seconds, 1), "metrics": metrics,
            "command": "python -m model.train " + " ".join(_cli_flags(args))}
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = [f"# {out.name}", "", f"A {n_params / 1e6:.2f}M-parameter Llama-style decoder trained by attnserve "
             f"on the `{args.corpus}` corpus.", "", f"Reproduce: `{card['command']}`", "",
             "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += [f"| steps | {args.steps} (batch {args.batch_size}, lr {args.lr}, seed {args.seed}) |",
              f"| wall time | {seconds / 60:.1f} min |"]
    lines += [f"| {k} | {v:.4%} |" if "exact_match" in k else f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    lines += ["", "![loss curve](loss.png)", ""]
    (out / "model_card.md").write_text("\n".join(lines))


def _cli_flags(args: TrainArgs) -> list[str]:
    defaults = TrainArgs()
    return [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if (k not in ("progress", "eval_held_out") and v != getattr(defaults, k)) or k in ("corpus", "out")]


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(TrainArgs()).items():
        flag = "--" + name.replace("_", "-")
        if name in ("progress", "eval_held_out"):
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false")
        elif name == "threads" or name == "text_file":
            parser.add_argument(flag, type=int if name == "threads" else str, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return TrainArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = train(args)
    print(json.dumps({"out": args.out, **metrics}, indent=2))


if __name__ == "__main__":
    main()
