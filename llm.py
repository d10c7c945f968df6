"""
llm.py: a from-scratch Llama-2 / Vicuna v1.5 decoder, its tokenizer, and the Vicuna v1.5 chat template.

This is the language half of the VLM: image features are projected to the LLM width and spliced in as
`inputs_embeds`, so everything here accepts embeddings as well as token ids. The module names match Hugging Face's
`LlamaForCausalLM` exactly, so a HF-format Vicuna directory loads with a strict 1:1 key check and no renaming.

References
- Llama 2: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", arXiv:2307.09288
- RMSNorm: Zhang & Sennrich 2019, arXiv:1910.07467 (computed exactly as HF does: fp32 normalise, cast, then scale)
- RoPE: Su et al. 2021, "RoFormer", arXiv:2104.09864 (HF's "rotate_half" layout, not Meta's interleaved pairs)
- SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202
- GQA: Ainslie et al. 2023, arXiv:2305.13245 (kv head j serves query heads j*R .. j*R+R-1)
- Vicuna v1.5 (lmsys/vicuna-7b-v1.5) and its template: FastChat `vicuna_v1.1`; LLaVA-1.5 (Liu et al. 2023,
  arXiv:2310.03744) `conv_vicuna_v1` + `preprocess_v1` label masking
- HF implementation read for numerics: transformers/models/llama/modeling_llama.py; the tokenizer recipe mirrors
  transformers' `LlamaConverter` (convert_slow_tokenizer.py). Facts collected in ../shared/reference/llama.md.

Glossary (shape letters used in comments)
  B  batch size                    T  query length (tokens fed this call)
  S  key length (cached + T)       D  hidden size (`hidden_size`, 4096 for Vicuna-7B)
  H  query heads                   KV key/value heads (H for plain multi-head attention, fewer for GQA)
  R  H // KV (query heads per kv head)   hd head dim (D // H unless the config says otherwise)
  F  MLP width (`intermediate_size`)      V  vocabulary size

Layout of the file: config + presets, the model (RMSNorm, RoPE, attention, MLP, block, Llama), KV cache and
generation, checkpoint loading, the tokenizer (protobuf reader + `tokenizers` BPE), and the chat template.
"""
import dataclasses
import json
import os
import struct
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

# ----------------------------------------------------------------------------- config


@dataclass
class LLMConfig:
    """Hyper-parameters with Hugging Face's `LlamaConfig` field names (so config.json maps 1:1)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (plain MHA, as in Llama-2 7B)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096  # informational: RoPE is computed for any position
    rms_norm_eps: float = 1e-5  # Llama-2 / Vicuna v1.5; LLaMA-1 / Vicuna <= v1.3 used 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 0
    attn_impl: str = "sdpa"  # "sdpa" (fast path) or "eager" (the readable reference: explicit fp32 softmax)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "LLMConfig":
        """Read a HF config dict, transformers 4.31 style (Vicuna: no rope_theta, `torch_dtype`) or 5.x style
        (`rope_parameters`, `dtype`). Unknown HF keys (architectures, use_cache, ...) are ignored; features we do not
        implement (RoPE scaling, biases, other activations) raise instead of silently giving wrong logits."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'llama'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported (Llama/Vicuna have no biases)")
        # RoPE: 4.31 writes nothing (default 10000) or `rope_theta`; 5.x writes rope_parameters={rope_theta, rope_type}
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported (only the default, unscaled RoPE)")
        theta = rope.get("rope_theta", d.get("rope_theta")) or 10000.0
        eos = d.get("eos_token_id", 2)
        eos = eos[0] if isinstance(eos, list) else eos  # some configs list several; generation uses the first
        known = {f.name for f in fields(cls)} - {"rope_theta", "eos_token_id", "attn_impl"}
        kw = {k: d[k] for k in known if d.get(k) is not None}
        return cls(**kw, rope_theta=float(theta), eos_token_id=eos)

    def to_hf(self, style: str = "5", dtype: torch.dtype = torch.float32) -> dict:
        """The config.json dict HF would write: style "5" (transformers 5.x) or "4.31" (what Vicuna ships)."""
        d = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                 max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
                 tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                 eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, initializer_range=0.02)
        dtype_name = str(dtype).removeprefix("torch.")
        if style == "5":
            d.update(head_dim=self.head_dim, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
                     rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"}, dtype=dtype_name)
        elif style == "4.31":
            if self.rope_theta != 10000.0 or self.head_dim != self.hidden_size // self.num_attention_heads:
                raise ValueError("the 4.31 config style cannot express a non-default rope_theta or head_dim")
            d.update(rope_scaling=None, pretraining_tp=1, torch_dtype=dtype_name, use_cache=True,
                     transformers_version="4.31.0")
        else:
            raise ValueError(f"style must be '5' or '4.31', got {style!r}")
        return d


class _Presets(dict):
    """A dict whose unknown keys raise a KeyError that lists the valid names."""

    def __missing__(self, key):
        raise KeyError(f"unknown LLM preset {key!r}; valid presets: {', '.join(sorted(self))}")


CONFIGS = _Presets(
    # lmsys/vicuna-7b-v1.5 config.json (Llama-2 7B): 6.74B parameters, 13.5 GB in fp16/bf16
    vicuna_7b=LLMConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
    # the CPU default (4.29M parameters, 4.10M of them in the two vocab matrices); train.py swaps vocab_size for
    # the shapes world's 426-token BPE (0.25M then). Width 64 rather than 128: on a 2-core CPU the narrower model
    # takes about twice the optimizer steps in the same minutes and learns about as much per step, so it grounds
    # better for it (README, "train"). Head dim 32, as at width 128.
    toy=LLMConfig(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False),
)

# ----------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, in HF's exact order: normalise in fp32, cast back to the input
    dtype, *then* multiply by the weight (so under fp16 the scale multiply happens in fp16, like Meta's code)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x (B, T, D)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, D) fp32
        return self.weight * x32.to(dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for rotate-half RoPE at the given positions. position_ids (B, T) -> cos, sin (B, T, hd).
    Computed in fp32 (HF disables autocast here too) and only then cast to the activation dtype. Computing them per
    call instead of caching a buffer costs three tiny ops and means nothing is left on the meta device after a
    meta-device load."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)  # (hd/2,)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd): both halves of a head share frequency j
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim. HF checkpoints already had q/k rows permuted into this
    half-split layout by the conversion script, so it must be used as is (never permute again)."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):  # x (B, H, T, hd); cos, sin (B, T, hd)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query key/value heads and RoPE on q and k."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.impl = c.attn_impl
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask=None, is_causal=False, cache=None):
        """x (B, T, D); mask None or bool (B, 1, T, S) with True = may attend; cache: a KVCache layer or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # rotate *before* caching: cached keys are rotated
        if cache is not None:
            k, v = cache.update(k, v)  # (B, KV, S, hd)
        if self.impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv != self.n_head)  # (B, H, T, hd)
        else:
            y = eager_attention(q, k, v, mask, is_causal)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hd)  # (B, T, H*hd)
        return self.o_proj(y)  # (B, T, D)


def eager_attention(q, k, v, mask=None, is_causal=False):
    """The reference path, HF's "eager": explicit scores, softmax in fp32, GQA by repeating kv heads.
    q (B, H, T, hd), k/v (B, KV, S, hd) -> (B, H, T, hd)."""
    R = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(R, dim=1)  # (B, H, S, hd): query head h reads kv head h // R
    v = v.repeat_interleave(R, dim=1)  # (B, H, S, hd)
    att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if is_causal:
        T, S = att.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = att.float().softmax(dim=-1).to(q.dtype)  # (B, H, T, S)
    return att @ v  # (B, H, T, hd)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):  # (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, F) -> (B, T, D)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, c: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask=None, is_causal=False, cache=None):  # x (B, T, D)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _attention_mask(key_mask, T: int, past: int):
    """The mask for T new queries at positions past..past+T-1 over S = past+T keys.
    key_mask: None (no padding) or bool (B, S), False at padding. Returns (mask, is_causal) for SDPA: mask is None
    whenever the plain causal rule is enough (the fast path), else bool (B, 1, T, S)."""
    S = past + T
    if key_mask is None:
        if T == 1:
            return None, False  # one new query may see every cached key
        if past == 0:
            return None, True
    q_pos = torch.arange(past, S, device=key_mask.device if key_mask is not None else None)  # (T,)
    mask = torch.arange(S, device=q_pos.device)[None, :] <= q_pos[:, None]  # (T, S) causal
    if key_mask is None:
        return mask[None, None], False
    mask = mask[None, None] & key_mask[:, None, None, :]  # (B, 1, T, S)
    # A padding query (left padding) would see no key at all; softmax over nothing is NaN, so let every query see
    # itself. Real queries never see padding keys, so their outputs are unaffected (HF does the same).
    mask[:, :, torch.arange(T, device=q_pos.device), q_pos] = True
    return mask, False


def turn_isolation(turn_ids):
    """Several single-turn samples packed into one row, sharing a prefix (BOS, image, system prompt).
    turn_ids (B, T) ints: 0 on the shared prefix, which must come first, k >= 1 on every token of turn k (and on its
    right padding). Returns (mask bool (B, 1, T, T), position_ids (B, T)) for Llama.forward: a token sees the prefix
    and the earlier tokens of its own turn, never another turn, and each turn's positions restart right after the
    prefix, so every turn's logits are exactly those of a conversation holding that turn alone."""
    B, T = turn_ids.shape
    j = torch.arange(T, device=turn_ids.device)  # (T,)
    causal = j[None, :] <= j[:, None]  # (T, T) query row, key column
    key_turn, query_turn = turn_ids[:, None, :], turn_ids[:, :, None]  # (B, 1, T), (B, T, 1)
    mask = causal[None] & ((key_turn == 0) | (key_turn == query_turn))  # (B, T, T)
    first = torch.cat([torch.ones_like(turn_ids[:, :1], dtype=torch.bool),
                       turn_ids[:, 1:] != turn_ids[:, :-1]], dim=1)  # (B, T) first token of a turn (or prefix)
    start = torch.where(first, j, torch.zeros_like(j)).cummax(dim=1).values  # (B, T) where each token's turn began
    n_prefix = (turn_ids == 0).sum(dim=1, keepdim=True)  # (B, 1)
    position_ids = torch.where(turn_ids == 0, j.expand(B, T), n_prefix + j - start)  # (B, T)
    return mask[:, None], position_ids  # (B, 1, T, T), (B, T)


class KVCache:
    """Per-layer key/value buffers preallocated for the whole generation (no torch.cat per step).
    k, v (B, KV, S_max, hd); `update` writes the new T positions and returns views of the filled prefix."""

    def __init__(self, B, n_kv, S_max, hd, dtype, device):
        self.k = torch.empty(B, n_kv, S_max, hd, dtype=dtype, device=device)
        self.v = torch.empty(B, n_kv, S_max, hd, dtype=dtype, device=device)
        self.len = 0

    def update(self, k, v):  # k, v (B, KV, T, hd)
        s, T = self.len, k.shape[2]
        self.k[:, :, s:s + T] = k
        self.v[:, :, s:s + T] = v
        self.len = s + T
        return self.k[:, :, :s + T], self.v[:, :, :s + T]  # (B, KV, S, hd)


class Llama(nn.Module):
    """LlamaForCausalLM with HF's parameter names: model.embed_tokens, model.layers.{i}.{self_attn,mlp,...},
    model.norm, lm_head (shared with embed_tokens when tie_word_embeddings)."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = c = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList([Block(c) for _ in range(c.num_hidden_layers)]),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):  # from_pretrained builds on meta: nothing to init
            self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # HF initializer_range

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", attn_impl="sdpa"):
        """A HF-format Llama/Vicuna directory -> Llama in eval mode (see _load_pretrained below)."""
        return _load_pretrained(cls, path, dtype, device, attn_impl)

    # -- inputs

    def embed(self, input_ids):
        """input_ids (B, T) -> token embeddings (B, T, D). The VLM splices image features between these rows."""
        return self.model.embed_tokens(input_ids)

    def _inputs(self, input_ids, inputs_embeds, attention_mask):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, D)")
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
                raise ValueError(f"input_ids must be integer (B, T), got {input_ids.dtype} {tuple(input_ids.shape)}")
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got "
                                 f"[{input_ids.min().item()}, {input_ids.max().item()}]")
            x = self.embed(input_ids)  # (B, T, D)
        else:
            x = inputs_embeds
            if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be (B, T, {self.config.hidden_size}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        if attention_mask is None:
            return x, None
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be (B, T) = {(B, T)}, got {tuple(attention_mask.shape)}")
        key_mask = attention_mask.to(device=x.device, dtype=torch.bool)  # (B, T)
        if not key_mask.any(-1).all():
            raise ValueError("attention_mask has a row with no real token")
        return x, (None if key_mask.all() else key_mask)

    @staticmethod
    def _positions(key_mask, B, T, device):
        """Positions 0..len-1 of each row's real tokens: plain arange without padding, else cumsum of the mask, which
        is right for left padding (generation) and right padding alike (pads get junk positions; nobody reads them)."""
        if key_mask is None:
            return torch.arange(T, device=device).expand(B, T)  # (B, T)
        return (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    # -- the network

    def _trunk(self, x, rope, mask, is_causal, caches=None, hidden_states=None):
        """x (B, T, D), rope = (cos, sin) each (B, T, hd) -> final-normed hidden states (B, T, D)."""
        cos, sin = rope
        for i, layer in enumerate(self.model.layers):
            if hidden_states is not None:
                hidden_states.append(x)
            x = layer(x, cos, sin, mask, is_causal, None if caches is None else caches[i])
        x = self.model.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)  # HF convention: the last entry is taken after the final norm
        return x

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, output_hidden_states=False,
                position_ids=None):
        """input_ids (B, T) or inputs_embeds (B, T, D); attention_mask (B, T) 1 = real token, 0 = padding (right
        padding as in LLaVA training; left padding works too), or a bool (B, 1, T, T) mask, True = may attend, for
        a custom pattern such as `turn_isolation`'s; position_ids (B, T) for RoPE (default: from the mask). Returns
        logits (B, T, V), or (logits, hidden_states) with hidden_states a list of n_layers+1 tensors (B, T, D): the
        embeddings, each layer's output, and the last one after the final RMSNorm (as HF's output_hidden_states)."""
        custom = attention_mask is not None and attention_mask.dim() == 4
        x, key_mask = self._inputs(input_ids, inputs_embeds, None if custom else attention_mask)
        B, T, _ = x.shape
        if custom:
            if tuple(attention_mask.shape) != (B, 1, T, T) or attention_mask.dtype != torch.bool:
                raise ValueError(f"a 4-D attention_mask must be bool (B, 1, T, T) = {(B, 1, T, T)}, got "
                                 f"{attention_mask.dtype} {tuple(attention_mask.shape)}")
            mask, is_causal = attention_mask.to(x.device), False
        else:
            mask, is_causal = _attention_mask(key_mask, T, past=0)
        if position_ids is None:
            position_ids = self._positions(key_mask, B, T, x.device)  # (B, T)
        elif tuple(position_ids.shape) != (B, T):
            raise ValueError(f"position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}")
        hs = [] if output_hidden_states else None
        rope = rope_cos_sin(position_ids.to(x.device), self.config.head_dim, self.config.rope_theta,
                            x.dtype)  # (B, T, hd) each
        x = self._trunk(x, rope, mask, is_causal, hidden_states=hs)
        logits = self.lm_head(x)  # (B, T, V)
        return (logits, hs) if output_hidden_states else logits

    # -- generation

    @torch.inference_mode()
    def generate(self, input_ids=None, inputs_embeds=None, attention_mask=None, max_new_tokens=32,
                 eos_token_id=None, temperature=0.0, top_p=1.0, generator=None):
        """Autoregressive decoding with a KV cache. Prompts of different lengths go in LEFT-padded with an
        attention_mask (B, T); each row's positions come from its mask, so padding changes nothing.
        Greedy when temperature == 0, else sampling at that temperature with nucleus (top-p) filtering.
        Returns new token ids (B, T_new), T_new <= max_new_tokens (stops early once every row has emitted
        eos_token_id; rows that finished earlier are filled with eos)."""
        x, key_mask = self._inputs(input_ids, inputs_embeds, attention_mask)
        if key_mask is not None and not key_mask[:, -1].all():
            raise ValueError("generate needs LEFT padding: attention_mask[:, -1] must be 1 for every row")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        B, T, _ = x.shape
        c = self.config
        caches = [KVCache(B, c.num_key_value_heads, T + max_new_tokens, c.head_dim, x.dtype, x.device)
                  for _ in range(c.num_hidden_layers)]
        full_mask = None  # (B, T + max_new_tokens): padding stays masked, generated tokens are always real
        if key_mask is not None:
            full_mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=x.device)
            full_mask[:, :T] = key_mask
        positions = self._positions(key_mask, B, T, x.device)  # (B, T)
        # one RoPE table for every position this call can reach; each step then just indexes it
        cos_t, sin_t = rope_cos_sin(torch.arange(T + max_new_tokens, device=x.device)[None], c.head_dim,
                                    c.rope_theta, x.dtype)  # (1, T + max_new_tokens, hd) each
        mask, is_causal = _attention_mask(key_mask, T, past=0)
        h = self._trunk(x, (cos_t[0, positions], sin_t[0, positions]), mask, is_causal, caches)  # (B, T, D)
        logits = self.lm_head(h[:, -1])  # (B, V): only the last position is needed
        next_pos = positions[:, -1:] + 1  # (B, 1)
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out = []
        for step in range(max_new_tokens):
            tok = _pick(logits, temperature, top_p, generator)  # (B,)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            out.append(tok)
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            S = T + step + 1
            mask = None if full_mask is None else full_mask[:, None, None, :S]  # (B, 1, 1, S)
            pos = next_pos + step  # (B, 1)
            h = self._trunk(self.embed(tok[:, None]), (cos_t[0, pos], sin_t[0, pos]), mask, False, caches)  # (B, 1, D)
            logits = self.lm_head(h[:, -1])  # (B, V)
        return torch.stack(out, dim=1)  # (B, T_new)


def _pick(logits, temperature: float, top_p: float, generator=None):
    """logits (B, V) -> token ids (B,): argmax, or a sample from the top-p nucleus at the given temperature."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)  # (B, V)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(-1, descending=True)  # (B, V)
        # drop a token when the tokens strictly more likely than it already cover top_p (the top one always stays)
        drop = p_sorted.cumsum(-1) - p_sorted > top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        choice = torch.multinomial(p_sorted, 1, generator=generator)  # (B, 1), index into the sorted order
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- loading HF checkpoints

# Layouts in the order we look for them (an index beats a single file; safetensors beat pickles).
WEIGHT_LAYOUTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                  "pytorch_model.bin")
LEGACY_SUFFIX = "rotary_emb.inv_freq"  # fp32 RoPE buffers that Llama-2-era checkpoints (Vicuna) still carry


def _weight_files(d):
    """-> (layout file name, list of weight file paths, {key: file} from an index or None)."""
    for name in WEIGHT_LAYOUTS:
        path = os.path.join(d, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return name, [path], None
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a valid weight index (need JSON with a 'weight_map'): {e}") from None
        files = []
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(d, shard)):
                raise FileNotFoundError(f"{path} names shard {shard!r}, which does not exist in {d}")
            files.append(os.path.join(d, shard))
        return name, files, {k: os.path.join(d, v) for k, v in weight_map.items()}
    raise FileNotFoundError(f"{d}: no weights found (looked for {', '.join(WEIGHT_LAYOUTS)})")


class _WeightFile:
    """Lazy view of one weight file: `shapes` {key: shape} without reading tensor data, `get(key, dtype, device)` ->
    the tensor in the wanted dtype. Memory: when the dtype already matches, tensors stay memory-mapped views of the
    file (no copy at all; pages come in as they are first touched). When a conversion is needed (Vicuna's fp16 ->
    bf16/fp32), reading through the map would leave the source pages resident next to the converted copy, so
    safetensors are read with plain file reads one tensor at a time, and for pickles (which only torch.load can
    parse) each converted source's pages are handed back to the kernel with madvise(MADV_DONTNEED)."""

    ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}

    def __init__(self, path):
        self.path = path
        if path.endswith(".safetensors"):
            try:
                self._f = safe_open(path, framework="pt")  # validates the header against the file size
                self.shapes = {k: tuple(self._f.get_slice(k).get_shape()) for k in self._f.keys()}
                with open(path, "rb") as f:  # header: u64 length, then JSON {key: {dtype, shape, data_offsets}}
                    n = struct.unpack("<Q", f.read(8))[0]
                    self._header, self._data_start = json.loads(f.read(n)), 8 + n
            except Exception as e:  # safetensors raises its own error types; name the file, keep the reason
                raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        else:
            self._mmapped = True
            try:
                self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                if "zip" not in str(e).lower() or _is_zip(path):  # a damaged new-style file: say so
                    raise ValueError(f"{path}: cannot read PyTorch weight file (truncated or corrupt?): {e}") from None
                try:  # a pre-1.6 (non-zip) pickle cannot be memory-mapped; read it whole
                    self._sd, self._mmapped = torch.load(path, map_location="cpu", weights_only=True), False
                except Exception as e2:
                    raise ValueError(f"{path}: cannot read PyTorch weight file: {type(e2).__name__} {e2}") from None
            if not isinstance(self._sd, dict) or not all(isinstance(v, torch.Tensor) for v in self._sd.values()):
                raise ValueError(f"{path}: expected a flat dict of tensors (a HF state dict)")
            self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}

    def get(self, key, dtype, device):
        if hasattr(self, "_sd"):  # pickle, memory-mapped by torch.load
            src = self._sd[key]
            out = src.to(device=device, dtype=dtype)
            if self._mmapped and out.data_ptr() != src.data_ptr():
                _drop_pages(src)  # only for file-backed memory: dropping anonymous pages would zero them
            return out
        info = self._header[key]
        src_dtype = self.ST_DTYPES[info["dtype"]]
        if src_dtype == dtype:
            return self._f.get_tensor(key).to(device)  # memory-mapped, no copy on CPU
        a, b = info["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + a)
            f.readinto(buf.numpy())
        return buf.view(src_dtype).reshape(info["shape"]).to(device=device, dtype=dtype)


def _is_zip(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _drop_pages(t):
    """Tell the kernel we are done with the file-backed pages under `t` (a tensor from a private, read-only file
    mapping made by torch.load(mmap=True)): they are dropped from our RSS and would be re-read from disk if touched
    again, so this is always safe for such mappings. Linux only; elsewhere it is a no-op."""
    if not hasattr(os, "sysconf") or os.uname().sysname != "Linux":
        return
    import ctypes
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-t.data_ptr() // page) * page  # whole pages inside the tensor only
    end = (t.data_ptr() + t.nbytes) // page * page
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4 = MADV_DONTNEED


def _check_state_dict(expected: dict, found: dict, where: str, optional=()):
    """Strict key/shape check before anything is loaded. expected {key: shape}; found {key: (shape, file)}.
    Raises one ValueError listing the first few missing / unexpected / mis-shaped keys with counts."""
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [f"{k} (in {os.path.basename(found[k][1])})" for k in found if k not in expected]
    misshaped = [f"{k}: checkpoint {list(found[k][0])} in {os.path.basename(found[k][1])}, model {list(expected[k])}"
                 for k in expected if k in found and tuple(found[k][0]) != tuple(expected[k])]
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            problems.append(f"{len(items)} {what}: " + "; ".join(items[:5]) + (" ..." if len(items) > 5 else ""))
    if problems:
        raise ValueError(f"{where} does not match the model config: " + " | ".join(problems))


def _parse_dtype(dtype, cfg: dict):
    if dtype == "auto":  # the dtype the checkpoint says it was saved in
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = getattr(torch, dtype)
    return dtype


def _load_pretrained(cls, path, dtype=torch.float32, device="cpu", attn_impl="sdpa"):
    """Llama.from_pretrained. Load a HF-format Llama/Vicuna directory: config.json plus model.safetensors,
    sharded safetensors + index, or pytorch_model*.bin (+ index). dtype: a torch dtype, its name, or "auto" (the
    config's). Peak memory stays near one copy of the weights: the model is built on the meta device (no random
    init), every tensor comes from its file on its own (memory-mapped, or read and converted when the dtype differs,
    see _WeightFile), and is *assigned* into the module instead of copied. A 7B checkpoint in bf16 needs ~14 GB."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON: {e}") from None
    config = dataclasses.replace(LLMConfig.from_hf(cfg, cfg_path), attn_impl=attn_impl)  # re-validated
    dtype = _parse_dtype(dtype, cfg)
    layout, files, index = _weight_files(path)

    # pass 1: headers only (key names and shapes), then the strict check
    wfiles = [_WeightFile(p) for p in files]
    found = {}  # key -> (shape, file)
    for wf in wfiles:
        for k, shape in wf.shapes.items():
            if not k.endswith(LEGACY_SUFFIX):
                found[k] = (shape, wf.path)
    if index is not None:
        for k, p in index.items():
            if not k.endswith(LEGACY_SUFFIX) and found.get(k, (None, p))[1] != p:
                where = "another shard" if k in found else "no shard"
                raise ValueError(f"{os.path.join(path, layout)} puts {k!r} in {os.path.basename(p)}, "
                                 f"but it is in {where}")
    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = config.tie_word_embeddings
    # a tied checkpoint may or may not repeat lm_head.weight (HF leaves it out); both are fine
    _check_state_dict(expected, found, f"{path} ({layout})", optional=("lm_head.weight",) if tied else ())

    # pass 2: one tensor at a time: read, convert if needed, keep; each file is released once done
    sd = {}
    while wfiles:
        wf = wfiles.pop(0)
        for k in wf.shapes:
            if k in found and found[k][1] == wf.path:
                sd[k] = wf.get(k, dtype, device)
        del wf
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if tied:  # assign made two separate Parameters; share one again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()



# ----------------------------------------------------------------------------- tokenizer
# Vicuna ships only the sentencepiece `tokenizer.model` (no tokenizer.json). We read that protobuf ourselves and
# rebuild the exact same BPE in the `tokenizers` library (llama.md section 4), so neither sentencepiece nor
# transformers is needed.

SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


def _varint(buf, i):
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def _pb_fields(buf):
    """Iterate a protobuf message as (field_number, value): varints as int, 64/32-bit as raw bytes,
    length-delimited as bytes. That is all of the wire format sentencepiece uses."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, value


def read_sentencepiece_model(path):
    """Parse a sentencepiece ModelProto. Returns (pieces [(piece, score, type)], trainer {field: int},
    normalizer {field: value}). Field numbers from sentencepiece_model.proto: ModelProto 1 pieces, 2 trainer_spec,
    3 normalizer_spec; SentencePiece 1 piece, 2 score (float32), 3 type (default NORMAL)."""
    with open(path, "rb") as f:
        buf = f.read()
    pieces, trainer, normalizer = [], {}, {}
    try:
        for field, value in _pb_fields(buf):
            if field == 1:
                piece, score, kind = "", 0.0, SP_NORMAL
                for f2, v2 in _pb_fields(value):
                    if f2 == 1:
                        piece = v2.decode("utf-8")
                    elif f2 == 2:
                        score = struct.unpack("<f", v2)[0]
                    elif f2 == 3:
                        kind = v2
                pieces.append((piece, score, kind))
            elif field == 2:
                trainer = {f2: v2 for f2, v2 in _pb_fields(value)}
            elif field == 3:
                normalizer = {f2: v2 for f2, v2 in _pb_fields(value)}
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a valid sentencepiece model: {e}") from None
    if not pieces:
        raise ValueError(f"{path}: not a valid sentencepiece model (no pieces)")
    return pieces, trainer, normalizer


def tokenizer_from_sentencepiece(path, legacy=False, add_bos_token=True, add_eos_token=False):
    """Build a `tokenizers.Tokenizer` identical to Llama's from a sentencepiece BPE `tokenizer.model`.
    legacy=False is Vicuna v1.5's setting (tokenizer_config.json): Metaspace pre-tokenizer with prepend_scheme
    "first", so "</s>USER" gives the single token "USER" as LLaVA's training saw. legacy=True is meta-llama's
    tokenizer.json (Prepend + Replace normalizer)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces, trainer, normalizer = read_sentencepiece_model(path)
    if trainer.get(3, 1) != 2:  # TrainerSpec.model_type: 1 UNIGRAM (default), 2 BPE
        raise ValueError(f"{path}: only sentencepiece BPE models (Llama's) are supported, "
                         f"model_type is {trainer.get(3, 1)}")
    if normalizer.get(2):
        raise ValueError(f"{path}: a precompiled normalization charsmap (NFKC) is not supported; Llama has none")
    if normalizer.get(4, 1):
        raise ValueError(f"{path}: remove_extra_whitespaces=true is not supported; Llama sets it false")
    dummy_prefix = bool(normalizer.get(3, 1))
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    ids = {kind: [i for i, (_, _, t) in enumerate(pieces) if t == kind] for kind in (SP_UNKNOWN, SP_CONTROL)}

    def special_id(field, default):  # TrainerSpec 40-42: unk/bos/eos ids (int32 varints)
        return trainer.get(field, default)

    unk, bos, eos = (pieces[special_id(f, d)][0] for f, d in ((40, 0), (41, 1), (42, 2)))
    # Merges: every split of a normal piece into two normal pieces, ranked by the merged piece's score (higher
    # first), ties by (left id, right id): this reproduces HF's Llama merges list exactly (llama.md section 4).
    normal = {p for p, _, t in pieces if t == SP_NORMAL}
    merges = []
    for piece, score, kind in pieces:
        if kind != SP_NORMAL:
            continue
        for j in range(1, len(piece)):
            left, right = piece[:j], piece[j:]
            if left in normal and right in normal:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=bool(trainer.get(35, 0))))
    # control/unknown pieces are special: "</s>" inside text becomes the eos id (the chat template relies on it)
    tok.add_special_tokens([AddedToken(pieces[i][0], special=True, normalized=False)
                            for i in ids[SP_UNKNOWN] + ids[SP_CONTROL]])
    user = [AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == SP_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    if legacy:
        steps = ([normalizers.Prepend("▁")] if dummy_prefix else []) + [normalizers.Replace(" ", "▁")]
        tok.normalizer = normalizers.Sequence(steps)
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if dummy_prefix
                                                     else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    single = (f"{bos}:0 " if add_bos_token else "") + "$A:0" + (f" {eos}:0" if add_eos_token else "")
    pair = single + (f" {bos}:1" if add_bos_token else "") + " $B:1" + (f" {eos}:1" if add_eos_token else "")
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return tok


def load_tokenizer(path):
    """A directory (or a tokenizer.json / tokenizer.model file) -> `tokenizers.Tokenizer`. tokenizer.json wins when
    present; otherwise tokenizer.model is converted, honouring tokenizer_config.json's `legacy` (default False, as
    Vicuna v1.5), `add_bos_token` (default True) and `add_eos_token` (default False). Encoding adds BOS like Llama."""
    from tokenizers import Tokenizer

    if os.path.isfile(path):
        d, names = os.path.dirname(path), [os.path.basename(path)]
    elif os.path.isdir(path):
        d, names = path, ["tokenizer.json", "tokenizer.model"]
    else:
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    for name in names:
        file = os.path.join(d, name)
        if not os.path.isfile(file):
            continue
        if name.endswith(".json"):
            try:
                return Tokenizer.from_file(file)
            except Exception as e:
                raise ValueError(f"{file}: cannot load tokenizer.json: {e}") from None
        opts = {}
        cfg_file = os.path.join(d, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
            opts = {k: bool(cfg[k]) for k in ("legacy", "add_bos_token", "add_eos_token") if cfg.get(k) is not None}
        return tokenizer_from_sentencepiece(file, **opts)
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model")


# ----------------------------------------------------------------------------- Vicuna v1.5 chat template
# FastChat "vicuna_v1.1" == LLaVA conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
#   "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
# BOS comes from the tokenizer, not the text. The generation prompt ends in "ASSISTANT:" with no trailing space.

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IGNORE_INDEX = -100  # label value that cross_entropy(ignore_index=-100) skips (HF / LLaVA convention)


def _system_prefix(system):
    return system + " " if system else ""


def prompt_text(question: str, system: str = SYSTEM_PROMPT) -> str:
    """The single-turn inference prompt: '{system} USER: {question} ASSISTANT:'."""
    return f"{_system_prefix(system)}USER: {question} ASSISTANT:"


def tokenize_conversation(tokenizer, turns, system: str = SYSTEM_PROMPT):
    """turns [(user, assistant), ...] -> (input_ids list[int], labels list[int]); see tokenize_turns."""
    return tokenize_turns(tokenizer, turns, system)[:2]


def tokenize_turns(tokenizer, turns, system: str = SYSTEM_PROMPT):
    """turns [(user, assistant), ...] -> (input_ids, labels, user_labels, turn_ids), four lists of the same length.

    The whole conversation is rendered and tokenized once (as LLaVA's preprocess_v1 does, so "</s>USER" tokenizes
    exactly as at training time), and labels copy input_ids only on tokens that overlap an answer: from the space
    after "ASSISTANT:" (Llama's "▁A" carries it) through the answer's "</s>". Everything else, BOS, system prompt,
    "USER: ...", "ASSISTANT:", is IGNORE_INDEX. user_labels are the opposite within the turns: input_ids on
    "USER: {question} ASSISTANT:" (for an optional language-model loss on the questions), IGNORE_INDEX on BOS, the
    system prompt and the answers. turn_ids: 0 on BOS and the system prompt, k on every token of turn k (1-based),
    what `turn_isolation` masks by. Works with any tokenizers.Tokenizer in which "</s>" is one token; BOS "<s>" is
    put first whether or not the tokenizer's post-processor adds it."""
    if not turns:
        raise ValueError("turns must hold at least one (user, assistant) pair")
    bos_id, eos_id = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    if bos_id is None or eos_id is None:
        raise ValueError("the tokenizer needs '<s>' and '</s>' tokens")
    text, spans, starts = _system_prefix(system), [], []
    for user, answer in turns:
        starts.append(len(text))
        text += f"USER: {user} ASSISTANT:"
        start = len(text)  # the separator space belongs to the answer's first token
        text += f" {answer}</s>"
        spans.append((start, len(text)))
    enc = tokenizer.encode(text)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if not ids or ids[0] != bos_id:
        ids, offsets = [bos_id] + ids, [(0, 0)] + offsets
    labels, user_labels, turn_ids = [IGNORE_INDEX] * len(ids), [IGNORE_INDEX] * len(ids), [0] * len(ids)
    span_i, turn = 0, 0
    for i, (a, b) in enumerate(offsets):
        if i == 0 or b <= a:  # BOS, and anything else the post-processor added (empty offsets)
            turn_ids[i] = turn
            continue
        while turn < len(starts) and b > starts[turn]:  # a token reaching into turn k's text belongs to turn k
            turn += 1
        turn_ids[i] = turn
        while span_i < len(spans) and a >= spans[span_i][1]:
            span_i += 1
        if span_i < len(spans) and b > spans[span_i][0]:
            labels[i] = ids[i]
        elif turn:
            user_labels[i] = ids[i]
    if sum(1 for i, l in zip(ids, labels) if l == eos_id) != len(turns):
        raise ValueError("the tokenizer does not turn each '</s>' in the text into the single token "
                         f"id {eos_id}; add '</s>' to it as a special token")
    return ids, labels, user_labels, turn_ids
