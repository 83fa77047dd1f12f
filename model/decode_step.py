"""The decode step as one native call: every layer of a model for B rows of one new token each.

`Transformer.forward` hands a decode step here (a KV cache, one token per row, few enough rows)
when the model has a `FusedDecode` — made at load (model/quantization.py) for bf16 and float32
models on a CPU where model/native builds, used up to the rows where it measured faster.
model/native/decode.c computes what the Python path computes, rounding where it rounds; it writes
the KV cache in place and returns what `ModelOutput` holds: float32 logits, and the asked-for
layers' attention probabilities (float32) and outputs (for the logit lens).

What it saves is the Python path's ~150 small ops a step, each a few microseconds: at batch 1 on
the bench model, as long as the weight products themselves.
"""

from __future__ import annotations

import ctypes
from collections.abc import Collection

import torch
from torch import Tensor

from model import native
from model.kv_cache import KVCache, Slots

_ptr, _long = ctypes.c_void_p, ctypes.c_long
SCRATCH = ("x", "xn", "qkv", "att", "gu", "h", "out", "scores", "xq", "xs", "xt", "part")   # decode.c's Step order


class _Mat(ctypes.Structure):
    _fields_ = [("w", _ptr), ("q", _ptr), ("scales", _ptr), ("kn", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("qkv", _Mat), ("o", _Mat), ("gate_up", _Mat), ("down", _Mat)]


class _Model(ctypes.Structure):
    _fields_ = [(name, _long) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate",
                                           "vocab")] + \
               [("eps", ctypes.c_float), ("f32", ctypes.c_int), ("embed", _ptr), ("final_norm", _ptr),
                ("rope_cos", _ptr), ("rope_sin", _ptr), ("head", _Mat), ("layers", ctypes.POINTER(_Layer))]


class _Step(ctypes.Structure):
    _fields_ = [("B", _long), ("tokens", _ptr), ("positions", _ptr), ("slots", _ptr), ("kv", _ptr),
                ("max_batch", _long), ("max_context", _long), ("int8", ctypes.c_int), ("amx", ctypes.c_int),
                ("threads", ctypes.c_int), ("logits", _ptr),
                ("attn", _ptr), ("attn_len", _long), ("attn_layers", _ptr),
                ("hidden", _ptr), ("hidden_layers", _ptr), ("lens", _ptr)] + [(name, _ptr) for name in SCRATCH]


def _mat(dense: Tensor, q8, *, kn: bool = False) -> _Mat:
    """A projection as decode.c reads it: the dense matrix — bf16 (out, in) in memory (native.fits),
    or float32 (in, out) where `kn` — and, if quantised, its int8 copy."""
    return _Mat(dense.data_ptr(), q8.weight.data_ptr() if q8 is not None else None,
                q8.scales.data_ptr() if q8 is not None else None, int(kn))


class FusedDecode:
    """A bf16 model's weights as decode.c's structures (pointers into the model's own tensors, which
    never move after load), and the step's scratch memory, grown to the largest call seen. One call
    at a time (an engine steps its model from one thread). How many rows it takes, and up to how
    many it reads the int8 weights, is the model's KernelChoice (measured at load)."""

    def __init__(self, model):
        c = model.config
        self.model, self.choice = model, model.kernel_choice
        self.dtype = model.embed_tokens.weight.dtype          # bf16, or float32 (then no int8: `supports`)
        self.int8 = getattr(model, "quantization", "none") == "int8"
        f32 = self.dtype == torch.float32
        layers = []
        for block in model.layers:
            attn, mlp = block.self_attn, block.mlp
            layers.append(_Layer(block.input_layernorm.weight.data_ptr(),
                                 block.post_attention_layernorm.weight.data_ptr(),
                                 _mat(attn.w_qkv, attn.w_qkv_int8, kn=f32), _mat(attn.w_o, attn.w_o_int8, kn=f32),
                                 _mat(mlp.w_gate_up, mlp.w_gate_up_int8, kn=f32),
                                 _mat(mlp.w_down, mlp.w_down_int8, kn=f32)))
        self._layers = (_Layer * len(layers))(*layers)
        self._model = _Model(c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.intermediate_size,
                             c.vocab_size, c.norm_eps, int(f32), model.embed_tokens.weight.data_ptr(),
                             model.norm.weight.data_ptr(), model.rope_cos.data_ptr(), model.rope_sin.data_ptr(),
                             _mat(model.lm_head.weight, model.lm_head_int8), self._layers)   # head: (V, C)
        self._scratch: dict[str, Tensor] = {}
        self._scratch_for = (0, 0, 0)
        self._step = _Step()
        self._slot_ids = torch.arange(0)
        self._masks: dict[tuple[int, ...], Tensor] = {}
        self._embed = model.embed_tokens.weight.data_ptr()   # moved (model.to(...)): the pointers are stale
        self.amx = native.amx_available() and not f32     # bf16 projections on AMX tiles, where their shapes fit

    @staticmethod
    def supports(model) -> bool:
        """Whether decode.c can run this model: bf16 weights laid out (out, in), or float32 ones
        (in, out) without int8; hs a multiple of 32, the model and MLP widths multiples of 16."""
        c = model.config
        dtype = model.embed_tokens.weight.dtype
        projections = [w for b in model.layers
                       for w in (b.self_attn.w_qkv, b.self_attn.w_o, b.mlp.w_gate_up, b.mlp.w_down)]
        if dtype == torch.bfloat16:
            laid_out = all(native.fits(w) for w in projections)
        else:
            laid_out = (dtype == torch.float32 and getattr(model, "quantization", "none") == "none"
                        and all(w.is_contiguous() for w in projections))
        return (native.available() and laid_out and model.lm_head.weight.is_contiguous()
                and model.embed_tokens.weight.device.type == "cpu"
                and c.head_dim % 32 == 0 and c.head_dim <= 256 and c.n_heads % c.n_kv_heads == 0
                and c.dim % 16 == 0 and c.intermediate_size % 16 == 0
                and model.rope_cos.dtype == dtype and model.rope_cos.is_contiguous())

    def fits(self, rows: int, cache: KVCache) -> bool:
        return (rows <= self.choice.fused_max_rows and cache.kv.dtype == self.dtype and cache.kv.is_contiguous()
                and self.model.embed_tokens.weight.data_ptr() == self._embed)

    def _step_for(self, rows: int, context: int) -> _Step:
        """The call's structure, its scratch pointers filled in: kept between calls, made anew
        (with larger scratch) when a call needs more rows, context or threads than any before."""
        threads = want = torch.get_num_threads()
        if rows > self._scratch_for[0] or context > self._scratch_for[1] or threads > self._scratch_for[2]:
            c = self.model.config
            rows, context = max(rows, self._scratch_for[0]), max(context, self._scratch_for[1])
            threads = max(threads, self._scratch_for[2])
            width = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
            acts = {"x": c.dim, "xn": c.dim, "att": c.dim, "qkv": width,
                    "gu": 2 * c.intermediate_size, "h": c.intermediate_size, "out": c.vocab_size}
            self._scratch = {name: torch.empty(rows * n, dtype=self.dtype) for name, n in acts.items()}
            self._scratch["scores"] = torch.empty(rows * c.n_heads * context)
            self._scratch["xq"] = torch.empty(rows * max(c.dim, c.intermediate_size), dtype=torch.int16)
            self._scratch["xs"] = torch.empty(rows)
            k_blocks, m_blocks = max(c.dim, c.intermediate_size) // 32 + 1, -(-rows // 16)
            self._scratch["xt"] = torch.empty(k_blocks * m_blocks * 512, dtype=torch.bfloat16)
            widest = max(width, c.dim, 2 * c.intermediate_size) if self.dtype == torch.float32 else 0
            self._scratch["part"] = torch.empty(threads * rows * widest)
            self._scratch_for = (rows, context, threads)
            self._step = _Step(**{name: self._scratch[name].data_ptr() for name in SCRATCH})
        self._step.threads = want
        return self._step

    def _layer_mask(self, layers: Collection[int]) -> Tensor:
        """(L,) uint8: 1 for the layers asked for; kept per set (an engine asks for the same ones step after step)."""
        key = tuple(layers)
        if (mask := self._masks.get(key)) is None:
            if len(self._masks) >= 64:
                self._masks.clear()
            mask = self._masks[key] = torch.tensor([i in layers for i in range(self.model.config.n_layers)],
                                                   dtype=torch.uint8)
        return mask

    def _bind(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Slots) -> tuple[_Step, Tensor, int]:
        """The step structure for this call, capturing nothing; a new logits tensor (B, V) it will
        fill; and the longest row's key count."""
        B = tokens.shape[0]
        kv_len = int(positions.max()) + 1
        if kv_len > cache.max_context:
            raise ValueError(f"position {kv_len - 1} is beyond the cache's max_context={cache.max_context}")
        step = self._step_for(B, cache.max_context)
        if isinstance(slots, slice):
            if slots.start + B > len(self._slot_ids):
                self._slot_ids = torch.arange(slots.start + B)
            slots = self._slot_ids[slots.start: slots.start + B]
        tokens, positions, slots = tokens.reshape(B).contiguous(), positions.reshape(B).contiguous(), slots.contiguous()
        self._inputs = (tokens, positions, slots)            # alive until the call returns
        logits = torch.empty(B, self.model.config.vocab_size)
        step.B, step.tokens, step.positions, step.slots = B, tokens.data_ptr(), positions.data_ptr(), slots.data_ptr()
        step.kv, step.max_batch, step.max_context = cache.kv.data_ptr(), cache.max_batch, cache.max_context
        step.int8 = self.int8 and self.choice.fused_int8_max_rows >= B
        step.amx, step.logits = self.amx, logits.data_ptr()
        step.attn = step.attn_layers = step.hidden = step.hidden_layers = step.lens = None
        return step, logits, kv_len

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache, slots: Slots,
                 attn_layers: Collection[int], hidden_layers: Collection[int], lens: bool = False
                 ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor], dict[int, Tensor]]:
        """tokens and positions (B, 1) → (logits (B, 1, V), attentions, hidden, lens logits):
        model.forward's ModelOutput fields for the same call; with `lens`, the head's float32
        logits (B, 1, V) on each of the hidden layers too (the logit lens, model/logit_lens.py)."""
        c = self.model.config
        B = tokens.shape[0]
        step, logits, kv_len = self._bind(tokens, positions, cache, slots)
        attn = hidden = None
        if attn_layers:
            attn = torch.empty(c.n_layers, B, c.n_heads, kv_len)
            attn_mask = self._layer_mask(attn_layers)
            step.attn, step.attn_len, step.attn_layers = attn.data_ptr(), kv_len, attn_mask.data_ptr()
        if hidden_layers:
            hidden = torch.empty(c.n_layers, B, c.dim, dtype=self.dtype)
            hidden_mask = self._layer_mask(hidden_layers)
            step.hidden, step.hidden_layers = hidden.data_ptr(), hidden_mask.data_ptr()
            if lens:
                lens_logits = torch.empty(c.n_layers, B, c.vocab_size)
                step.lens = lens_logits.data_ptr()
        native.decode_step(self._model, step)
        return (logits.view(B, 1, c.vocab_size),
                {i: attn[i].view(B, c.n_heads, 1, kv_len) for i in attn_layers} if attn_layers else {},
                {i: hidden[i].view(B, 1, c.dim) for i in hidden_layers} if hidden_layers else {},
                {i: lens_logits[i].view(B, 1, c.vocab_size) for i in hidden_layers} if hidden_layers and lens else {})
