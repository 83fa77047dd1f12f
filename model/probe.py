"""The attention probe of the pronoun model: where does each head look when the answer is chosen?

For every layer and head, over a set of pronoun prompts, the mean attention weight
  - from the answer-predicting position (the prompt's last token, the final "the") and
  - from the pronoun "it" of the sentence
to the referent's token(s) and to the distractor's (summed over a noun's tokens when it has
several). A head that resolves the pronoun puts much more on the referent than on the distractor.
The best head is the one putting the most mean attention on the referent at the answer position.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from model.pronouns import PronounProblem
from model.tokenizer import Tokenizer
from model.transformer import Transformer

QUERIES = ("answer", "it")
KEYS = ("referent", "distractor")


def token_positions(tokenizer: Tokenizer, problem: PronounProblem) -> tuple[list[int], dict[str, list[int]]]:
    """The prompt's token ids (BOS first) and, for "referent", "distractor" and "it", the positions
    of the tokens overlapping that word's characters."""
    encoding = tokenizer.hf.encode(problem.prompt, add_special_tokens=False)
    shift = 1 if tokenizer.bos_id is not None else 0
    ids = ([tokenizer.bos_id] if shift else []) + encoding.ids
    positions = {}
    for name, (start, end) in problem.spans().items():
        hits = [k + shift for k, (s, e) in enumerate(encoding.offsets) if s < end and e > start]
        if not hits:
            raise ValueError(f"no token covers {name} {problem.prompt[start:end]!r} in {problem.prompt!r}")
        positions[name] = hits
    return ids, positions


@torch.inference_mode()
def attention_probe(model: Transformer, tokenizer: Tokenizer, problems: Sequence[PronounProblem], *,
                    batch_size: int = 256) -> dict:
    """Mean attention per (layer, head) from the answer position and from "it" to the referent and
    the distractor, over `problems`; and the best head. Prompts are batched by token length."""
    if not problems:
        raise ValueError("attention_probe needs at least one problem")
    c = model.config
    # sums[query][key]: (n_layers, n_heads) running sums over prompts
    sums = {q: {k: torch.zeros(c.n_layers, c.n_heads, dtype=torch.float64) for k in KEYS} for q in QUERIES}
    encoded = [token_positions(tokenizer, p) for p in problems]
    by_length = sorted(range(len(problems)), key=lambda i: len(encoded[i][0]))
    for _, group in itertools.groupby(by_length, key=lambda i: len(encoded[i][0])):
        group = list(group)
        for start in range(0, len(group), batch_size):
            rows = group[start: start + batch_size]
            tokens = torch.tensor([encoded[i][0] for i in rows])                # (B, T)
            attentions = model(tokens, attn_layers=range(c.n_layers), logits_at=-1).attentions
            weights = torch.stack([attentions[layer] for layer in range(c.n_layers)], dim=1)
            weights = weights.double()                                           # (B, L, nh, T, T)
            for b, i in enumerate(rows):
                where = encoded[i][1]
                query_pos = {"answer": tokens.shape[1] - 1, "it": where["it"][-1]}
                for q, qpos in query_pos.items():
                    for k in KEYS:
                        sums[q][k] += weights[b, :, :, qpos, where[k]].sum(-1)      # (L, nh)
    n = len(problems)
    means = {q: {k: sums[q][k] / n for k in KEYS} for q in QUERIES}
    layers = [[{f"{q}_{k}": round(float(means[q][k][layer, head]), 4) for q in QUERIES for k in KEYS}
               for head in range(c.n_heads)] for layer in range(c.n_layers)]
    return {"prompts": n, "layers": layers,
            "best_head": _best(means["answer"]), "best_it_head": _best(means["it"])}


def _best(means: dict[str, torch.Tensor]) -> dict:
    """The (layer, head) with the most mean attention on the referent, with its numbers."""
    flat = int(means["referent"].argmax())
    layer, head = divmod(flat, means["referent"].shape[1])
    referent, distractor = float(means["referent"][layer, head]), float(means["distractor"][layer, head])
    return {"layer": layer, "head": head, "referent": round(referent, 4), "distractor": round(distractor, 4),
            "ratio": round(referent / distractor, 1) if distractor > 0 else None}


def probe_table(probe: dict) -> list[str]:
    """The probe as Markdown table lines: one row per (layer, head)."""
    lines = ["| layer | head | answer → referent | answer → distractor | it → referent | it → distractor |",
             "|---|---|---|---|---|---|"]
    for layer, heads in enumerate(probe["layers"]):
        for head, m in enumerate(heads):
            lines.append(f"| {layer} | {head} | {m['answer_referent']:.3f} | {m['answer_distractor']:.3f} | "
                         f"{m['it_referent']:.3f} | {m['it_distractor']:.3f} |")
    return lines


def best_head_line(probe: dict) -> str:
    b, i = probe["best_head"], probe["best_it_head"]
    return (f"best head at the answer position: layer {b['layer']} head {b['head']} — {b['referent']:.3f} on the "
            f"referent vs {b['distractor']:.3f} on the distractor ({b['ratio']}×), over {probe['prompts']} prompts; "
            f"at \"it\": layer {i['layer']} head {i['head']} ({i['referent']:.3f} vs {i['distractor']:.3f})")
