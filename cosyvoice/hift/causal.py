"""CosyVoice3 vocoder (``CausalHiFTGenerator``): causal convolutions with explicit look-ahead
(conv_pre 4 frames, f0 condnet.0 3 frames), float64 f0 predictor, staircase (nearest) sine phase
and position-indexed noise, so a non-final call on mel frames [0, T) yields exactly the first
(T-8)*480 samples of the full-utterance call.

Items of a batch are vocoded one after the other (``inference`` takes lists like the v2 HiFT).
Noise: a per-request :class:`NoiseBuffer` (uniform [0, 1), drawn in fixed blocks from the
request's generator, indexed by absolute sample position) or None = zero noise.

Streaming in linear time (:meth:`CausalHiFT.inference_stream`, one :class:`CausalVocoderState` per
request): an output frame depends on mel frames at most :meth:`CausalHiFT.receptive_field` (R)
frames to its left, except through the f0 predictor (8 frames left) and the sine phase (a running
sum over the whole utterance). So each call vocodes only the last R + new frames, with the f0
context in front and the phase sum carried in float64, and emits the same samples as re-vocoding
the whole mel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.devices import h2d
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
        self.buf = torch.zeros(0, harmonics, device=generator.device)
        self.start = 0  # sample position of buf[0]; earlier blocks were released

    def span(self, a: int, b: int) -> torch.Tensor:
        """Samples [a, b)."""
        if a < self.start:
            raise ValueError(f"noise before sample {self.start} was released (asked from {a})")
        while self.start + self.buf.shape[0] < b:
            block = torch.rand(self.BLOCK, self.h, generator=self.g, device=self.g.device)
            self.buf = torch.cat([self.buf, block])
        return self.buf[a - self.start : b - self.start]

    def take(self, n: int) -> torch.Tensor:
        return self.span(0, n)

    def release(self, before: int) -> None:
        """Forget whole blocks before sample ``before`` (a stream never looks back there), so a
        long request keeps O(1) noise; draws stay in block order, values are unchanged."""
        n = min((before - self.start) // self.BLOCK * self.BLOCK, self.buf.shape[0])  # drawn ones
        if n > 0:
            self.buf, self.start = self.buf[n:].clone(), self.start + n


def _lpad(x, n):
    return F.pad(x, (n, 0)) if n else x


@dataclass
class CausalVocoderState:
    """One request's stream through :meth:`CausalHiFT.inference_stream`: the mel frames still
    needed as left context (R + the f0 context + the held-back frames, not the whole utterance),
    the sine phase summed over the frames before the next window and the frames emitted."""

    noise: NoiseBuffer | None = None
    mel: torch.Tensor | None = None  # (80, n): mel frames [mel_start, mel_start + n)
    mel_start: int = 0
    emitted: int = 0  # speech frames returned so far
    phase: torch.Tensor | None = None  # (H,) float64 phase sum (cycles) over [0, phase_frame)
    phase_frame: int = 0  # first frame of the next window
    finished: bool = False

    @property
    def frames(self) -> int:
        """Mel frames received so far."""
        return self.mel_start + (0 if self.mel is None else self.mel.shape[-1])


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


def _left(rb: CausalResBlock) -> int:
    """Left context of a causal resblock in its own samples."""
    return sum(d * (rb.k - 1) + rb.k - 1 for d in rb.dil)


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
        self._source_path(CausalResBlock, padded=False)
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

    def source_causal(
        self, f0: torch.Tensor, noise: torch.Tensor | None, phase0: torch.Tensor | None = None
    ):
        """f0 (1, T) -> (source (1, 1, T*spf), sines, uv); staircase phase (nearest upsampling).
        ``phase0``: (H,) float64 phase sum (cycles) of the frames before f0[0] when f0 is a
        window of a longer utterance; None = 0."""
        s, sines, uv, _ = self._source(f0, noise, phase0)
        return s, sines, uv

    def _source(self, f0: torch.Tensor, noise: torch.Tensor | None, phase0: torch.Tensor | None):
        """:meth:`source_causal` plus the running phase sums (1, T + 1, H) float64: [:, k] is
        the sum over the frames before f0[k] (what a later window starting there needs)."""
        cfg, spf = self.cfg, self.cfg.samples_per_frame
        harm = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        f0_up = F.interpolate(f0[:, None], scale_factor=float(spf), mode="nearest").transpose(1, 2)
        rad = (f0_up * harm / cfg.sampling_rate) % 1
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / spf, mode="linear").transpose(
            1, 2
        )
        # float64 running sum, as torch's float32 CPU cumsum accumulates: bit-identical there,
        # and a window continues it exactly from the previous window's sum
        if phase0 is None:
            phase0 = torch.zeros(rad.shape[-1], dtype=torch.float64, device=rad.device)
        cum = torch.cumsum(torch.cat([phase0.to(rad.device)[None, None], rad.double()], 1), 1)
        phase = cum[:, 1:].float() * 2 * torch.pi
        phase = F.interpolate(phase.transpose(1, 2) * spf, scale_factor=float(spf), mode="nearest")
        sines = torch.sin(phase.transpose(1, 2)) * cfg.nsf_alpha
        uv = (f0_up > cfg.nsf_voiced_threshold).float()
        if noise is not None:
            amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
            sines = sines * uv + amp * h2d(noise[None, : sines.shape[1]], sines.device)
        else:
            sines = sines * uv
        return torch.tanh(self.m_source.l_linear(sines)).transpose(1, 2), sines, uv, cum

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

    # ------------------------------------------------------------------ streaming in linear time
    def receptive_field(self) -> int:
        """R in mel frames: output frames from w0 + R on depend on the mel only from frame w0 on
        (f0 and the sine phase aside: a stream carries those). Follows the first index of each
        decode tensor of a window [w0, T) that equals the whole-utterance call's (left zero pads
        and the STFT's reflect pad spoil the ones before), then rounds up with 1 frame margin."""
        cfg, n_res = self.cfg, len(self.cfg.resblock_kernel_sizes)
        stft_ok = -(-(cfg.n_fft // 2) // cfg.hop_len)  # first STFT frame of window samples only
        v = 0  # first exact index of x; conv_pre looks only right
        for i, (u, up) in enumerate(zip(cfg.upsample_rates, self.ups, strict=True)):
            v = v * u + up.kernel_size[0] - 1 + (i == len(self.ups) - 1)  # + reflect pad (1, 0)
            d = self.source_downs[i].stride[0]  # left-padded by d - 1 STFT frames
            v = max(v, -(-(stft_ok + d - 1) // d) + _left(self.source_resblocks[i]))
            v += max(_left(rb) for rb in self.resblocks[i * n_res : (i + 1) * n_res])
        v += self.conv_post.kernel_size[0] - 1  # in STFT frames
        first_sample = cfg.hop_len * (v - 1) + cfg.n_fft // 2  # iSTFT overlap-add
        return -(-first_sample // cfg.samples_per_frame) + 1

    def f0_context(self) -> int:
        """Mel frames left of an f0 frame that it depends on (the left-padded condnet convs)."""
        convs = [m for m in self.f0_predictor.condnet if isinstance(m, nn.Conv1d)]
        return sum(c.kernel_size[0] - 1 for c in convs[1:])

    def held_back(self) -> int:
        """Frames a non-final call leaves out: f0 and conv_pre look-ahead + the trimmed frame."""
        return self.f0_predictor.condnet[0].kernel_size[0] - 1 + self.look_right + 1

    @torch.inference_mode()
    def inference_stream(
        self, states: list[CausalVocoderState], mels: list[torch.Tensor], finalize: list[bool]
    ) -> list[torch.Tensor]:
        """Per item: append the new mel frames (80, n) to the request's state and return the new
        speech samples: those past the previous call's end of ``inference_causal`` on all the mel
        so far (non-final calls hold back the last 8 frames). Each call vocodes only the last
        R + new frames, so a stream costs linear time; a final call finishes the state."""
        return [self._stream_one(*a) for a in zip(states, mels, finalize, strict=True)]

    def _stream_one(self, st: CausalVocoderState, mel: torch.Tensor, fin: bool) -> torch.Tensor:
        if st.finished:
            raise ValueError("inference_stream on a finished state")
        st.mel = mel if st.mel is None else torch.cat([st.mel, mel.to(st.mel)], -1)
        end = st.frames if fin else st.frames - self.held_back()
        st.finished = fin
        if end <= st.emitted:  # nothing new to emit yet (or ever, for an empty final call)
            st.mel = None if fin else st.mel
            return torch.zeros(0, device=self.conv_pre.weight.device)
        y, cum = self._window(st, fin)
        out = y[(st.emitted - st.phase_frame) * self.cfg.samples_per_frame :]
        self._slide(st, end, cum)
        st.mel = None if fin else st.mel
        return out

    def _window(self, st: CausalVocoderState, fin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech of frames [phase_frame, end) (the first R of them inexact) and the phase sums
        (T' + 1, H) from frame phase_frame on."""
        spf, m0, skip = self.cfg.samples_per_frame, st.phase_frame, st.phase_frame - st.mel_start
        mel = st.mel.to(self.conv_pre.weight.device)[None]
        f0 = self.f0(mel, fin)[:, skip:]  # the first f0_context frames lack their left context
        n = f0.shape[-1]
        noise = None if st.noise is None else st.noise.span(m0 * spf, (m0 + n) * spf)
        s, _, _, cum = self._source(f0, noise, st.phase)
        y = self.decode_causal(mel[..., skip:] if fin else mel[..., skip : skip + n], s, fin)
        return y[0], cum[0]

    def _slide(self, st: CausalVocoderState, end: int, cum: torch.Tensor) -> None:
        """Advance the state past ``end`` emitted frames: the next window starts R frames
        before it; keep its f0 context of mel and the phase sum up to its first frame."""
        m0 = max(0, end - self.receptive_field())
        st.phase = cum[m0 - st.phase_frame].clone()  # stays on the device: no wait
        start = max(0, m0 - self.f0_context())
        st.mel = st.mel[:, start - st.mel_start :]
        st.mel_start, st.phase_frame, st.emitted = start, m0, end
        if st.noise is not None:
            st.noise.release(m0 * self.cfg.samples_per_frame)
