"""Upsampling causal conformer encoder of the CosyVoice2 flow (tokens -> 2x frame-rate features).

Batched and incremental: each item's new tokens are right-padded (B, T, C); a :class:`Past` at
token and at frame resolution supplies the keys/values and convolution inputs of the item's earlier
positions (none for a whole-utterance call) and masks padding, so an item's output depends neither
on what it is batched with nor on how its utterance was chunked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.flow.cache import Past
from cosyvoice.fuse import fuse


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
        self.linear_qkv = nn.Linear(d, 3 * d)
        fuse(self, "linear_qkv", {"linear_q": d, "linear_k": d, "linear_v": d})
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(h, self.dk))
        self.pos_bias_v = nn.Parameter(torch.zeros(h, self.dk))

    def forward(self, x, past: Past):  # x (B,T,d) new positions
        b, t, _ = x.shape
        qkv = self.linear_qkv(x).view(b, t, 3, self.h, self.dk)
        q = qkv[:, :, 0]
        k, v = past.kv(self, qkv[:, :, 1:].permute(2, 0, 3, 1, 4))  # (B,h,K,dk): earlier too
        table, idx = past.rel_pos(self.h * self.dk)
        p = self.linear_pos(table.to(x)).view(1, -1, self.h, self.dk).transpose(1, 2)
        qu = (q + self.pos_bias_u).transpose(1, 2)
        qv = (q + self.pos_bias_v).transpose(1, 2)
        ac = qu @ k.transpose(-2, -1)
        bd = qv @ p.transpose(-2, -1)  # (B,h,T,offsets)
        bd = bd.gather(-1, idx[:, None].expand(-1, self.h, -1, -1))  # offset i-j of each pair
        scores = (ac + bd) / math.sqrt(self.dk)
        m = ~past.mask
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

    def forward(self, x, past: Past):
        x = x + self.self_attn(self.norm_mha(x), past)
        return x + self.feed_forward(self.norm_ff(x))


class PreLookahead(nn.Module):
    """conv1 (k = lookahead+1) over [x, lookahead frames] -> LeakyReLU(0.01) -> causal conv2 (k3)."""

    def __init__(self, cin: int, ch: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(cin, ch, lookahead + 1)
        self.conv2 = nn.Conv1d(ch, cin, 3)

    def forward(self, xe, past: Past):  # xe (B, T + lookahead, C): new positions + look-ahead
        x = xe.transpose(1, 2)
        y = F.leaky_relu(self.conv1(x))
        y = self.conv2(past.conv(self.conv2, y, 2)).transpose(1, 2).contiguous()
        return y + xe[:, : xe.shape[1] - self.lookahead]


class Upsample(nn.Module):
    """Nearest x stride, left pad (k-1), Conv1d(k=stride*2+1)."""

    def __init__(self, ch: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(ch, ch, stride * 2 + 1)

    def forward(self, x, past: Past):  # (B, C, T) -> (B, C, stride*T); past at the output rate
        x = F.interpolate(x, scale_factor=float(self.stride), mode="nearest")
        return self.conv(past.conv(self.conv, x, self.stride * 2))


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

    def forward(self, xe, ctx: torch.Tensor, tok: Past, frm: Past):
        """xe: (B, T + lookahead, d) embeddings of each item's new tokens followed by its
        look-ahead context tokens if ctx[b] (else zero padding is used there, after the input
        layer). ``tok``/``frm``: the call's view at token and at frame rate.
        Returns (B, ratio*T, d)."""
        pos_idx = torch.arange(xe.shape[1], device=xe.device)
        xs = self.embed(xe)
        # zero everything after each item's real context (finalize: zero look-ahead padding)
        valid = tok.lens_dev + ctx.long() * self.lookahead
        xs = (xs * (pos_idx[None, :] < valid[:, None])[..., None]).contiguous()
        xs = self.pre_lookahead_layer(xs, tok)  # (B, T, d)
        for layer in self.encoders:
            xs = layer(xs, tok)
        xs = self.up_layer(xs.transpose(1, 2), frm).transpose(1, 2).contiguous()
        xs = self.up_embed(xs)
        for layer in self.up_encoders:
            xs = layer(xs, frm)
        return self.after_norm(xs)
