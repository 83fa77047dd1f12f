"""Train a model and write a checkpoint directory.

    python -m model.train --corpus calculator --out checkpoints/calculator --steps 3000
    python -m model.train --corpus pronouns --out checkpoints/pronouns
    python -m model.train --corpus text --text-file book.txt --minutes 10 --out runs/book

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast where the CPU computes
bf16 natively (--precision; weights and optimizer state stay float32, validation runs in
float32), periodic evaluation (loss, bits per byte, perplexity), a progress bar, a loss curve
(PNG) and a model card. Before step one it prints the plan: tokens per step, steps, and the wall
time measured trial steps predict; with --minutes the steps are chosen to fit. Deterministic
given --seed (and --steps). Options left unset take the corpus's default (CORPUS_DEFAULTS).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.bits import bits_per_byte, perplexity, token_byte_lengths
from model.checkpoint import save_checkpoint
from model.config import PRESETS, preset
from model.data import (
    SequenceBatches,
    WindowBatches,
    calculator_examples,
    calculator_split,
    pad_batch,
    read_text_corpus,
)
from model.eval import HELD_OUT_CORPORA, evaluate
from model.plan import measure_step_seconds, plan_run
from model.probe import best_head_line, probe_table
from model.pronouns import HELD_OUT_RULE, TEMPLATES, pronoun_split
from model.pronouns import examples as pronoun_examples
from model.quantization import DTYPE_CHOICES, dtype_name, resolve_dtype
from model.tokenizer import Tokenizer
from model.transformer import Transformer

CORPORA = {
    "calculator": "every '<a> plus|minus <b> equals <answer>' in words, a and b in 0 … 99; "
                  "held out: (7a + 3b) mod 11 == 5",
    "pronouns": "Winograd-style 'the trophy did not fit in the suitcase because it was too big . "
                "it refers to the trophy', 8 templates; held out: (2t + 3i + 5j) mod 11 == 7",
    "text": "any UTF-8 file (--text-file); a byte-level BPE tokenizer is trained on it",
}

# What an option left unset means, per corpus. The pronoun vocabulary (~700 tokens) makes every
# word one token; 512 would split most nouns. Text trains for a time budget, not a step count: a
# few MB fit nanoGPT's CPU recipe (4 layers of width 128, short windows, small batches), under bf16
# autocast where the CPU has bf16 instructions. The shipped calculator and pronoun models were
# trained in float32 and keep it, so their cards' commands reproduce them. The pronoun model learns
# from its answers only (--loss completion): with the whole sentence counted, the answer is one
# target in ~20 and the rest (which nouns come next) cannot be predicted; it learns ~10× slower.
# The end of text joins the loss only for the last 20% of the steps (--eos-from): counted from
# the start, no head past layer 0 came to look at the referent. Weight decay 3.0 (not 0.1) leaves
# fewer, sharper heads. (README: the pronoun model, with the runs measured.)
CORPUS_DEFAULTS: dict[str, dict] = {
    "calculator": dict(preset="calculator", vocab_size=512, steps=2000, batch_size=256, block_size=256,
                       lr=3e-3, warmup_steps=100, weight_decay=0.1, precision="float32", loss="all"),
    "pronouns": dict(preset="calculator", vocab_size=1024, steps=1000, batch_size=128, block_size=256,
                     lr=3e-3, warmup_steps=100, weight_decay=3.0, precision="float32", loss="completion",
                     eos_from=0.8),
    "text": dict(preset="calculator", vocab_size=2048, minutes=10.0, batch_size=32, block_size=128,
                 lr=3e-3, warmup_steps=100, weight_decay=0.1, precision="auto", loss="all"),
}
LOSS_CHOICES = ("all", "completion")


@dataclass
class TrainArgs:
    corpus: str = "calculator"
    text_file: str | None = None
    out: str | None = None         # None ⇒ runs/<corpus>
    preset: str | None = None      # None (here and below) ⇒ the corpus's default
    vocab_size: int | None = None  # BPE upper bound; a small corpus needs fewer and stops early
    steps: int | None = None
    minutes: float | None = None   # a time budget for the training steps, instead of --steps
    batch_size: int | None = None
    block_size: int | None = None  # text corpus window length
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float = 1.0
    precision: str | None = None   # the training steps' compute dtype: auto, float32 or bfloat16 (autocast)
    loss: str | None = None        # which targets count: all, or the completion's only
    eos_from: float | None = None  # --loss completion: from this fraction of the steps on, the end of text counts too
    eval_every: int = 250
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    eval_held_out: bool = True     # calculator, pronouns: greedy exact match on every held-out problem at the end

    def resolved(self) -> TrainArgs:
        """These options with every unset one filled in from the corpus's defaults."""
        if self.corpus not in CORPORA:
            raise SystemExit(f"unknown corpus {self.corpus!r}: choose from {', '.join(CORPORA)}")
        if self.steps is not None and self.minutes is not None:
            raise SystemExit(f"give --steps ({self.steps}) or --minutes ({self.minutes}), not both")
        defaults = dict(CORPUS_DEFAULTS[self.corpus])
        if self.steps is not None or self.minutes is not None:   # the one given wins over the default
            defaults.pop("minutes", None)
            defaults.pop("steps", None)
        fill = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.out is None:
            fill["out"] = f"runs/{self.corpus}"
        resolved = replace(self, **fill)
        if resolved.precision not in DTYPE_CHOICES:
            raise SystemExit(f"--precision must be one of {', '.join(DTYPE_CHOICES)}, got {resolved.precision!r}")
        if resolved.loss not in LOSS_CHOICES:
            raise SystemExit(f"--loss must be one of {', '.join(LOSS_CHOICES)}, got {resolved.loss!r}")
        if resolved.loss == "completion" and resolved.corpus == "text":
            raise SystemExit("--loss completion needs a corpus of prompts and completions (calculator, pronouns), "
                             "not --corpus text")
        return resolved


HELP = {
    "corpus": "what to train on: " + "; ".join(f"{name}: {what}" for name, what in CORPORA.items()),
    "text_file": "the UTF-8 file for --corpus text (its last 5%% is validation)",
    "out": "the checkpoint directory to write (default: runs/<corpus>)",
    "preset": f"model size, one of {', '.join(PRESETS)}",
    "vocab_size": "upper bound on the BPE tokenizer's vocabulary",
    "steps": "optimizer steps",
    "minutes": "a time budget instead of --steps: trial steps are timed and the step count chosen so the "
               "training steps fit, the schedule planned for them",
    "batch_size": "sequences per step",
    "block_size": "tokens per training window (--corpus text)",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine decay ends at lr × this",
    "warmup_steps": "steps of linear warmup from 0 to lr",
    "weight_decay": "AdamW weight decay on matrices (not on norms)",
    "grad_clip": "gradient norm clip",
    "precision": "compute dtype of the training steps: bfloat16 runs forward and backward under bf16 autocast "
                 "(weights, gradients and AdamW state stay float32); auto is bfloat16 where the CPU has bf16 "
                 "instructions (avx512_bf16/amx_bf16), else float32",
    "loss": "which next-token predictions the loss counts: all, or completion (only the answer's, after the "
            "prompt, as TRL's completion-only loss; validation loss counts the same)",
    "eos_from": "with --loss completion, the fraction of the steps after which the end of text after each "
                "completion counts too (so the model learns to stop); before it, only the completion's own tokens",
    "eval_every": "steps between validation-loss evaluations",
    "seed": "seeds data order, initialisation and the validation split: same seed, same model",
    "threads": "torch threads (default: torch's choice)",
    "progress": "hide the progress bar",
    "eval_held_out": "skip the held-out evaluation at the end (calculator, pronouns)",
}


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


def loss_on(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, *,
            compute: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean cross-entropy of the next-token predictions; with compute=bfloat16 the forward runs under
    autocast (matmuls in bf16, the float32 weights cast on the fly; the logits and the loss in float32)."""
    with torch.autocast(inputs.device.type, dtype=compute, enabled=compute != torch.float32):
        logits = model(inputs).logits                                    # (B, T, V), float32
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def prepare(args: TrainArgs):
    """Tokenizer, training batches, a fixed validation batch, the corpus's facts for the card, and
    example prompts for the viewer."""
    if args.corpus in ("calculator", "pronouns"):
        if args.corpus == "calculator":
            train, val, held_out = calculator_split(seed=args.seed)
            facts = {"train_problems": len(train), "val_problems": len(val), "held_out_problems": len(held_out),
                     "held_out_rule": "(a, op, b) is held out iff (7a + 3b) mod 11 == 5"}
            examples = calculator_examples()
        else:
            train, val, held_out = pronoun_split(seed=args.seed)
            facts = {"templates": len(TEMPLATES), "train_problems": len(train), "val_problems": len(val),
                     "held_out_problems": len(held_out), "held_out_rule": HELD_OUT_RULE}
            examples = pronoun_examples()
        tokenizer = Tokenizer.train_bpe((p.text for p in train), vocab_size=args.vocab_size)
        encoded = lambda problems: [tokenizer.encode(p.text) + [tokenizer.eos_id] for p in problems]
        loss_from = lambda problems, sequences: [completion_start(tokenizer, p, ids) for p, ids in
                                                 zip(problems, sequences)] if args.loss == "completion" else None
        train_ids, val_ids = encoded(train), encoded(val)
        batches = SequenceBatches(train_ids, batch_size=args.batch_size, pad_id=tokenizer.hf.token_to_id("<|pad|>"),
                                  seed=args.seed, loss_from=loss_from(train, train_ids))
        val_batch = pad_batch(val_ids, batches.pad_id, loss_from(val, val_ids))
        return tokenizer, batches, val_batch, facts, examples
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
    words = val_text.split()
    examples = [{"prompt": " ".join(words[:8]), "completion": " " + " ".join(words[8:16])}] if words else []
    return tokenizer, batches, val_batch, facts, examples


def completion_start(tokenizer: Tokenizer, problem, text_ids: list[int]) -> int:
    """The index of the completion's first token in `text_ids`, the problem's encoded text (BOS first)."""
    prompt = tokenizer.encode(problem.prompt)
    if text_ids[: len(prompt)] != prompt:      # (never for these corpora: every word is its own token)
        raise ValueError(f"the prompt's tokens are not a prefix of the text's: {problem.text!r}")
    return len(prompt)


def train(args: TrainArgs) -> dict:
    """Train with `args` (unset options take the corpus's defaults), write the checkpoint with its
    loss curve and model card, and return the card's metrics."""
    given, args = args, args.resolved()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer, batches, (val_x, val_y), facts, examples = prepare(args)
    max_context = PRESETS[args.preset].get("max_context", 1024)
    if args.corpus == "text":
        max_context = max(max_context, facts["block_size"])
    config = preset(args.preset, vocab_size=tokenizer.vocab_size, max_context=max_context,
                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                    pad_token_id=tokenizer.hf.token_to_id("<|pad|>"))
    model = Transformer(config)
    model.init_weights(seed=args.seed)
    picked = {k: getattr(args, k) for k in CORPUS_DEFAULTS[args.corpus] if getattr(given, k) is None}
    print(f"corpus {args.corpus} defaults for options not given: "
          + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in picked.items()))
    compute = resolve_dtype(args.precision, device="cpu")
    plan = plan_training(model, batches, args, compute)
    args = replace(args, steps=plan.steps)
    print(f"precision: {'bf16 autocast' if compute == torch.bfloat16 else 'float32'} "
          f"(--precision {args.precision})", flush=True)
    print(plan.describe(), flush=True)
    optimizer = make_optimizer(model, args)
    byte_lengths = token_byte_lengths(tokenizer)
    history: dict[str, list] = {"step": [], "loss": [], "val_step": [], "val_loss": [], "val_bpb": []}
    loop_start = last_step_end = time.perf_counter()
    recent_pace = plan.seconds_per_step

    bar = tqdm(total=args.steps, desc="train", disable=not args.progress, dynamic_ncols=True)
    step = 0
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        inputs, targets = next(batches)
        if args.loss == "completion" and step < (args.eos_from or 0.0) * args.steps:
            targets = targets.masked_fill(targets == tokenizer.eos_id, -100)   # the answer's tokens only
        loss = loss_on(model, inputs, targets, compute=compute)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        step += 1
        bar.update(1)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                val_loss = loss_on(model, val_x, val_y).item()
            model.train()
            history["val_step"].append(step)
            history["val_loss"].append(val_loss)
            history["val_bpb"].append(bits_per_byte(val_loss, val_y, byte_lengths))
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val_loss:.4f}", bpb=f"{history['val_bpb'][-1]:.3f}")
        if plan.budget_seconds is not None and step < args.steps:
            # A shared CPU's speed drifts: after every step, re-fit the remaining steps to the
            # remaining budget, and the cosine with them, so the run ends on time at its floor.
            now = time.perf_counter()
            recent_pace = 0.8 * recent_pace + 0.2 * (now - last_step_end)   # seconds per step, lately
            last_step_end = now
            steps = plan.refit(done=step, elapsed=now - loop_start, recent_pace=recent_pace,
                               warmup_steps=args.warmup_steps)
            if steps != args.steps:
                args = replace(args, steps=steps)
                bar.total = steps
    bar.close()

    model.eval()
    loop_seconds = time.perf_counter() - loop_start
    train_seconds = time.perf_counter() - start
    metrics = {"final_train_loss": history["loss"][-1], "final_val_loss": history["val_loss"][-1],
               "final_val_bits_per_byte": history["val_bpb"][-1],
               "final_val_perplexity": perplexity(history["val_loss"][-1])}
    if args.corpus in HELD_OUT_CORPORA and args.eval_held_out:
        metrics |= evaluate(model, tokenizer, args.corpus)[0]
    out = save_checkpoint(model, tokenizer, args.out)
    plot_loss(history, out / "loss.png")
    card = {"corpus": args.corpus, "corpus_facts": facts, "parameters": model.num_parameters,
            "config": config.as_dict(), "training": {k: v for k, v in vars(args).items() if k != "progress"},
            "compute_dtype": dtype_name(compute), "wall_time_seconds": round(train_seconds, 1),
            "training_loop_seconds": round(loop_seconds, 1),
            "plan": {"tokens_per_step": plan.tokens_per_step, "planned_steps": plan.steps, "steps": args.steps,
                     "seconds_per_step": round(plan.seconds_per_step, 4),
                     "estimated_seconds": round(plan.estimated_seconds, 1), "budget_seconds": plan.budget_seconds},
            "metrics": metrics, "examples": examples,
            "command": "python -m model.train " + " ".join(_cli_flags(given, args))}
    write_model_card(out, card)
    return metrics


def plan_training(model: Transformer, batches, args: TrainArgs, compute: torch.dtype):
    """Time trial steps on a batch of the run's shape (drawn from a copy of the batches with its own
    seed, so the run's data order is untouched; gradients dropped, no update) and plan the run."""
    trial = copy.deepcopy(batches)
    trial.gen.manual_seed(args.seed + 1_000_003)
    inputs, targets = next(trial)

    def step() -> None:
        loss_on(model, inputs, targets, compute=compute).backward()
        model.zero_grad(set_to_none=True)

    return plan_run(tokens_per_step=int((targets != -100).sum()), seconds_per_step=measure_step_seconds(step),
                    steps=args.steps, minutes=args.minutes, warmup_steps=args.warmup_steps)


def plot_loss(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(history["step"], history["loss"], lw=0.8, label="train")
    ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", yscale="log",
           title=f"training loss (validation at the end: {history['val_bpb'][-1]:.3f} bits per byte)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(out: Path, card: dict) -> None:
    """model_card.json (the facts, for programs: the server's viewer reads `examples` and the
    probe's `best_head`) and model_card.md (the same, for people)."""
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    t, metrics = card["training"], card["metrics"]
    lines = [f"# {out.name}", "", f"A {card['parameters'] / 1e6:.2f}M-parameter Llama-style decoder trained by "
             f"attnserve on the `{card['corpus']}` corpus.", "", f"Reproduce: `{card['command']}`", "",
             "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in card["corpus_facts"].items()]
    lines += [f"| steps | {t['steps']} (batch {t['batch_size']}, lr {t['lr']}, seed {t['seed']}) |",
              f"| training precision | {card['compute_dtype']} |",
              f"| wall time | {card['wall_time_seconds'] / 60:.1f} min |"]
    lines += [f"| {k} | {v:.4%} |" if "exact_match" in k else f"| {k} | {v:.4g} |"
              for k, v in metrics.items() if isinstance(v, int | float)]
    if probe := metrics.get("attention_probe"):
        lines += ["", "## Attention probe", "",
                  f"Mean attention weight over the {probe['prompts']} held-out prompts, from the answer-predicting "
                  "position (the final `the`) and from the sentence's `it`, to the referent and to the distractor.",
                  "", best_head_line(probe), "", *probe_table(probe)]
    if card["examples"]:
        lines += ["", "## Example prompts", ""]
        lines += [f"- `{e['prompt']}` → `{e['completion']}`" for e in card["examples"]]
    lines += ["", "![loss curve](loss.png)", ""]
    (out / "model_card.md").write_text("\n".join(lines))


def _cli_flags(given: TrainArgs, args: TrainArgs) -> list[str]:
    """The command line that reproduces this run: --corpus, --out, and every option given that
    differs from its default."""
    defaults = TrainArgs()
    return [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in vars(given).items()
            if (k not in ("progress", "eval_held_out") and v is not None and v != getattr(defaults, k))
            or k in ("corpus", "out")]


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    epilog = "corpus defaults (for options left unset):\n" + "\n".join(
        f"  {name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in d.items())
        for name, d in CORPUS_DEFAULTS.items())
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    types = {f.name: f.type for f in fields(TrainArgs)}
    for name, default in vars(TrainArgs()).items():
        flag = "--" + name.replace("_", "-")
        if name in ("progress", "eval_held_out"):
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", help=HELP[name])
            continue
        kind = next(t for t in (int, float, str) if t.__name__ in str(types[name]))
        if any(name in d for d in CORPUS_DEFAULTS.values()):
            shown = "per corpus: " + ", ".join(f"{c} {d.get(name, 'unset')}" for c, d in CORPUS_DEFAULTS.items())
        else:
            shown = "runs/<corpus>" if name == "out" else str(default)
        help_text = HELP[name] + ("" if "(default" in HELP[name] else f" (default: {shown})")
        choices = {"corpus": list(CORPORA), "precision": list(DTYPE_CHOICES), "loss": list(LOSS_CHOICES)}.get(name)
        parser.add_argument(flag, type=kind, default=default, help=help_text, choices=choices)
    return TrainArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metrics = train(args)
    if probe := metrics.get("attention_probe"):
        print("\n".join(probe_table(probe)))
        print(best_head_line(probe))
        metrics = {k: v for k, v in metrics.items() if k != "attention_probe"}
    print(json.dumps({"out": args.resolved().out, **metrics}, indent=2))


if __name__ == "__main__":
    main()
