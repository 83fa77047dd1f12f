"""The logit lens: what the model would predict if it stopped after layer ℓ.

    lens_ℓ[q] = softmax(lm_head(final_norm(h_ℓ[q])))

h_ℓ is the residual stream after layer ℓ (0-based) at position q: TransformerLens'
`accumulated_resid` + `ln_final` convention, and `transformers`' `output_hidden_states[ℓ + 1]`
(whose last entry is already normed: there the lens is the model's logits). The last layer's
lens is the model's own next-token distribution, by construction (`Transformer.logit_lens` is
the same norm and head the logits go through).

Only each distribution's top-k leaves the engine. A text's lens is computed layer by layer in
chunks of at most LENS_CHUNK logits, so a long text never holds (layers, T, V) at once; one
position per row (a decode step, a prompt's last token) goes through the head as one matmul over
(layers · rows) vectors: at batch 1 that reads the head's weights once for every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.events import LensSpec, LensTop
from model.transformer import Transformer

LENS_CHUNK = 1 << 22   # logits (floats) computed at once: 16 MB in float32


def lens_top(model: Transformer, states: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Residual-stream vectors (..., C) → the top-k token ids (..., k) int64 and probabilities
    (..., k) float32 of their lens distributions, on the CPU."""
    flat = states.reshape(-1, states.shape[-1])                        # (N, C)
    rows = max(1, LENS_CHUNK // model.config.vocab_size)
    ids, probs = [], []
    for chunk in flat.split(rows):
        top = model.logit_lens(chunk).float().softmax(dim=-1).topk(k, dim=-1)   # (n, k) each
        ids.append(top.indices)
        probs.append(top.values)
    shape = (*states.shape[:-1], k)
    return torch.cat(ids).view(shape).cpu(), torch.cat(probs).view(shape).cpu()


def text_lens(model: Transformer, hidden: dict[int, Tensor], layers: tuple[int, ...], *, row: int, n: int,
              k: int) -> LensTop:
    """The lens at every position of one batch row's first n tokens: (L, n, k) rows.
    hidden: layer → (B, T, C) residual streams, as `Transformer.forward(hidden_layers=…)` returns."""
    tops = [lens_top(model, hidden[layer][row, :n], k) for layer in layers]   # L × ((n, k), (n, k))
    return LensTop(layers, torch.stack([i for i, _ in tops]), torch.stack([p for _, p in tops]))


def position_lens(model: Transformer, hidden: dict[int, Tensor],
                  wants: list[tuple[int, int, LensSpec]], n_layers: int,
                  logits: dict[int, Tensor] | None = None) -> list[LensTop]:
    """The lens at one position for each of several batch rows, all in one pass through the head.
    wants: (batch row, position in that row, the row's spec) per row; returns (L, k) rows for each.
    logits: the lens logits (B, T, V) of those layers where the model made them (the fused decode
    step, `Transformer.forward(lens_logits=True)`): then only their top-k is taken here."""
    specs = [spec.layer_ids(n_layers) for _, _, spec in wants]
    union = sorted({layer for layers in specs for layer in layers})
    rows = torch.tensor([row for row, _, _ in wants])
    positions = torch.tensor([pos for _, pos, _ in wants])
    device = hidden[union[0]].device
    rows, positions = rows.to(device), positions.to(device)
    k = max(spec.top_k for _, _, spec in wants)
    if logits:
        top = torch.stack([logits[layer] for layer in union])[:, rows, positions].softmax(dim=-1).topk(k, dim=-1)
        ids, probs = top.indices.cpu(), top.values.cpu()                        # (Lu, R, kmax) each
    else:
        states = torch.stack([hidden[layer][rows, positions] for layer in union])   # (Lu, R, C)
        ids, probs = lens_top(model, states, k)                                 # (Lu, R, kmax) each
    out = []
    for j, (layers, (_, _, spec)) in enumerate(zip(specs, wants)):
        at = slice(None) if list(layers) == union else [union.index(layer) for layer in layers]
        out.append(LensTop(layers, ids[at, j, : spec.top_k], probs[at, j, : spec.top_k]))   # (L, k)
    return out


def prompt_lens(model: Transformer, hidden: dict[int, Tensor],
                wants: list[tuple[int, int, LensSpec]]) -> list[tuple[LensTop | None, LensTop]]:
    """For prompts just prefilled, each (batch row, prompt length n, spec): the prompt's (L, n, k)
    rows when the spec includes the prompt (else None), and the first generated token's (L, k)
    rows: the last prompt position's, the same numbers as the prompt's last row."""
    n_layers = model.config.n_layers
    out: list[tuple[LensTop | None, LensTop] | None] = [None] * len(wants)
    last_only = []
    for j, (row, n, spec) in enumerate(wants):
        if spec.include_prompt:
            prompt = text_lens(model, hidden, spec.layer_ids(n_layers), row=row, n=n, k=spec.top_k)
            out[j] = (prompt, LensTop(prompt.layers, prompt.ids[:, -1], prompt.probs[:, -1]))
        else:
            last_only.append(j)
    if last_only:
        tops = position_lens(model, hidden, [(wants[j][0], wants[j][1] - 1, wants[j][2]) for j in last_only], n_layers)
        for j, top in zip(last_only, tops):
            out[j] = (None, top)
    return out
