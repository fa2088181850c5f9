"""Qwen2 decoder in plain torch over a paged, readable KV cache (:mod:`cosyvoice.llm.kv`).

Batching is *ragged*: the tokens of all requests in a step are packed into one flat
``(N_total, d)`` tensor, so every Linear/MLP runs once for the whole batch with no padding;
attention is one masked call per layer for all decode rows (and one for prefill rows) over the
blocks each request owns. A request's numbers never depend on which other requests share the
step (up to matmul blocking noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QwenConfig
from ..devices import linear_add_
from ..fuse import fuse
from .kv import KVCache, KVPool, Layout, gather, write


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One op (on a GPU one kernel, where casts, norm and weight were four: a decode step's
        # time is its kernel count), float32 statistics inside it whatever the compute dtype.
        # HF Qwen2 rounds to bf16 before the weight, this after it: in float32 the same bits,
        # in bf16 within a rounding (a test compares both with a float64 norm).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def last_positions(h: torch.Tensor, seg_lens: list[int]) -> torch.Tensor:
    """Rows of packed hidden states ``h`` (sum(seg_lens), D) at each segment's last position."""
    if all(n == 1 for n in seg_lens):  # decode: every row is a last position
        return h
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
        parts = {"q_proj": self.n_heads * hd, "k_proj": self.n_kv * hd, "v_proj": self.n_kv * hd}
        self.qkv_proj = nn.Linear(d, sum(parts.values()), bias=True)
        fuse(self, "qkv_proj", parts)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # (N, d) packed tokens of all requests
        cos: torch.Tensor,  # (N, head_dim)
        sin: torch.Tensor,
        kv: torch.Tensor,  # this layer of the KV pool
        layout: Layout,
        residual: torch.Tensor,  # (N, d): the output projection adds into it, in place
    ) -> torch.Tensor:
        n, h, h_kv = x.shape[0], self.n_heads, self.n_kv
        # the bias's rows: on a GPU stacked for SDPA once per forward (it would repeat them in
        # every layer); the CPU's matmuls broadcast one row per query over the heads (a
        # stacked prefill bias is 7x the memory)
        stack = 1 if x.device.type == "cpu" else h // h_kv
        qkv = self.qkv_proj(x).view(n, h + 2 * h_kv, self.head_dim)
        rope_(qkv[:, : h + h_kv], cos, sin)  # q and k at once
        write(kv, layout.slots, qkv[:, h:].unflatten(1, (2, h_kv)).transpose(0, 1))
        out = layout.attend(
            qkv[:, :h],
            lambda g: gather(kv, g),
            lambda qp, keys, values, g: attention(qp, keys, values, g.bias(qp.dtype, stack)),
        )
        return linear_add_(self.o_proj, out, residual)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Masked GQA attention for a padded batch: q (B, L, H, hd), k/v (B, T, n_kv, hd) and
    ``bias`` the additive mask (:meth:`Group.bias`), (B, 1, L, T) or with each KV head's g
    query heads' rows stacked, (B, 1, g * L, T) (either is (B, 1, 1, T) when L = 1) ->
    (B, L, H * hd). Query head h reads KV head h // g, g = H / n_kv.

    Both kernels see ``n_kv`` heads of ``g * L`` query rows (each KV head's ``g`` query heads
    stacked as rows), so no key is copied per query head. On the GPU that shape is one SDPA
    call the memory-efficient kernel takes (flash takes no mask, and SDPA's own GQA would fall
    back to the math kernel, expanding K/V to every query head). On the CPU, SDPA with a mask
    is several times slower than two matmuls per KV head, so those are done there."""
    b, lq, h, hd = q.shape
    n_kv = k.shape[2]
    g = h // n_kv
    qg = q.view(b, lq, n_kv, g, hd).permute(0, 2, 3, 1, 4).reshape(b, n_kv, g * lq, hd)
    grouped = _matmuls if q.device.type == "cpu" else _sdpa
    o = grouped(qg, k.transpose(1, 2), v.transpose(1, 2), bias)  # (B, n_kv, g * L, hd)
    return o.view(b, n_kv, g, lq, hd).permute(0, 3, 1, 2, 4).reshape(b, lq, h * hd)


def _sdpa(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """qg (B, n_kv, rows, hd) over k/v (B, n_kv, T, hd) with the additive ``bias``: one call
    (a bias of one row per query is stacked here, a kernel in every layer)."""
    if bias.shape[2] not in (1, qg.shape[2]):
        bias = bias.repeat(1, 1, qg.shape[2] // bias.shape[2], 1)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=bias)


def _matmuls(
    qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """The same as :func:`_sdpa` in two matmuls, a float32 softmax between them."""
    b, n_kv, rows, hd = qg.shape
    scores = (qg @ k.transpose(2, 3)) * (hd**-0.5)  # (B, n_kv, g * L, T)
    if bias.shape[2] not in (1, rows):  # one row per query: broadcast over the g heads
        scores, bias = scores.view(b, n_kv, -1, bias.shape[2], scores.shape[-1]), bias[:, :, None]
    p = (scores.float() + bias).softmax(-1).to(v.dtype)
    return p.view(b, n_kv, rows, -1) @ v


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE of x (N, heads, hd) in place: x * cos + (-x2, x1) * sin, with ``sin``
    (N, hd) as :meth:`Qwen2Model.rope_tables` gives it, its first half negated: the halves
    swapped times it is the rotated half. Three kernels (a swap, a product, a fused
    multiply-add, both in x) where negating, joining, two products and a sum were five: on a GPU
    a decode step costs its kernel count."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # a copy, before x changes
    x.mul_(cos[:, None]).addcmul_(swapped, sin[:, None])


class MLP(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        d, n = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(d, 2 * n, bias=False)
        fuse(self, "gate_up_proj", {"gate_proj": n, "up_proj": n})
        self.down_proj = nn.Linear(n, d, bias=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return linear_add_(self.down_proj, F.silu(gate) * up, residual)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Packed rows x (N, d) -> (N, d), in place in x: the projections add into it."""
        x = self.self_attn(self.input_layernorm(x), cos, sin, kv, layout, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class Qwen2Model(nn.Module):
    """``llm.model.model`` of the checkpoint: embed_tokens, layers, norm."""

    def __init__(self, cfg: QwenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pools: dict[tuple[torch.dtype, torch.device], KVPool] = {}

    def new_cache(self, dtype=None, device=None) -> KVCache:
        return self.kv_pool(dtype, device).new_cache()

    def kv_pool(self, dtype=None, device=None, **kw) -> KVPool:
        """The pool every request of this model shares (one per dtype and device); ``kw``
        (``blocks``, ``fixed``) sizes it when it is first made."""
        p = self.norm.weight
        key = (dtype or p.dtype, torch.device(device or p.device))
        if key not in self._pools:
            c = self.cfg
            self._pools[key] = KVPool(
                c.num_hidden_layers, c.num_key_value_heads, c.head_dim, *key, **kw
            )
        return self._pools[key]

    def rope_tables(self, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 cos/sin tables (n, head_dim) of positions 0..n-1, n > ``max_pos``, the
        first half of sin negated (see :func:`rope_`). Grown
        as new tensors when needed: whoever holds the old ones (CUDA graphs read them at their
        captured address) keeps them valid."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] <= max_pos:
            # in float32 from the config, not from a buffer: .to(bfloat16) would round the
            # frequencies (cos off by up to 0.28 within 300 positions)
            n, hd = max(max_pos + 1, 4096), self.cfg.head_dim
            as_f32 = dict(device=self.norm.weight.device, dtype=torch.float32)
            inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, **as_f32) / hd))
            freqs = torch.outer(torch.arange(n, **as_f32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            sin[:, : hd // 2].neg_()  # as rope_ reads it
            self._rope_cache = (emb.cos(), sin)
        return self._rope_cache

    def rope(
        self, positions: torch.Tensor, max_pos: int, dtype, tables: tuple | None = None
    ) -> tuple[torch.Tensor, ...]:
        """cos/sin (N, head_dim) at ``positions``; ``max_pos`` (known on the host, so no device
        sync) grows the table when needed; ``tables``: these (see :meth:`rope_tables`) instead."""
        cos, sin = self.rope_tables(max_pos) if tables is None else tables
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def forward(self, x: torch.Tensor, caches: list[KVCache], seg_lens: list[int]) -> torch.Tensor:
        """x: packed input embeddings (N, d) of all requests, in ``caches`` order (one pool).

        Appends the new keys/values to every cache and returns the final-normed hidden states
        (N, d). Positions continue from each cache's length.
        """
        pool = caches[0].pool
        layout = pool.layout(caches, seg_lens)
        max_pos = max(c.length + n for c, n in zip(caches, seg_lens, strict=True)) - 1
        h = self.forward_layout(x, pool, layout, max_pos)
        pool.commit(caches, seg_lens)
        return h

    def forward_layout(
        self, x: torch.Tensor, pool: KVPool, layout: Layout, max_pos: int, rope: tuple | None = None
    ):
        """The layers over a prepared layout: no host work, no per-request ops. ``rope``: the
        cos/sin tables to read (default: the model's, grown to ``max_pos``)."""
        cos, sin = self.rope(layout.positions, max_pos, x.dtype, rope)
        x = x.clone()  # the layers add into it: the caller's input stays as it was
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, pool.layer(i), layout)
        return self.norm(x)
