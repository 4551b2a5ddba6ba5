"""The Llama-style decoder: Llama 2/3.x, SmolLM2, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm).

One definition serves training, generation and export, so it is written export-first:
fixed-shape KV-cache buffers updated at `input_pos`, no data-dependent Python branches,
plain tensor ops that torch.export, ONNX, ExecuTorch and Core ML all capture.

Parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so a
checkpoint loads by name and LoRA adapters carry PEFT's key names. This file knows nothing of
LoRA: `ondevice_lora.lora.apply_lora` swaps the `nn.Linear` layers afterwards. Training on
PyTorch swaps in leaner autograd versions of a few steps (`training_ops.use_training_ops`), which
override the small methods below (`RMSNorm.forward`, `Attention.rotate`/`attend`, `MLP.activate`).

    model = Model(ModelArgs.from_hf_config(json.load(open("config.json"))))
    logits = model(tokens)                     # (B, T, vocab), full causal attention
    model.setup_cache(max_batch=1, max_seq_len=512)
    logits = model(prompt, input_pos=torch.arange(prompt.shape[1]))   # prefill
    logits = model(next_token, input_pos=torch.tensor([n]))           # one-token decode
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int  # MLP intermediate size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=lambda: {"rope_type": "default"})
    max_seq_len: int = 2048  # longest position the RoPE tables cover
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama's `attention_bias`
    o_bias: bool = False  # Llama's `attention_bias` also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Map a Hugging Face `config.json` dict onto our arguments (v4 and v5 spellings)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act={cfg['hidden_act']!r} (only silu)")
        # transformers v5 keeps theta and scaling in `rope_parameters`; v4 in two fields.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_type={rope['rope_type']!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        n_heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type == "llama",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference does; matters once activations are bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear or Llama 3.x long-context scaling."""
    # fp32 throughout, exactly as the reference computes it, so RoPE tables match bit for bit.
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    scaling = args.rope_scaling
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_medium, blended, inv_freq)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hd); cos/sin: (B or 1, 1, T, hd). HF's "rotate half" layout, not interleaved.
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Fixed-shape key/value buffers; `update` writes T new positions in place."""

    def __init__(self, max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: (T,), k/v: (B, n_kv, T, hd) -> full caches (B, n_kv, max_seq, hd)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, cos, sin, mask, input_pos: Optional[torch.Tensor]):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, max_seq, hd)
            k, v = k[:B], v[:B]
        y = self.attend(q, k, v, mask)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def rotate(self, x, cos, sin):
        return apply_rope(x, cos, sin)

    def attend(self, q, k, v, mask):
        return repeated_kv_attention(q, k, v, mask)


def repeated_kv_attention(q, k, v, mask):
    """Grouped-query attention as every runtime takes it: each KV head is repeated for the
    n_heads / n_kv_heads query heads it serves. mask None: plain causal (the fast SDPA path)."""
    repeat = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(repeat, dim=1)
    v = v.repeat_interleave(repeat, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(self.activate(self.gate_proj(x), self.up_proj(x)))

    def activate(self, gate, up):
        return F.silu(gate) * up  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """The transformer body; named `model` inside `Model` to match Hugging Face's keys."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.init_rope()

    def tie_weights(self):
        if self.args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self):
        """(Re)compute the RoPE tables; they are derived, never loaded from a checkpoint."""
        positions = torch.arange(self.args.max_seq_len, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(self.args))  # (max_seq, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    # -- KV cache -------------------------------------------------------------------------
    def setup_cache(self, max_batch: int, max_seq_len: int, dtype: torch.dtype = torch.float32):
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.args.max_seq_len} positions")
        for layer in self.model.layers:
            a = self.args
            layer.self_attn.kv_cache = KVCache(max_batch, a.n_kv_heads, max_seq_len, a.head_dim, dtype)

    def drop_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @property
    def cache_len(self) -> Optional[int]:
        cache = self.model.layers[0].self_attn.kv_cache
        return None if cache is None else cache.k_cache.shape[2]

    # -- forward --------------------------------------------------------------------------
    def _positions_and_mask(self, tokens, input_pos, segment_ids):
        """RoPE positions (B or 1, T) and attention mask (None means plain causal)."""
        T = tokens.shape[1]
        if input_pos is not None:  # cached: attend to every filled cache slot up to our position
            slots = torch.arange(self.cache_len, device=tokens.device)
            mask = slots[None, :] <= input_pos[:, None]  # (T, max_seq)
            return input_pos[None, :], mask[None, None]
        if segment_ids is None:
            return torch.arange(T, device=tokens.device)[None, :], None
        # Packed sequences: positions restart and attention stays inside each segment.
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = causal & same  # (B, T, T)
        # Segments are contiguous, so a token's position in its segment is the number of earlier
        # tokens it may attend to (a row count of the mask; no cummax, which is outside core ATen
        # and so outside ExecuTorch's training export).
        return mask.sum(-1) - 1, mask[:, None]  # positions (B, T), mask (B, 1, T, T)

    def hidden_states(self, tokens, input_pos=None, segment_ids=None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim), before the LM head."""
        positions, mask = self._positions_and_mask(tokens, input_pos, segment_ids)
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        cos = self.rope_cos[positions][:, None].to(x.dtype)  # (B or 1, 1, T, hd)
        sin = self.rope_sin[positions][:, None].to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.model.norm(x)

    def forward(self, tokens, input_pos=None, segment_ids=None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab).

        input_pos (T,): positions to write in the KV cache (needs `setup_cache`).
        segment_ids (B, T): packed examples; tokens attend only inside their own segment.
        """
        return self.lm_head(self.hidden_states(tokens, input_pos, segment_ids))
