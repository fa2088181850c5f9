"""Qwen2 decoder in plain torch with a per-request, readable KV cache.

Batching is *ragged*: the tokens of all requests in a step are packed into one flat
``(N_total, d)`` tensor, so every Linear/MLP runs once for the whole batch with no padding, and
only attention is done per request against that request's own cache. A request's numbers thus
never depend on which other requests share the step (up to matmul blocking noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QwenConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics whatever the compute dtype (matches HF Qwen2 numerics)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class KVCache:
    """Keys/values of one request: ``data[layer, 0=k/1=v, kv_head, position, head_dim]``.

    ``length`` positions are valid. Capacity grows in blocks so a long generation does not copy
    the cache on every step.
    """

    BLOCK = 256

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, dtype, device) -> None:
        self.data = torch.empty(n_layers, 2, n_kv, self.BLOCK, head_dim, dtype=dtype, device=device)
        self.length = 0

    def reserve(self, n_new: int) -> None:
        need = self.length + n_new
        cap = self.data.shape[3]
        if need <= cap:
            return
        new_cap = ((need + self.BLOCK - 1) // self.BLOCK) * self.BLOCK
        shape = list(self.data.shape)
        shape[3] = new_cap
        grown = torch.empty(shape, dtype=self.data.dtype, device=self.data.device)
        grown[:, :, :, : self.length] = self.data[:, :, :, : self.length]
        self.data = grown

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def last_positions(h: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
    """Rows of packed hidden states ``h`` (sum(seg_lens), D) at each segment's last position."""
    idx = torch.tensor(seg_lens, device=h.device).cumsum(0) - 1
    return h[idx]


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (N, d) packed tokens of all requests
        cos: torch.Tensor,  # (N, head_dim)
        sin: torch.Tensor,
        layer: int,
        caches: list[KVCache],
        seg_lens: list[int],
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(n, self.n_kv, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        outs = []
        st = 0
        for cache, ln in zip(caches, seg_lens, strict=True):
            past = cache.length
            kv = cache.data[layer]
            kv[0, :, past : past + ln] = k[st : st + ln].transpose(0, 1)
            kv[1, :, past : past + ln] = v[st : st + ln].transpose(0, 1)
            keys = kv[0, :, : past + ln].unsqueeze(0)  # (1, n_kv, T, hd)
            vals = kv[1, :, : past + ln].unsqueeze(0)
            qi = q[st : st + ln].transpose(0, 1).unsqueeze(0)  # (1, H, ln, hd)
            if ln == 1:
                o = _decode_attention(qi, keys, vals)
            elif past == 0:
                o = F.scaled_dot_product_attention(qi, keys, vals, is_causal=True, enable_gqa=True)
            else:
                # chunk appended after a cache: bottom-right aligned causal mask
                mask = torch.ones(ln, past + ln, dtype=torch.bool, device=x.device).tril(past)
                o = F.scaled_dot_product_attention(qi, keys, vals, attn_mask=mask, enable_gqa=True)
            outs.append(o[0].transpose(0, 1).reshape(ln, -1))
            st += ln
        return self.o_proj(torch.cat(outs, 0) if len(outs) > 1 else outs[0])


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query position against the cache, GQA by grouping query heads per KV head.

    Plain matmul+softmax: for a single query, CPU SDPA on a strided cache view is ~10x slower.
    q (1, H, 1, hd); k/v (1, n_kv, T, hd) -> (1, H, 1, hd).
    """
    _, h, _, hd = q.shape
    n_kv = k.shape[1]
    qg = q.view(1, n_kv, h // n_kv, hd)  # consecutive query heads share a KV head
    scores = (qg @ k.transpose(-1, -2)) * (hd**-0.5)
    return (scores.float().softmax(-1).to(v.dtype) @ v).view(1, h, 1, hd)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x (N, heads, hd), cos/sin (N, hd)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rot = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


class MLP(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2Model(nn.Module):
    """``llm.model.model`` of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        hd = cfg.head_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv, persistent=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_cache(self, dtype=None, device=None) -> KVCache:
        p = self.norm.weight
        return KVCache(
            self.cfg.num_hidden_layers,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            dtype or p.dtype,
            device or p.device,
        )

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            n = max(need, 4096)
            t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.float())
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cache = (emb.cos(), emb.sin())
        cos, sin = self._rope_cache
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def forward(self, x: torch.Tensor, caches: list[KVCache], seg_lens: list[int]) -> torch.Tensor:
        """x: packed input embeddings (N, d) of all requests, in ``caches`` order.

        Appends the new keys/values to every cache and returns the final-normed hidden states
        (N, d). Positions continue from each cache's length.
        """
        positions = torch.cat(
            [
                torch.arange(c.length, c.length + n, device=x.device)
                for c, n in zip(caches, seg_lens, strict=True)
            ]
        )
        cos, sin = self._rope(positions, x.dtype)
        for c, n in zip(caches, seg_lens, strict=True):
            c.reserve(n)
        for i, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            x = x + layer.self_attn(h, cos, sin, i, caches, seg_lens)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for c, n in zip(caches, seg_lens, strict=True):
            c.length += n
        return self.norm(x)
