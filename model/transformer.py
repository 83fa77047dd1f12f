"""A decoder-only, Llama-style transformer.

token ids → embedding → n_layers × [RMSNorm → attention (RoPE, causal) → +residual,
RMSNorm → SwiGLU MLP → +residual] → RMSNorm → LM head → next-token logits.

Module names follow HF's LlamaForCausalLM (minus its "model." prefix). Two differences serve
speed: q/k/v and gate/up projections are stacked into one matrix each, and projection weights
are stored (in, out); `Transformer.hf_weights` shows every tensor under its HF name and layout,
which is what checkpoints hold (see model/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import Attention
from model.config import ModelConfig
from model.decode_step import FusedDecode
from model.kv_cache import CacheIndex, KVCache, Slots
from model.quantization import Int8Weight, KernelChoice, dense_mm, int8_mm
from model.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """weight · x / √(mean(x²) + eps), one fused op; for bf16 input it accumulates in float32
        and rounds once (HF's LlamaRMSNorm rounds before the weight multiply: a last-bit difference)."""
        weight = self.weight
        if weight.dtype != x.dtype:     # training under bf16 autocast: bf16 activations, float32 gains
            weight = weight.to(x.dtype)
        return torch.rms_norm(x, weight.shape, weight, self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)), over token rows (N, C). Weights stored (in, out) with
    gate and up stacked, as in Attention; checkpoints keep HF's gate_proj / up_proj / down_proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.empty(config.dim, 2 * config.intermediate_size))  # (C, 2I)
        self.w_down = nn.Parameter(torch.empty(config.intermediate_size, config.dim))         # (I, C)
        self.w_gate_up_int8: Int8Weight | None = None     # made at load (model/quantization.py)
        self.w_down_int8: Int8Weight | None = None
        self.kernels: KernelChoice | None = None          # the model's kernel choice, set at load

    def hf_weights(self) -> dict[str, Tensor]:
        """HF's (out, in) gate_proj / up_proj / down_proj weights, as views into ours."""
        gate, up = self.w_gate_up.chunk(2, dim=1)
        return {"gate_proj.weight": gate.t(), "up_proj.weight": up.t(), "down_proj.weight": self.w_down.t()}

    def forward(self, x: Tensor, *, residual: Tensor) -> Tensor:
        """x (N, C) → residual + mlp(x) (N, C)."""
        if (q8 := self.w_gate_up_int8) is not None:
            gate, up = int8_mm(x, self.w_gate_up, q8).chunk(2, dim=-1)   # (N, I) each
            return int8_mm(F.silu(gate) * up, self.w_down, self.w_down_int8, residual)
        gate, up = dense_mm(x, self.w_gate_up, self.kernels).chunk(2, dim=-1)   # (N, I) each
        return dense_mm(F.silu(gate) * up, self.w_down, self.kernels, residual)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None,
                at: CacheIndex | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """x (B·T, C) → x + attention(norm(x)), then + mlp(norm(x)); the residual adds are fused
        into the output projections.

        The parts are called through .forward: nn.Module.__call__'s hook bookkeeping costs about
        a microsecond a call, and a decode step of a small model is ~5 % that (hooks registered
        on a whole Block still run)."""
        attn, mlp = self.self_attn, self.mlp
        x, weights = attn.forward(self.input_layernorm.forward(x), cos, sin, residual=x, mask=mask,
                                  cache=cache, at=at, need_weights=need_weights)
        return mlp.forward(self.post_attention_layernorm.forward(x), residual=x), weights


@dataclass
class ModelOutput:
    logits: Tensor                                          # (B, T, V), or (B, 1, V) with logits_at
    attentions: dict[int, Tensor] = field(default_factory=dict)  # layer → (B, nh, T, S) weights
    hidden: dict[int, Tensor] = field(default_factory=dict)      # layer → (B, T, C) residual after it
    lens_logits: dict[int, Tensor] = field(default_factory=dict)  # layer → (B, T, V) float32, if made


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.lm_head_int8: Int8Weight | None = None       # made at load (model/quantization.py)
        self.kernel_choice = KernelChoice()                # which kernel runs at which batch size (same)
        self.fused_decode: FusedDecode | None = None       # the whole decode step in one native call (same)
        cos, sin = rope_tables(config.max_context, config.head_dim, config.rope_theta)
        # (P, 1, hs): a gather by positions (B, T) gives (B, T, 1, hs), ready to broadcast over heads.
        self.register_buffer("rope_cos", cos[:, None], persistent=False)
        self.register_buffer("rope_sin", sin[:, None], persistent=False)
        self.init_weights()

    def init_weights(self, *, seed: int | None = None, std: float = 0.02) -> None:
        """Normal(0, std) linears and embeddings; output projections scaled by depth (GPT-2).
        Drawn tensor by tensor in HF's layout, so a seed gives the same weights however ours are fused."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.hf_weights().items():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
                continue
            scale = std
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                scale = std / (2 * self.config.n_layers) ** 0.5
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def hf_weights(self) -> dict[str, Tensor]:
        """Every weight under its name in HF's LlamaForCausalLM (less the "model." prefix), in HF's
        order; fused projections appear as their HF parts, views into our stacked matrices. A tied
        head is not listed: it is embed_tokens.weight."""
        weights = {"embed_tokens.weight": self.embed_tokens.weight}
        for i, block in enumerate(self.layers):
            prefix = f"layers.{i}."
            weights[prefix + "input_layernorm.weight"] = block.input_layernorm.weight
            weights |= {prefix + "self_attn." + n: w for n, w in block.self_attn.hf_weights().items()}
            weights[prefix + "post_attention_layernorm.weight"] = block.post_attention_layernorm.weight
            weights |= {prefix + "mlp." + n: w for n, w in block.mlp.hf_weights().items()}
        weights["norm.weight"] = self.norm.weight
        if not self.config.tie_embeddings:
            weights["lm_head.weight"] = self.lm_head.weight
        return weights

    def new_cache(self, max_batch: int, max_context: int | None = None, *,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache in `dtype` (default: the compute dtype)."""
        c = self.config
        return KVCache(c.n_layers, max_batch, c.n_kv_heads, max_context or c.max_context, c.head_dim,
                       dtype=dtype or self.embed_tokens.weight.dtype, device=self.embed_tokens.weight.device)

    def forward(self, tokens: Tensor, *, positions: Tensor | None = None,
                cache: KVCache | None = None, slots: Slots | None = None,
                attn_layers: Collection[int] = (), hidden_layers: Collection[int] = (),
                logits_at: int | Tensor | None = None, lens_logits: bool = False) -> ModelOutput:
        """tokens (B, T) → logits.

        Without a cache: a full causal forward over positions 0 … T-1 (training, recompute).
        With a cache: `positions` (B, T) are each row's absolute positions, increasing along the
        row; their keys/values are written into `slots` (B rows) and each query attends to its
        slot's keys 0 … its position.
        `attn_layers`: layers whose post-softmax weights to return (explicit path there).
        `hidden_layers`: layers whose output, the residual stream after them, to return (for the
        logit lens, `logit_lens`; the last layer's is what the logits are computed from).
        `logits_at`: compute logits at one position per row only — an int for the same position in
        every row (-1: the last), or a (B,) tensor (rows right-padded to different lengths).
        `lens_logits`: where the fused decode step runs, also the logit lens of the `hidden_layers`
        (their `logit_lens`, computed inside the step); elsewhere nothing (the caller computes it).
        """
        B, T = tokens.shape
        fused = self.fused_decode
        if (fused is not None and cache is not None and T == 1 and positions is not None
                and not isinstance(logits_at, Tensor) and fused.fits(B, cache)):
            return ModelOutput(*fused(tokens, positions, cache, slots, attn_layers, hidden_layers, lens_logits))
        cos, sin, mask, at = self._prepare(tokens, positions, cache, slots)
        x = self.embed_tokens(tokens.reshape(B * T))              # (B·T, C): one row per token
        attentions, hidden = {}, {}
        for i, block in enumerate(self.layers):
            x, weights = block(x, cos, sin, mask, cache, at, i in attn_layers)
            if weights is not None:
                attentions[i] = weights
            if i in hidden_layers:
                hidden[i] = x.view(B, T, -1)                   # (B, T, C); later layers make new tensors
        return ModelOutput(self._logits(x.view(B, T, -1), logits_at), attentions, hidden)

    def _prepare(self, tokens: Tensor, positions: Tensor | None, cache: KVCache | None,
                 slots: Slots | None) -> tuple[Tensor, Tensor, Tensor | None, CacheIndex | None]:
        """What every layer shares: RoPE tables for the positions (B, T, 1, hs), the mask (None
        where causal attention needs none) and, with a cache, where keys/values go."""
        B, T = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("the cache path needs explicit positions")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if cache is None:
            return cos, sin, None, None
        kv_len = int(positions.max()) + 1
        if kv_len > cache.max_context:
            raise ValueError(f"position {kv_len - 1} is beyond the cache's max_context={cache.max_context}")
        # No mask where every row's queries are the last T of the kv_len keys (see
        # model/attention.py): a prompt from position 0, or one row's next token.
        mask = None
        if not (kv_len == T or (B == 1 and T == 1)):
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys <= positions.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, S): causal per row
        return cos, sin, mask, cache.index(slots, positions, kv_len)

    def _logits(self, x: Tensor, logits_at: int | Tensor | None) -> Tensor:
        """x (B, T, C) → logits (B, T, V), or (B, 1, V) at `logits_at` (see `forward`)."""
        if isinstance(logits_at, int):
            x = x[:, logits_at].unsqueeze(1)
        elif logits_at is not None:
            x = x[torch.arange(x.shape[0], device=x.device), logits_at].unsqueeze(1)
        x = self.norm(x)
        rows = x.reshape(-1, x.shape[-1])                       # (…, C) → (N, C) rows for the kernels (N may be 0)
        head, shape = self.lm_head.weight.t(), (*x.shape[:-1], self.config.vocab_size)
        if self.lm_head_int8 is not None:
            return int8_mm(rows, head, self.lm_head_int8).view(shape).float()
        if rows.shape[0] <= self.kernel_choice.gemv_max_rows:
            return dense_mm(rows, head, self.kernel_choice).view(shape).float()
        return self.lm_head(x).float()                          # logits leave as float32 for sampling

    def logit_lens(self, hidden: Tensor) -> Tensor:
        """Residual-stream vectors (..., C) → lm_head(final_norm(·)) logits (..., V): what the model
        would predict if it stopped there. On the last layer's output these are the logits."""
        return self._logits(hidden, None)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
