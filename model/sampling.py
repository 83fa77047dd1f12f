"""Sampling: choose each row's next token from a batch of logits, with per-row settings.

The engine calls `sample` once per decode step with one row per running request. Every function is
pure (tensors in, tensors out, the caller's tensors untouched) and batched over rows; a row's
settings live in a `SamplingBatch`, built once per step from the requests' `SamplingParams`.

For each row, in this order:

1. Penalties (rows with non-default ones; `apply_penalties`):
   repetition (CTRL / HF `RepetitionPenaltyLogitsProcessor`), over prompt + generated tokens:
       logit ← logit / r if logit > 0 else logit · r
   then frequency / presence (OpenAI), over generated tokens only:
       logit ← logit − count · f − (count > 0) · pr
2. greedy rows: the argmax of the penalised logits; no temperature, no randomness.
   Other rows: divide by temperature, then the row's truncation filter (removed tokens → −inf):
       random   nothing removed
       top_k    keep the k highest logits (k ≥ V keeps all)
       top_p    keep the smallest set of most probable tokens whose mass is ≥ p
       min_p    keep tokens with prob ≥ p · max prob
       typical  (Meister et al. 2022, as HF `TypicalLogitsWarper`) order tokens by
                |−log prob − entropy| ascending; keep the smallest prefix whose mass is ≥ p
   Tokens tied with the last kept one are kept too, so the kept set depends only on the
   distribution, never on how a sort broke ties (HF does the same for top_k and typical).
   Every filter keeps at least one token.
3. Renormalise (softmax) and draw by inverse CDF with ONE uniform u ~ U[0, 1) per random row, taken
   from that row's own `torch.Generator`. A row's token is then a function of its logits, its
   settings and its generator alone: the same seed gives the same tokens whatever else is in the
   batch and at whatever row position. Greedy rows consume no randomness.

Logprobs come from the distribution the token was drawn from: the renormalised, filtered,
temperature-scaled, penalised one for random rows; softmax of the penalised logits (temperature 1,
no filter) for greedy rows. Top-N alternatives are sorted by logprob, descending, and may hold −inf
for tokens a filter removed.

Cost: an all-greedy batch without penalties is one argmax; only top_p and typical rows sort the
vocabulary, only top_k rows run a top-k, and only rows that use a filter pay for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.limits import MAX_LOGPROBS

STRATEGIES = ("greedy", "random", "top_k", "top_p", "min_p", "typical")
FILTERS = ("top_k", "top_p", "min_p", "typical")  # the strategies that truncate the distribution
P_RANGES = {"top_p": "(0, 1]", "min_p": "[0, 1)", "typical": "(0, 1]"}  # where p is used


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. Settings a strategy does not use must be left unset."""

    strategy: str = "greedy"
    temperature: float = 1.0  # > 0; ignored by greedy
    k: int | None = None  # top_k: >= 1
    p: float | None = None  # top_p: (0, 1]; min_p: [0, 1); typical: (0, 1]
    repetition_penalty: float = 1.0  # > 0; 1 is off
    frequency_penalty: float = 0.0  # [-2, 2]; 0 is off
    presence_penalty: float = 0.0  # [-2, 2]; 0 is off

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {self.temperature}")
        if self.strategy == "top_k":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
                raise ValueError(f"k must be an int >= 1 for top_k, got {self.k!r}")
        elif self.k is not None:
            raise ValueError(f"k is only used by top_k, got k={self.k} with {self.strategy}")
        if self.strategy in P_RANGES:
            p = self.p
            ok = (isinstance(p, int | float) and not isinstance(p, bool)
                  and (0 <= p < 1 if self.strategy == "min_p" else 0 < p <= 1))
            if not ok:
                raise ValueError(f"p must be in {P_RANGES[self.strategy]} for {self.strategy}, "
                                 f"got {p!r}")
        elif self.p is not None:
            raise ValueError(f"p is only used by {tuple(P_RANGES)}, got p={self.p} with "
                             f"{self.strategy}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be finite and > 0, "
                             f"got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:  # also rejects NaN
                raise ValueError(f"{name} must be in [-2, 2], got {value}")


@dataclass(frozen=True, eq=False)
class SamplingBatch:
    """One step's per-row settings, stacked into (B,) tensors on the logits' device.

    The host-side facts (which rows draw, which rows use which filter, whether any penalty is on)
    let `sample` skip whole stages without reading anything back from the device.
    """

    greedy: Tensor  # (B,) bool
    temperature: Tensor  # (B,) float32; 1 on greedy rows, so dividing leaves them untouched
    k: Tensor  # (B,) int64; 0 where unused
    p: Tensor  # (B,) float32; 0 where unused
    repetition_penalty: Tensor  # (B,) float32
    frequency_penalty: Tensor  # (B,) float32
    presence_penalty: Tensor  # (B,) float32
    random_rows: tuple[int, ...]  # rows that draw, each consuming one uniform
    filter_rows: dict[str, Tensor | None]  # filter -> its rows (None: every row); present ones only
    max_k: int  # the largest k of any top_k row, so top-k never runs wider than needed
    any_temperature: bool
    any_repetition: bool
    any_frequency_presence: bool

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], device: torch.device | str
                    ) -> SamplingBatch:
        if not params:
            raise ValueError("params is empty: a SamplingBatch needs at least one row")
        greedy = [sp.strategy == "greedy" for sp in params]
        rows: dict[str, list[int]] = {name: [] for name in FILTERS}
        for i, sp in enumerate(params):
            # Skip filters that would keep everything: those rows then cost nothing.
            no_op = ((sp.strategy in ("top_p", "typical") and sp.p >= 1.0)
                     or (sp.strategy == "min_p" and sp.p == 0.0))
            if sp.strategy in rows and not no_op:
                rows[sp.strategy].append(i)
        n = len(params)

        def floats(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        return cls(
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            temperature=floats([1.0 if g else sp.temperature for g, sp in zip(greedy, params)]),
            k=torch.tensor([sp.k or 0 for sp in params], dtype=torch.int64, device=device),
            p=floats([sp.p if sp.p is not None else 0.0 for sp in params]),
            repetition_penalty=floats([sp.repetition_penalty for sp in params]),
            frequency_penalty=floats([sp.frequency_penalty for sp in params]),
            presence_penalty=floats([sp.presence_penalty for sp in params]),
            random_rows=tuple(i for i, g in enumerate(greedy) if not g),
            filter_rows={
                name: None if len(r) == n else torch.tensor(r, dtype=torch.int64, device=device)
                for name, r in rows.items() if r},
            max_k=max((params[i].k for i in rows["top_k"]), default=0),
            any_temperature=any(not g and sp.temperature != 1.0
                                for g, sp in zip(greedy, params)),
            any_repetition=any(sp.repetition_penalty != 1.0 for sp in params),
            any_frequency_presence=any(sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0
                                       for sp in params),
        )

    def __len__(self) -> int:
        return self.greedy.shape[0]

    @property
    def all_greedy(self) -> bool:
        return not self.random_rows

    @property
    def any_penalty(self) -> bool:
        return self.any_repetition or self.any_frequency_presence


@dataclass
class Sampled:
    """One step's choices. Logprob fields are None unless asked for."""

    token_ids: Tensor  # (B,) int64
    logprobs: Tensor | None = None  # (B,) float32, of the chosen token
    top_ids: Tensor | None = None  # (B, N) int64, most probable first
    top_logprobs: Tensor | None = None  # (B, N) float32; −inf for tokens a filter removed


# -- penalties ----------------------------------------------------------------------------------
def apply_penalties(logits: Tensor, batch: SamplingBatch, *, generated_counts: Tensor | None,
                    seen: Tensor | None) -> Tensor:
    """Penalised copy of logits (B, V).

    generated_counts: (B, V) how often each token was generated so far (frequency / presence).
    seen: (B, V) bool, token occurs in the prompt or the generated tokens (repetition).
    Rows with default penalties come out unchanged: dividing by 1 and subtracting 0 are exact.
    """
    if batch.any_repetition:
        if seen is None or seen.shape != logits.shape:
            raise ValueError(f"repetition_penalty needs seen of shape {tuple(logits.shape)}, "
                             f"got {None if seen is None else tuple(seen.shape)}")
        r = batch.repetition_penalty[:, None]
        # Dividing a negative logit would raise it; multiplying lowers it, as CTRL intended.
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if batch.any_frequency_presence:
        if generated_counts is None or generated_counts.shape != logits.shape:
            got = None if generated_counts is None else tuple(generated_counts.shape)
            raise ValueError(f"frequency/presence penalties need generated_counts of shape "
                             f"{tuple(logits.shape)}, got {got}")
        counts = generated_counts.to(logits.dtype)
        logits = (logits - counts * batch.frequency_penalty[:, None]
                  - (counts > 0).to(logits.dtype) * batch.presence_penalty[:, None])
    return logits


# -- truncation filters -------------------------------------------------------------------------
# Each takes temperature-scaled logits (B, V) and a per-row parameter (B,), and returns a copy with
# removed tokens at −inf. Rows where mask (B,) is False come back unchanged.
def _remove(logits: Tensor, keep: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None:
        keep = keep | ~mask[:, None]
    return logits.masked_fill(~keep, -math.inf)


def filter_top_k(logits: Tensor, k: Tensor, mask: Tensor | None = None, *,
                 max_k: int | None = None) -> Tensor:
    """Keep each row's k highest logits. max_k (an upper bound on k) narrows the top-k."""
    V = logits.shape[-1]
    width = V if not max_k else min(max_k, V)
    top = logits.topk(width, dim=-1).values  # (B, width), descending
    kth = top.gather(-1, (k.clamp(1, width) - 1)[:, None])  # (B, 1)
    return _remove(logits, logits >= kth, mask)


def filter_top_p(logits: Tensor, p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Keep the smallest set of most probable tokens whose total probability is >= p."""
    ordered = logits.sort(dim=-1, descending=True).values  # (B, V)
    cum = ordered.softmax(dim=-1).cumsum(dim=-1)
    mass_before = torch.nn.functional.pad(cum[:, :-1], (1, 0))  # mass of the more probable tokens
    # At least the top token, also when p underflows to 0 in float32 (mass_before[0] = 0 < p fails).
    n_keep = (mass_before < p[:, None]).sum(dim=-1, keepdim=True).clamp(min=1)
    keep = logits >= ordered.gather(-1, n_keep - 1)
    # A float cumsum can reach 1 before the last token; p = 1 must keep every token.
    return _remove(logits, keep | (p >= 1)[:, None], mask)


def filter_min_p(logits: Tensor, p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Keep tokens whose probability is >= p times the row's largest probability."""
    probs = logits.softmax(dim=-1)
    return _remove(logits, probs >= p[:, None] * probs.amax(dim=-1, keepdim=True), mask)


def filter_typical(logits: Tensor, p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the row's entropy,
    the fewest that hold probability >= p."""
    V = logits.shape[-1]
    logprobs = logits.log_softmax(dim=-1)
    probs = logprobs.exp()
    entropy = -(logprobs * probs).nansum(dim=-1, keepdim=True)  # nansum: −inf · 0 for removed
    gap = (-logprobs - entropy).abs()  # (B, V)
    sorted_gap, order = gap.sort(dim=-1)
    cum = probs.gather(-1, order).cumsum(dim=-1)
    # The first position where the mass reaches p; clamped because p = 1 may never reach it.
    last = (cum < p[:, None]).sum(dim=-1, keepdim=True).clamp(max=V - 1)
    keep = gap <= sorted_gap.gather(-1, last)
    # A float cumsum can also reach 1 early; p = 1 must keep every token.
    return _remove(logits, keep | (p >= 1)[:, None], mask)


_FILTERS: dict[str, Callable[..., Tensor]] = {
    "top_k": filter_top_k, "top_p": filter_top_p, "min_p": filter_min_p,
    "typical": filter_typical}


def warp(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Temperature and each row's truncation filter: the logits every row samples from.
    Greedy rows come back unchanged (their temperature is 1 and they have no filter)."""
    if batch.any_temperature:
        logits = logits / batch.temperature[:, None]
    for name, rows in batch.filter_rows.items():
        param = batch.k if name == "top_k" else batch.p
        options = {"max_k": batch.max_k} if name == "top_k" else {}
        if rows is None:  # every row uses this filter: no gather / scatter
            logits = _FILTERS[name](logits, param, **options)
        else:
            # Only this filter's rows pay for it (a sort of V per row for top_p / typical).
            logits = logits.index_put((rows,), _FILTERS[name](logits[rows], param[rows], **options))
    return logits


# -- drawing ------------------------------------------------------------------------------------
def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Token ids (B,): per row, the first token whose cumulative probability exceeds u · total.
    Never returns a zero-probability token, even when rounding puts u · total at the very end."""
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing even in float
    total = cdf[:, -1:].contiguous()  # (B, 1); searchsorted wants contiguous values
    drawn = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * total, right=True)
    last = torch.searchsorted(cdf, total)  # where the cdf stops rising: the last non-zero token
    return torch.minimum(drawn, last).squeeze(-1)


def _uniforms(batch: SamplingBatch, generators: Sequence[torch.Generator | None],
              device: torch.device) -> Tensor:
    """One u ~ U[0, 1) per random row from its own generator (unseeded if None); 0 for greedy."""
    zero = torch.zeros(1, device=device)
    draws = [zero] * len(batch)
    for i in batch.random_rows:
        # One draw per row, never one batched call: that keeps a row's stream independent of
        # which other rows share the step.
        draws[i] = torch.rand(1, generator=generators[i], device=device)
    return torch.cat(draws)


def sample(logits: Tensor, batch: SamplingBatch, generators: Sequence[torch.Generator | None], *,
           generated_counts: Tensor | None = None, seen: Tensor | None = None,
           num_logprobs: int = 0, want_logprobs: bool = False) -> Sampled:
    """Choose one token per row of logits (B, V); see the module docstring for the semantics.

    generators[i] is row i's generator, on the logits' device (None: unseeded; ignored by greedy).
    logprobs are returned when want_logprobs or num_logprobs > 0; top-N only when num_logprobs > 0.
    """
    B, V = logits.shape
    if len(batch) != B or len(generators) != B:
        raise ValueError(f"logits have {B} rows but batch has {len(batch)} and "
                         f"generators has {len(generators)}")
    if not 0 <= num_logprobs <= min(MAX_LOGPROBS, V):
        raise ValueError(f"num_logprobs must be in [0, {min(MAX_LOGPROBS, V)}], "
                         f"got {num_logprobs}")
    need_logprobs = want_logprobs or num_logprobs > 0

    logits = logits.float()  # bf16 / fp16 logits would round the cumulative sums too coarsely
    if batch.any_penalty:
        logits = apply_penalties(logits, batch, generated_counts=generated_counts, seen=seen)
    if batch.all_greedy and not need_logprobs:
        return Sampled(token_ids=logits.argmax(dim=-1))

    logits = warp(logits, batch)
    if batch.all_greedy:
        token_ids = logits.argmax(dim=-1)
    else:
        u = _uniforms(batch, generators, logits.device)
        token_ids = inverse_cdf(logits.softmax(dim=-1), u)
        if len(batch.random_rows) < B:
            token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), token_ids)
    if not need_logprobs:
        return Sampled(token_ids=token_ids)

    logprobs = logits.log_softmax(dim=-1)  # (B, V)
    out = Sampled(token_ids=token_ids,
                  logprobs=logprobs.gather(-1, token_ids[:, None]).squeeze(-1))
    if num_logprobs:
        out.top_logprobs, out.top_ids = logprobs.topk(num_logprobs, dim=-1)
    return out
