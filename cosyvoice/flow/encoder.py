"""Upsampling causal conformer encoder of the CosyVoice2 flow (tokens -> 2x frame-rate features).

Batched: ``xs`` is right-padded (B, L, C) with per-item ``lens``; every layer only lets valid
positions read valid positions (or the item's own look-ahead context), so an item's output does
not depend on what it is batched with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def chunk_mask(t: int, chunk: int, device=None) -> torch.Tensor:
    """(T, T) bool: i may attend j iff j < (i // chunk + 1) * chunk (chunks aligned at index 0)."""
    i = torch.arange(t, device=device)
    return i[None, :] < ((i // chunk + 1) * chunk)[:, None]


def attn_masks(lens: torch.Tensor, t: int, chunk: int, streaming: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool attention masks: key padding, plus the chunk mask for streaming items."""
    keys = torch.arange(t, device=lens.device)[None, :] < lens[:, None]  # (B, T)
    m = keys[:, None, :].expand(-1, t, -1)
    if chunk > 0 and bool(streaming.any()):
        cm = chunk_mask(t, chunk, lens.device)[None]
        m = torch.where(streaming[:, None, None], m & cm, m)
    return m


def rel_pos_table(t: int, d: int) -> torch.Tensor:
    """(2T-1, d) rows for relative positions T-1 .. -(T-1); interleaved sin/cos."""
    pos = torch.arange(t - 1, -t, -1, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe = torch.zeros(2 * t - 1, d)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class LinearInput(nn.Module):
    """Linear -> LayerNorm(1e-5) -> * sqrt(d)  (keys ``out.0``, ``out.1``)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.scale = math.sqrt(odim)

    def forward(self, x):
        return self.out(x) * self.scale


class RelPosAttention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h, self.dk = h, d // h
        self.linear_q, self.linear_k = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_v, self.linear_out = nn.Linear(d, d), nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, self.dk))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, self.dk))

    def forward(self, x, mask, pos):  # x (B,T,d), mask (B,T,T) bool, pos (2T-1, d)
        b, t, _ = x.shape
        q = self.linear_q(x).view(b, t, self.h, self.dk)
        k = self.linear_k(x).view(b, t, self.h, self.dk).transpose(1, 2)
        v = self.linear_v(x).view(b, t, self.h, self.dk).transpose(1, 2)
        p = self.linear_pos(pos).view(1, -1, self.h, self.dk).transpose(1, 2)  # (1,h,2T-1,dk)
        qu = (q + self.pos_bias_u).transpose(1, 2)
        qv = (q + self.pos_bias_v).transpose(1, 2)
        ac = qu @ k.transpose(-2, -1)
        bd = qv @ p.transpose(-2, -1)  # (B,h,T,2T-1)
        i = torch.arange(t, device=x.device)
        idx = (t - 1) - i[:, None] + i[None, :]  # relative position i-j
        bd = bd.gather(-1, idx.expand(b, self.h, t, t))
        scores = (ac + bd) / math.sqrt(self.dk)
        m = ~mask[:, None]
        scores = scores.masked_fill(m, float("-inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(m, 0.0)
        out = (attn @ v).transpose(1, 2).reshape(b, t, -1)
        return self.linear_out(out)


class FeedForward(nn.Module):
    def __init__(self, d: int, units: int):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d, units), nn.Linear(units, d)

    def forward(self, x):
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Pre-norm layer without macaron / conv module: x += MHA(LN(x)); x += FFN(LN(x))."""

    def __init__(self, d: int, h: int, units: int):
        super().__init__()
        self.self_attn = RelPosAttention(d, h)
        self.feed_forward = FeedForward(d, units)
        self.norm_ff = nn.LayerNorm(d, eps=1e-12)
        self.norm_mha = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, mask, pos):
        x = x + self.self_attn(self.norm_mha(x), mask, pos)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """conv1 (k = lookahead+1) over [x, lookahead frames] -> LeakyReLU(0.01) -> causal conv2 (k3)."""

    def __init__(self, cin: int, ch: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(cin, ch, lookahead + 1)
        self.conv2 = nn.Conv1d(ch, cin, 3)

    def forward(self, xe):  # xe (B, L + lookahead, C): sequence already extended by the look-ahead
        x = xe.transpose(1, 2)
        y = F.leaky_relu(self.conv1(x))
        y = self.conv2(F.pad(y, (2, 0))).transpose(1, 2).contiguous()
        return y + xe[:, : xe.shape[1] - self.lookahead]


class Upsample(nn.Module):
    """Nearest x stride, left pad (k-1), Conv1d(k=stride*2+1)."""

    def __init__(self, ch: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(ch, ch, stride * 2 + 1)

    def forward(self, x):  # (B, C, T)
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(F.pad(x, (self.stride * 2, 0)))


class UpsampleConformerEncoder(nn.Module):
    def __init__(
        self, d=512, heads=8, units=2048, blocks=6, up_blocks=4, lookahead=3, chunk=25, ratio=2
    ):
        super().__init__()
        self.d, self.chunk, self.ratio, self.lookahead = d, chunk, ratio, lookahead
        self.embed = LinearInput(d, d)
        self.pre_lookahead_layer = PreLookahead(d, d, lookahead)
        self.encoders = nn.ModuleList(ConformerLayer(d, heads, units) for _ in range(blocks))
        self.up_layer = Upsample(d, ratio)
        self.up_embed = LinearInput(d, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(d, heads, units) for _ in range(up_blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, xe, lens, has_ctx, streaming):
        """xe: (B, Lmax + lookahead, d) token embeddings, item b holding its L_b tokens followed by
        its look-ahead context tokens at [L_b, L_b + lookahead) if has_ctx[b] (else zero padding is
        used there, after the input layer). lens (B,) = L_b; streaming (B,) bool selects chunk masks.
        Returns (B, ratio*Lmax, d) and the output lengths."""
        b, lx, _ = xe.shape
        lmax = lx - self.lookahead
        pos_idx = torch.arange(lx, device=xe.device)
        xs = self.embed(xe)
        # zero everything after each item's real context (finalize: zero look-ahead padding)
        valid = lens + has_ctx.long() * self.lookahead
        xs = (xs * (pos_idx[None, :] < valid[:, None])[..., None]).contiguous()
        xs = self.pre_lookahead_layer(xs)  # (B, Lmax, d)
        mask = attn_masks(lens, lmax, self.chunk, streaming)
        pos = rel_pos_table(lmax, self.d).to(xs)
        for layer in self.encoders:
            xs = layer(xs, mask, pos)
        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2).contiguous()
        lens2, t2 = lens * self.ratio, lmax * self.ratio
        xs = self.up_embed(xs)
        mask = attn_masks(lens2, t2, self.chunk * self.ratio, streaming)
        pos = rel_pos_table(t2, self.d).to(xs)
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos)
        return self.after_norm(xs), lens2
