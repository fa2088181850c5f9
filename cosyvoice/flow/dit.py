"""DiT estimator of the CosyVoice3 flow (``CausalMaskedDiffWithDiT``): AdaLN-zero transformer
blocks over [x, cond, mu, spks], causal conv position embedding, partial rotary embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.flow.cache import Past
from cosyvoice.flow.decoder import fresh_past, sinusoidal_emb
from cosyvoice.fuse import fuse


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.time_mlp(sinusoidal_emb(t, self.freq_dim))


class CausalConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, k: int = 31, groups: int = 16):
        super().__init__()
        self.k = k
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, k, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, k, groups=groups), nn.Mish())

    def forward(self, x, past: Past):  # (B, T, C), causal: each conv reads k-1 earlier frames
        x = x.transpose(1, 2)
        x = self.conv1(past.conv(self.conv1, x, self.k - 1))
        x = self.conv2(past.conv(self.conv2, x, self.k - 1))
        return x.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(dim)

    def forward(self, x, cond, mu, spks, past: Past):  # (B, T, C) each, spks (B, C)
        h = self.proj(torch.cat([x, cond, mu, spks[:, None].expand(-1, x.shape[1], -1)], dim=-1))
        return self.conv_pos_embed(h, past) + h


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        """Absolute positions (B, T) -> angles (B, T, dim), interleaved pairs."""
        f = pos.type_as(self.inv_freq)[..., None] * self.inv_freq
        return torch.stack([f, f], dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first freqs.shape[-1] channels of x (B, T, C) in interleaved pairs (float32)."""
    rd = freqs.shape[-1]
    dt = x.dtype
    r, rest = x[..., :rd].float(), x[..., rd:]
    x1, x2 = r.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-x2, x1], dim=-1).flatten(-2)
    r = r * freqs.cos() + rot * freqs.sin()
    return torch.cat([r.to(dt), rest], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner)
        fuse(self, "to_qkv", {"to_q": inner, "to_k": inner, "to_v": inner})
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x, past: Past, freqs):  # x (B, T, C) new frames, freqs (B, T, rot)
        b, t, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, -1)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        q = q.view(b, t, self.heads, -1).transpose(1, 2)
        kv = torch.stack((k, v)).view(2, b, t, self.heads, -1).transpose(2, 3)
        k, v = past.kv(self, kv)  # keys are kept rotated at their own positions
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=past.bias(q.dtype))
        o = self.to_out[0](o.transpose(1, 2).reshape(b, t, -1))
        return o.masked_fill(~past.valid[..., None], 0.0)


class AdaLNZero(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * n)

    def forward(self, c):
        return self.linear(F.silu(c)).chunk(
            self.linear.out_features // self.linear.in_features, dim=-1
        )


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class FF(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(dim * mult, dim))  # fmt: skip

    def forward(self, x):
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = AdaLNZero(dim, 6)
        self.attn = Attention(dim, heads, dim_head)
        self.ff = FF(dim, ff_mult)

    def time_terms(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Its modulation by the time embedding c (N, dim): shift, 1 + scale and gate of the
        attention's and the feed-forward's inputs, (N, dim) each."""
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.attn_norm(c)
        return [sh_a, 1 + sc_a, g_a, sh_m, 1 + sc_m, g_m]

    def forward(self, x, terms: list[torch.Tensor], past: Past, freqs):
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = (term[:, None] for term in terms)
        n = _ln(x) * sc_a + sh_a
        x = x + g_a * self.attn(n, past, freqs)
        n = _ln(x) * sc_m + sh_m
        return x + g_m * self.ff(n)


class DiT(nn.Module):
    def __init__(self, dim=1024, depth=22, heads=16, dim_head=64, ff_mult=2, mel_dim=80, mu_dim=80,
                 spk_dim=80, out_channels=80, chunk=50):  # fmt: skip
        super().__init__()
        self.chunk = chunk
        self.time_embed = TimestepEmbedding(dim)
        self.input_embed = InputEmbedding(mel_dim, mel_dim * 2 + mu_dim + spk_dim, dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, heads, dim_head, ff_mult) for _ in range(depth)
        )
        self.norm_out = AdaLNZero(dim, 2)
        self.proj_out = nn.Linear(dim, out_channels)

    def time_terms(self, t: torch.Tensor) -> list[torch.Tensor]:
        """What the blocks take from the time t (N,): each block's six modulations and the
        output norm's 1 + scale and shift, (N, dim) each (see :func:`cfm_euler`)."""
        c = self.time_embed(t)
        scale, shift = self.norm_out(c)
        return [*(x for blk in self.transformer_blocks for x in blk.time_terms(c)), 1 + scale,
                shift]  # fmt: skip

    def forward(self, x, mask, mu, t, spks, cond, streaming=None, past: Past | None = None,
                time: list[torch.Tensor] | None = None):  # fmt: skip
        """Inputs (B, C, T) of the new frames; ``past`` and ``time`` as for the U-Net
        estimator."""
        if past is None:
            past = fresh_past(mask, streaming, self.chunk)
        terms = self.time_terms(t) if time is None else time
        h = self.input_embed(
            x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks, past
        )
        freqs = self.rotary_embed(past.positions)
        for i, blk in enumerate(self.transformer_blocks):
            h = blk(h, terms[6 * i : 6 * i + 6], past, freqs)
        scale, shift = terms[-2][:, None], terms[-1][:, None]
        h = _ln(h) * scale + shift
        return self.proj_out(h).transpose(1, 2)
