"""CosyVoice3 vocoder (``CausalHiFTGenerator``): causal convolutions with explicit look-ahead
(conv_pre 4 frames, f0 condnet.0 3 frames), float64 f0 predictor, staircase (nearest) sine phase
and position-indexed noise, so a non-final call on mel frames [0, T) yields exactly the first
(T-8)*480 samples of the full-utterance call.

Items of a batch are vocoded one after the other (``inference`` takes lists like the v2 HiFT).
Noise: a per-request :class:`NoiseBuffer` (uniform [0, 1), drawn in fixed blocks from the
request's generator, indexed by absolute sample position) or None = zero noise.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.hift.hift import (
    F0Predictor,
    HiFT,
    HiFTConfig,
    Snake,
    SourceModule,
    _wn,
    hann_periodic,
)


class NoiseBuffer:
    """Per-request uniform noise (samples, harmonics), extended on demand in fixed blocks so the
    value at a sample position never depends on how the request was chunked."""

    BLOCK = 24000

    def __init__(self, generator: torch.Generator, harmonics: int = 9):
        self.g, self.h = generator, harmonics
        self.buf = torch.zeros(0, harmonics)

    def take(self, n: int) -> torch.Tensor:
        while self.buf.shape[0] < n:
            self.buf = torch.cat([self.buf, torch.rand(self.BLOCK, self.h, generator=self.g)])
        return self.buf[:n]


def _lpad(x, n):
    return F.pad(x, (n, 0)) if n else x


class CausalResBlock(nn.Module):
    def __init__(self, ch: int, k: int, dilations):
        super().__init__()
        self.k, self.dil = k, list(dilations)
        self.convs1 = nn.ModuleList(_wn(nn.Conv1d(ch, ch, k, dilation=d)) for d in dilations)
        self.convs2 = nn.ModuleList(_wn(nn.Conv1d(ch, ch, k)) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(ch) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(ch) for _ in dilations)

    def forward(self, x):
        for i, d in enumerate(self.dil):
            xt = self.convs1[i](_lpad(self.activations1[i](x), d * (self.k - 1)))
            xt = self.convs2[i](_lpad(self.activations2[i](xt), self.k - 1))
            x = xt + x
        return x


class CausalF0Predictor(F0Predictor):
    def __init__(self, cin: int, cond: int, num_class: int = 1):
        super().__init__(cin, cond, num_class)
        for i in range(5):
            self.condnet[2 * i] = _wn(nn.Conv1d(cin if i == 0 else cond, cond, 4 if i == 0 else 3))

    def forward(self, mel, finalize: bool = True):  # (B, 80, T) -> (B, T) or (B, T-3)
        x = F.pad(mel, (0, 3)) if finalize else mel
        for i in range(0, 10, 2):
            x = self.condnet[i + 1](self.condnet[i](x if i == 0 else _lpad(x, 2)))
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))


class CausalHiFT(HiFT):
    """``CausalHiFTGenerator``; parameter names equal the official v3 ``hift.pt`` keys."""

    def __init__(self, cfg: HiFTConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        c, nf = cfg.base_channels, cfg.n_fft + 2
        self.look_right = cfg.conv_pre_look_right
        self.m_source = SourceModule(cfg.nb_harmonics)
        self.conv_pre = _wn(nn.Conv1d(cfg.in_channels, c, self.look_right + 1))
        self.ups = nn.ModuleList(
            _wn(nn.Conv1d(c // 2**i, c // 2 ** (i + 1), k))
            for i, k in enumerate(cfg.upsample_kernel_sizes)
        )
        rates = list(cfg.upsample_rates)
        downs = list(itertools.accumulate([1] + rates[::-1][:-1], operator.mul))[::-1]
        self.down_factors = downs
        self.source_downs, self.source_resblocks = nn.ModuleList(), nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(
                downs,
                cfg.source_resblock_kernel_sizes,
                cfg.source_resblock_dilation_sizes,
                strict=True,
            )
        ):
            ch = c // 2 ** (i + 1)
            self.source_downs.append(nn.Conv1d(nf, ch, u * 2, u) if u > 1 else nn.Conv1d(nf, ch, 1))
            self.source_resblocks.append(CausalResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            CausalResBlock(c // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)
        )
        self.conv_post = _wn(nn.Conv1d(c // 2 ** len(self.ups), nf, 7))
        self.f0_predictor = CausalF0Predictor(
            cfg.in_channels, cfg.f0_cond_channels, cfg.f0_num_class
        )
        self.register_buffer("window", hann_periodic(cfg.n_fft), persistent=False)

    def f0(self, mel: torch.Tensor, finalize: bool) -> torch.Tensor:
        """f0 in float64 (upstream precision; it matters for chunk consistency), then float32."""
        p = self.f0_predictor
        w = {n: t.double() for n, t in p.named_parameters()}
        w.update({n: t.double() for n, t in p.named_buffers()})
        out = torch.func.functional_call(p, w, (mel.double(), finalize))
        return out.float()

    def source_causal(self, f0: torch.Tensor, noise: torch.Tensor | None):
        """f0 (1, T) -> source (1, 1, T*spf); staircase phase (nearest upsampling)."""
        cfg, spf = self.cfg, self.cfg.samples_per_frame
        harm = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        f0_up = F.interpolate(f0[:, None], scale_factor=float(spf), mode="nearest").transpose(1, 2)
        rad = (f0_up * harm / cfg.sampling_rate) % 1
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / spf, mode="linear").transpose(
            1, 2
        )
        phase = torch.cumsum(rad, dim=1) * 2 * torch.pi
        phase = F.interpolate(phase.transpose(1, 2) * spf, scale_factor=float(spf), mode="nearest")
        sines = torch.sin(phase.transpose(1, 2)) * cfg.nsf_alpha
        uv = (f0_up > cfg.nsf_voiced_threshold).float()
        if noise is not None:
            amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
            sines = sines * uv + amp * noise[None, : sines.shape[1]].to(sines)
        else:
            sines = sines * uv
        return torch.tanh(self.m_source.l_linear(sines)).transpose(1, 2), sines, uv

    def decode_causal(self, mel: torch.Tensor, s: torch.Tensor, finalize: bool) -> torch.Tensor:
        cfg = self.cfg
        nb = cfg.n_fft // 2 + 1
        win = self.window.to(mel.device)
        spec = torch.stft(
            s[:, 0], cfg.n_fft, cfg.hop_len, cfg.n_fft, window=win, return_complex=True
        )
        s_stft = torch.cat([spec.real, spec.imag], dim=1)
        if finalize:
            x = self.conv_pre(F.pad(mel, (0, self.look_right)))
        else:
            x = self.conv_pre(mel)
            s_stft = s_stft[..., : -self.look_right * cfg.samples_per_frame // cfg.hop_len]
        n_res = len(cfg.resblock_kernel_sizes)
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = F.interpolate(x, scale_factor=float(u), mode="nearest")
            x = self.ups[i](_lpad(x, k - 1))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            d = self.down_factors[i]
            si = self.source_downs[i](_lpad(s_stft, d - 1) if d > 1 else s_stft)
            x = x + self.source_resblocks[i](si)
            xs = self.resblocks[i * n_res](x)
            for j in range(1, n_res):
                xs = xs + self.resblocks[i * n_res + j](x)
            x = xs / n_res
        x = self.conv_post(_lpad(F.leaky_relu(x), 6))
        mag = torch.exp(x[:, :nb]).clip(max=1e2)
        ph = torch.sin(x[:, nb:])
        y = torch.istft(torch.complex(mag * torch.cos(ph), mag * torch.sin(ph)), cfg.n_fft, cfg.hop_len,
                        cfg.n_fft, window=win)  # fmt: skip
        if not finalize:
            y = y[:, : -cfg.samples_per_frame]
        return y.clamp(-cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def inference_causal(
        self,
        mels: list[torch.Tensor],
        finalize: list[bool],
        noises: list[NoiseBuffer | None] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per item: (speech, source). Non-final items: speech (T-8)*spf, source (T-3)*spf."""
        spf, out = self.cfg.samples_per_frame, []
        dev = self.conv_pre.weight.device
        for i, (mel, fin) in enumerate(zip(mels, finalize, strict=True)):
            mel = mel.to(dev)[None]
            f0 = self.f0(mel, fin)
            nb = noises[i] if noises else None
            noise = None if nb is None else nb.take(f0.shape[-1] * spf)
            s, _, _ = self.source_causal(f0, noise)
            y = self.decode_causal(mel if fin else mel[..., : f0.shape[-1]], s, fin)
            out.append((y[0], s[0, 0]))
        return out
