"""Teacher-forced analysis: what the model thinks of a given text, from one prefill.

An `AnalysisRequest` is prefilled with the generation prompts admitted in the same step (same
batch, same cache slots, same forward); instead of sampling, the engine hands its batch row here:

    logits[q]   = lm_head(final_norm(h_last[q]))        the prediction for position q + 1
    logprob[i]  = log_softmax(logits[i - 1])[ids[i]]    i ≥ 1: how expected the actual token was
    top-N[i]    = the top N of log_softmax(logits[i - 1])
    completion  = Σ logprob[i] for i ≥ completion_start (prompt + completion scoring)

The logits come from the last layer's residual stream (`Transformer.forward(hidden_layers=…)`),
so the forward computes the head at one position per row as for generation and the analysis
alone pays for the head over its whole text.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.events import AnalysisRequest, Analyzed
from model.logit_lens import text_lens
from model.transformer import ModelOutput, Transformer


def analyze_row(model: Transformer, request: AnalysisRequest, out: ModelOutput, *, row: int,
                attention: Tensor | None, queue_time: float) -> Analyzed:
    """The Analyzed event for one batch row of a prefill forward that returned the last layer's
    hidden state (and the lens layers'). attention: that row's (L, H, n, n) weights, or None."""
    ids, n = request.ids, len(request.ids)
    logprobs, top, actual = token_logprobs(model, out, row=row, ids=ids, top_n=request.logprobs)
    completion = None
    if request.completion_start is not None:
        completion = float(actual[request.completion_start - 1:].double().sum())
    lens = None
    if (spec := request.lens) is not None:
        lens = text_lens(model, out.hidden, spec.layer_ids(model.config.n_layers), row=row, n=n, k=spec.top_k)
    return Analyzed(request_id=request.request_id, ids=list(ids), logprobs=logprobs,
                    top_logprobs=top, attention=attention, lens=lens, completion_logprob=completion,
                    queue_time=queue_time)


def token_logprobs(model: Transformer, out: ModelOutput, *, row: int, ids: list[int], top_n: int
                   ) -> tuple[list[float | None], list[list[tuple[int, float]]] | None, Tensor]:
    """Per position of `ids` (one batch row of a forward that returned the last layer's hidden
    state): the actual token's logprob (None at 0), the top-N (id, logprob) ([] at 0; None when
    N = 0), and the actual logprobs as a (n-1,) tensor. Generation's prompt logprobs use it too."""
    n = len(ids)
    last = model.config.n_layers - 1
    logits = model.logit_lens(out.hidden[last][row, : n - 1])                 # (n-1, V): positions 0..n-2
    logprobs = logits.float().log_softmax(dim=-1)                              # (n-1, V)
    targets = torch.tensor(ids[1:], device=logprobs.device)[:, None]           # (n-1, 1): the next tokens
    actual = logprobs.gather(-1, targets)[:, 0].cpu()                          # (n-1,)
    top = None
    if top_n:
        best = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)           # (n-1, N) each
        top = [[]] + [list(zip(i, lp)) for i, lp in zip(best.indices.tolist(), best.values.tolist())]
    return [None, *actual.tolist()], top, actual
