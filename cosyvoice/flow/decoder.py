"""Causal U-Net estimator of the CosyVoice2 flow (``CausalConditionalDecoder``) and the Euler CFM
sampler with cosine schedule and classifier-free guidance.

The estimator runs on a call's new frames; a :class:`Past` (one per Euler step) supplies the
keys/values and convolution inputs of earlier frames, so a streaming chunk does not recompute
them (see :mod:`cosyvoice.flow.cache`).

Padding is right of each row's frames, and nothing in this U-Net reads rightwards: its
convolutions are causal, its norms per frame, and attention's bias hides every key past a
row's end. So a frame's output never depends on the padding's values, and the estimator does
not zero them between blocks, as the official one multiplies by the mask before and after
every convolution (~75 kernels per evaluation, 10 evaluations per flow call); its output is
masked once."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.devices import h2d
from cosyvoice.flow.cache import FlowCache, Past
from cosyvoice.fuse import fuse


class CausalConv1d(nn.Conv1d):
    """Conv1d over the (k-1) frames before the input (zeros at the start), none after it."""

    def forward(self, x, past: Past):
        return super().forward(past.conv(self, x, self.kernel_size[0] - 1))


class CausalBlock1D(nn.Module):
    """block = [CausalConv1d(k3), -, LayerNorm over channels, -, Mish]; the official block's
    masks, block(x*m)*m, leave real frames as they are (module docstring)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.ModuleList(
            [CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out), nn.Identity()]
        )

    def forward(self, x, past: Past):
        h = self.block[0](x, past)
        h = self.block[2](h.transpose(1, 2)).transpose(1, 2)
        return F.mish(h)


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x, tproj, past: Past):  # tproj: mlp(time embedding), (B or 1, C)
        h = self.block1(x, past)
        h = h + tproj[:, :, None]
        h = self.block2(h, past)
        return h + self.res_conv(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        fuse(self, "to_qkv", {"to_q": inner, "to_k": inner, "to_v": inner})
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x, past: Past):  # x (B,T,C) new frames
        b, t, _ = x.shape
        qkv = self.to_qkv(x).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, (k, v) = qkv[0], past.kv(self, qkv[1:])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=past.bias(q.dtype))
        return self.to_out[0](o.transpose(1, 2).reshape(b, t, -1))


class GELUProj(nn.Module):
    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, past: Past):
        x = x + self.attn1(self.norm1(x), past)
        return x + self.ff(self.norm3(x))


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def unet_time_terms(unet: nn.Module, t: torch.Tensor) -> list[torch.Tensor]:
    """Each resnet block's projection of the time embedding of t (N,) in a U-Net estimator
    (the first module of each of its levels), (N, C) each, in the order the levels run."""
    temb = unet.time_mlp(sinusoidal_emb(t, unet.cin))
    return [lvl[0].mlp(temb) for lvl in (*unet.down_blocks, *unet.mid_blocks, *unet.up_blocks)]


def sinusoidal_emb(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half = dim // 2
    f = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    e = scale * t[:, None] * f[None, :]
    return torch.cat([e.sin(), e.cos()], dim=-1).to(t.dtype)


class CausalConditionalDecoder(nn.Module):
    """Single-level causal U-Net: down (resnet, transformers, causal conv), mid blocks, up (skip
    concat), final block, 1x1 projection. Inputs (B,80,T) x/mu/cond, mask (B,1,T), t (B,) (or
    its :meth:`time_terms` made already), spks (B,80)."""

    def __init__(
        self, cin=320, cout=80, channels=256, head_dim=64, n_blocks=4, n_mid=12, heads=8, chunk=50
    ):
        super().__init__()
        self.cin, self.chunk = cin, chunk
        tdim = channels * 4
        self.time_mlp = TimestepEmbedding(cin, tdim)

        def level(din):
            blocks = nn.ModuleList(
                TransformerBlock(channels, heads, head_dim) for _ in range(n_blocks)
            )
            return nn.ModuleList([CausalResnetBlock1D(din, channels, tdim), blocks])

        self.down_blocks = nn.ModuleList([level(cin).append(CausalConv1d(channels, channels, 3))])
        self.mid_blocks = nn.ModuleList(level(channels) for _ in range(n_mid))
        self.up_blocks = nn.ModuleList(
            [level(2 * channels).append(CausalConv1d(channels, channels, 3))]
        )
        self.final_block = CausalBlock1D(channels, channels)
        self.final_proj = nn.Conv1d(channels, cout, 1)

    def time_terms(self, t: torch.Tensor) -> list[torch.Tensor]:
        """What the blocks take from the time t (N,) (see :func:`cfm_euler`)."""
        return unet_time_terms(self, t)

    def forward(self, x, mask, mu, t, spks, cond, streaming=None, past: Past | None = None,
                time: list[torch.Tensor] | None = None):  # fmt: skip
        """Inputs (B, C, T) of the new frames. ``past``: the call's view of earlier frames (one
        Euler step's); without it every row is a whole sequence, chunk-masked where
        ``streaming`` (B,) is set. ``time``: :meth:`time_terms` made already (then t is not
        read), each (B or 1, C)."""
        if past is None:
            past = fresh_past(mask, streaming, self.chunk)
        terms = iter(self.time_terms(t) if time is None else time)
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)

        def run(lvl, x):
            x = lvl[0](x, next(terms), past).transpose(1, 2)
            for blk in lvl[1]:
                x = blk(x, past)
            return x.transpose(1, 2)

        x = run(self.down_blocks[0], x)
        skip = x
        x = self.down_blocks[0][2](x, past)
        for lvl in self.mid_blocks:
            x = run(lvl, x)
        x = torch.cat([x, skip], dim=1)
        x = run(self.up_blocks[0], x)
        x = self.up_blocks[0][2](x, past)
        x = self.final_block(x, past)
        return self.final_proj(x) * mask


def fresh_past(mask: torch.Tensor, streaming: torch.Tensor | None, chunk: int) -> Past:
    """A view in which each row of ``mask`` (B, 1, T) is a whole sequence of its own."""
    lens = mask[:, 0].sum(-1).long().tolist()
    stream = [False] * len(lens) if streaming is None else [bool(s) for s in streaming]
    return Past([FlowCache() for _ in lens], [0] * len(lens), lens, stream, chunk,
                device=mask.device)  # fmt: skip


def cosine_t_span(n: int, dtype=torch.float32) -> torch.Tensor:
    t = torch.linspace(0, 1, n + 1, dtype=dtype)
    return 1 - torch.cos(t * 0.5 * torch.pi)


@functools.cache
def euler_times(n: int) -> torch.Tensor:
    """(2, n): the time t and the step dt of each of ``n`` Euler steps over the cosine schedule,
    as upstream's loop makes them: t advances by t += dt with dt = t_span[s + 1] - t, in
    float32 (so t drifts from t_span by a rounding). Made once, on the host: the same float32
    sums as on any device. In float32 also under autocast: in bf16 the first step is 5% short
    (v2's bf16 mel 10x further off). Kept (on the host: never written)."""
    span = cosine_t_span(n)
    t, dt = span[0], span[1] - span[0]
    ts, dts = [], []
    for s in range(1, n + 1):
        ts.append(t)
        dts.append(dt)
        t = t + dt
        if s < n:
            dt = span[s + 1] - t
    return torch.stack([torch.stack(ts), torch.stack(dts)])


class CFM(nn.Module):
    """A flow's ``decoder``: holds the estimator, so its weights sit under ``decoder.estimator.*``
    as in the official ``flow.pt``; the sampler is :func:`cfm_euler`."""

    def __init__(self, est: nn.Module):
        super().__init__()
        self.estimator = est


def cfm_euler(estimator, z, mask, mu, spks, cond, past: Past, n_steps=10, cfg_rate=0.7,
              times: torch.Tensor | None = None):  # fmt: skip
    """Euler ODE from noise z with classifier-free guidance (unconditional rows zero mu/spks/cond).
    ``past`` (2 row groups: conditional, unconditional) is keyed apart for every step.
    ``times``: :func:`euler_times` already on the device (a CUDA graph cannot copy it there).

    What the estimator takes from the time (``time_terms``: its time embedding's projections,
    ~40 small kernels for the U-Net, ~100 for the DiT) is made once for all steps, every row of
    a step sharing its t: per evaluation it was ten times as many launches for ten vectors."""
    if times is None:
        times = h2d(euler_times(n_steps), mu.device)
    ts, dts = times
    if len(ts) != n_steps:
        raise ValueError(f"{len(ts)} Euler times for {n_steps} steps")
    terms = estimator.time_terms(ts)
    b = z.shape[0]
    x = z
    mask2 = torch.cat([mask, mask])
    mu2 = torch.cat([mu, torch.zeros_like(mu)])
    spks2 = torch.cat([spks, torch.zeros_like(spks)])
    cond2 = torch.cat([cond, torch.zeros_like(cond)])
    for s in range(n_steps):
        v = estimator(torch.cat([x, x]), mask2, mu2, None, spks2, cond2, past=past.at(s + 1),
                      time=[term[s : s + 1] for term in terms])  # fmt: skip
        vc, vu = v[:b], v[b:]
        v = (1.0 + cfg_rate) * vc - cfg_rate * vu
        x = x + dts[s] * v
    return x.float()
