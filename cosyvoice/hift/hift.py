"""HiFT vocoder (``HiFTGenerator``): mel (80, T) -> wave. CosyVoice2: 24 kHz, T*480 samples,
``SineGen2`` source; CosyVoice-300M (v1): 22.05 kHz, T*256 samples, per-sample ``SineGen`` source
(selected by the yaml's sampling_rate). The v3 causal variant is in :mod:`cosyvoice.hift.causal`.

f0 predictor -> NSF harmonic sine source -> conv-transpose / Snake-resblock stack fed
with the source's STFT -> 16-point iSTFT. Batched: items are right-padded and every convolution input
is masked to the item's own length, so each item's output equals what it gives alone.
Noise: per item, from an optional ``torch.Generator`` (``None`` = zero noise, as in the fixtures).
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from cosyvoice.devices import Calls, CaptureFailed, h2d

if TYPE_CHECKING:
    from cosyvoice.hift.graphs import HiFTGraphs


@dataclass(frozen=True)
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512
    f0_num_class: int = 1
    causal: bool = False  # v3 CausalHiFTGenerator
    conv_pre_look_right: int = 0

    @property
    def samples_per_frame(self) -> int:
        return int(np.prod(self.upsample_rates)) * self.hop_len

    @classmethod
    def from_yaml(cls, cfg: dict[str, Any]) -> HiFTConfig:
        """From the ``hift`` node of a parsed yaml (:func:`cosyvoice.config.read_yaml`)."""
        h = cfg.get("hift", cfg)
        target = str(h.get("_target_", ""))
        causal = target.endswith(".CausalHiFTGenerator")
        if target and not (causal or target.endswith(".HiFTGenerator")):
            raise ValueError(f"vocoder class {target} is not supported by cosyvoice.hift")
        tup = lambda v: tuple(int(x) for x in v)  # noqa: E731
        f0 = h.get("f0_predictor", {})
        ist = h.get("istft_params", {})
        return cls(
            in_channels=int(h.get("in_channels", 80)),
            base_channels=int(h.get("base_channels", 512)),
            nb_harmonics=int(h.get("nb_harmonics", 8)),
            sampling_rate=int(h.get("sampling_rate", 24000)),
            nsf_alpha=float(h.get("nsf_alpha", 0.1)),
            nsf_sigma=float(h.get("nsf_sigma", 0.003)),
            nsf_voiced_threshold=float(h.get("nsf_voiced_threshold", 10)),
            upsample_rates=tup(h["upsample_rates"]),
            upsample_kernel_sizes=tup(h["upsample_kernel_sizes"]),
            n_fft=int(ist.get("n_fft", 16)),
            hop_len=int(ist.get("hop_len", 4)),
            resblock_kernel_sizes=tup(h["resblock_kernel_sizes"]),
            resblock_dilation_sizes=tuple(tup(d) for d in h["resblock_dilation_sizes"]),
            source_resblock_kernel_sizes=tup(h["source_resblock_kernel_sizes"]),
            source_resblock_dilation_sizes=tuple(
                tup(d) for d in h["source_resblock_dilation_sizes"]
            ),
            lrelu_slope=float(h.get("lrelu_slope", 0.1)),
            audio_limit=float(h.get("audio_limit", 0.99)),
            f0_cond_channels=int(f0.get("cond_channels", 512)),
            f0_num_class=int(f0.get("num_class", 1)),
            causal=causal,
            conv_pre_look_right=int(h.get("conv_pre_look_right", 4 if causal else 0)),
        )


def _wn(m: nn.Module) -> nn.Module:
    return weight_norm(m)


def hann_periodic(n: int) -> torch.Tensor:
    """Periodic Hann computed in float64, rounded once to float32."""
    k = np.arange(n, dtype=np.float64)
    return torch.from_numpy(0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)).float()


class Snake(nn.Module):
    """x + sin(alpha x)^2 / alpha. The reciprocal is made when alpha is loaded, not in every
    call, and the scaled sum is one op: four kernels where there were seven, in each of the
    vocoder's 72 activations, which a GPU launches one by one (HiFT runs eagerly)."""

    def __init__(self, ch: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(ch))
        self.register_buffer("inv_alpha", torch.ones(1, ch, 1), persistent=False)
        self.register_load_state_dict_post_hook(Snake._invert)

    def _invert(self, *_: object) -> None:
        with torch.no_grad():
            self.inv_alpha.copy_((1.0 / (self.alpha + 1e-9))[None, :, None])

    def forward(self, x):
        return torch.addcmul(x, self.inv_alpha, torch.sin(x * self.alpha[None, :, None]).pow(2))


class ResBlock(nn.Module):
    def __init__(self, ch: int, k: int, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(
            _wn(nn.Conv1d(ch, ch, k, dilation=d, padding=d * (k - 1) // 2)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            _wn(nn.Conv1d(ch, ch, k, padding=(k - 1) // 2)) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(ch) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(ch) for _ in dilations)

    def forward(self, x, m):
        for c1, c2, a1, a2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + c2(a2(c1(a1(x) * m)) * m)
        return x


class F0Predictor(nn.Module):
    """condnet: 5 x (Conv1d k3 -> ELU); classifier Linear; |.|."""

    def __init__(self, cin: int, cond: int, num_class: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [_wn(nn.Conv1d(cin if i == 0 else cond, cond, 3, padding=1)), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond, num_class)

    def forward(self, mel, m):  # (B, 80, T), m (B, 1, T) -> (B, T)
        x = mel
        for i in range(0, 10, 2):
            x = self.condnet[i + 1](self.condnet[i](x * m))
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """Holds ``l_linear`` (harmonics -> 1, then tanh); the sine generation is in HiFT.source()."""

    def __init__(self, n_harm: int):
        super().__init__()
        self.l_linear = nn.Linear(n_harm + 1, 1)


class HiFT(nn.Module):
    """``HiFTGenerator`` (v2, 24 kHz). Parameter names equal the official ``hift.pt`` keys
    (weight norm as parametrizations until :meth:`fold_weight_norm`)."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.base_channels
        n_harm = cfg.nb_harmonics
        self.m_source = SourceModule(n_harm)
        self.conv_pre = _wn(nn.Conv1d(cfg.in_channels, c, 7, padding=3))
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            self.ups.append(
                _wn(nn.ConvTranspose1d(c // 2**i, c // 2 ** (i + 1), k, u, padding=(k - u) // 2))
            )
        nf = cfg.n_fft + 2
        self._source_path(ResBlock, padded=True)
        self.resblocks = nn.ModuleList()
        for i in range(len(self.ups)):
            ch = c // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = _wn(nn.Conv1d(c // 2 ** len(self.ups), nf, 7, padding=3))
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels, cfg.f0_num_class)
        self.register_buffer("window", hann_periodic(cfg.n_fft), persistent=False)
        self.graphs: HiFTGraphs | None = None  # see enable_graphs
        self.calls = Calls()  # filter calls by how they ran

    def _source_path(self, resblock: type[nn.Module], padded: bool) -> None:
        """Per upsampling stage, the source's STFT brought down to that stage's rate (strided
        convs: the later stages' rates multiplied) and a resblock over it."""
        cfg, nf = self.cfg, self.cfg.n_fft + 2
        rates = list(cfg.upsample_rates)
        self.down_factors = list(itertools.accumulate([1] + rates[::-1][:-1], operator.mul))[::-1]
        self.source_downs, self.source_resblocks = nn.ModuleList(), nn.ModuleList()
        stages = zip(
            self.down_factors,
            cfg.source_resblock_kernel_sizes,
            cfg.source_resblock_dilation_sizes,
            strict=True,
        )
        for i, (u, k, d) in enumerate(stages):
            ch = cfg.base_channels // 2 ** (i + 1)
            pad = u // 2 if padded else 0
            conv = nn.Conv1d(nf, ch, u * 2, u, padding=pad) if u > 1 else nn.Conv1d(nf, ch, 1)
            self.source_downs.append(conv)
            self.source_resblocks.append(resblock(ch, k, d))

    def fold_weight_norm(self) -> HiFT:
        """Replace every weight-norm parametrization by the plain weight g * v / ||v|| (once)."""
        for mod in self.modules():
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        return self

    # ---------------------------------------------------------------- source
    def source(self, f0: torch.Tensor, noise: list[torch.Tensor | None]):
        """f0 (B, T) Hz (zero beyond each item's length) -> excitation (B, 1, T*spf).
        ``noise[b]``: (T_b*spf, n_harm+1) standard normal draws for item b, or None (no noise)."""
        cfg, spf = self.cfg, self.cfg.samples_per_frame
        b, t = f0.shape
        harm = torch.arange(1, cfg.nb_harmonics + 2, device=f0.device, dtype=f0.dtype)
        f0_up = F.interpolate(f0[:, None], scale_factor=float(spf), mode="nearest").transpose(
            1, 2
        )  # (B, L, 1)
        fn = f0_up * harm  # (B, L, H)
        if cfg.sampling_rate == 22050:  # v1 SineGen: per-sample phase, 2*pi*(cumsum(f/sr) mod 1)
            theta = 2 * np.pi * (torch.cumsum(fn / cfg.sampling_rate, dim=1) % 1)
            sines = torch.sin(theta) * cfg.nsf_alpha
            return self._finish_source(f0_up, sines, noise)
        rad = (fn / cfg.sampling_rate) % 1
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1.0 / spf, mode="linear").transpose(
            1, 2
        )
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        phase = F.interpolate(
            phase.transpose(1, 2) * spf, scale_factor=float(spf), mode="linear"
        ).transpose(1, 2)
        sines = torch.sin(phase) * cfg.nsf_alpha
        return self._finish_source(f0_up, sines, noise)

    def _finish_source(self, f0_up, sines, noise):
        cfg = self.cfg
        uv = (f0_up > cfg.nsf_voiced_threshold).float()
        amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        nz = torch.zeros_like(sines)
        for i, n in enumerate(noise):
            if n is not None:
                nz[i, : n.shape[0]] = h2d(n, nz.device)
        sines = sines * uv + amp * nz
        s = torch.tanh(self.m_source.l_linear(sines)).transpose(1, 2)
        return s, sines, uv

    # ---------------------------------------------------------------- filter network
    def decode(self, mel: torch.Tensor, s: torch.Tensor, lens: list[int]) -> torch.Tensor:
        """mel (B, 80, T), source (B, 1, T*spf) -> wave (B, T*spf); item b valid for lens[b]
        frames (host ints: nothing here waits for the device). The filter network between the
        source's STFT and the inverse STFT replays as a CUDA graph where :attr:`graphs` has a
        bucket for the call."""
        spf, t = self.cfg.samples_per_frame, mel.shape[-1]
        s_stft = self._source_stft(s, lens, t * spf // self.cfg.hop_len + 1)
        frames = h2d(lens, mel.device)
        g = self.graphs
        if g is not None and g.fits(mel.shape[0], t):
            try:
                return self._wave(g.run(mel, s_stft, frames), lens, t * spf)
            except CaptureFailed:
                self.graphs = None
        self.calls["dynamic"] += 1
        return self._wave(self.filter(mel, s_stft, frames), lens, t * spf)

    def filter(self, mel: torch.Tensor, s_stft: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The filter network: mel (B, 80, T) and the source's STFT (B, n_fft + 2, F) -> the
        inverse STFT's input (B, n_fft + 2, F), item b valid for ``frames[b]`` (on the device:
        every shape here is the inputs', so it runs at a graph's static shapes). Every
        convolution's input is masked to its item's length."""
        cfg, spf = self.cfg, self.cfg.samples_per_frame
        t, dev = mel.shape[-1], mel.device

        def mask(length_per_frame: float, size: int) -> torch.Tensor:
            valid = (frames.float() * length_per_frame).long()
            return (torch.arange(size, device=dev)[None, :] < valid[:, None]).float()[:, None]

        m = mask(1, t)
        x = self.conv_pre(mel * m)
        up = 1
        nfr = s_stft.shape[-1]
        m_stft = torch.arange(nfr, device=dev) < (frames * spf // cfg.hop_len + 1)[:, None]
        m_stft = m_stft.float()[:, None]
        n_res = len(cfg.resblock_kernel_sizes)
        for i, u in enumerate(cfg.upsample_rates):
            x = F.leaky_relu(x, cfg.lrelu_slope)
            x = self.ups[i](x * m)
            up *= u
            m = mask(up, x.shape[-1])
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")
                m = torch.cat([torch.ones_like(m[..., :1]), m], dim=-1)  # F = T*spf/hop + 1 frames
            si = self.source_downs[i](s_stft * m_stft)
            si = si[..., : x.shape[-1]]
            si = self.source_resblocks[i](si * m, m)
            x = x * m + si
            xs = None
            for j in range(n_res):
                y = self.resblocks[i * n_res + j](x, m)
                xs = y if xs is None else xs + y
            x = xs / n_res
        x = F.leaky_relu(x)
        return self.conv_post(x * m)

    def enable_graphs(self, max_batch: int, capture: bool | None = None) -> None:
        """Replay :meth:`filter` as CUDA graphs for calls of up to ``max_batch`` items
        (:mod:`cosyvoice.hift.graphs`; ``capture=False``: eagerly at the same static shapes,
        to test the padding on a CPU). Call after the model is on its device."""
        from cosyvoice.hift.graphs import HiFTGraphs

        self.graphs = HiFTGraphs(self, max_batch, self.conv_pre.weight.device, self.calls, capture)

    def _source_stft(self, s: torch.Tensor, lens: list[int], nfr: int) -> torch.Tensor:
        """Each item's source over its valid length, as (B, n_fft + 2, nfr) real and
        imaginary parts (zero past its frames)."""
        nfft, hop, spf = self.cfg.n_fft, self.cfg.hop_len, self.cfg.samples_per_frame
        win = self.window.to(s.device)
        out = torch.zeros(s.shape[0], nfft + 2, nfr, device=s.device)
        for i, n in enumerate(lens):
            spec = torch.stft(s[i, 0, : n * spf], nfft, hop, nfft, window=win, return_complex=True)
            out[i, :, : spec.shape[-1]] = torch.cat([spec.real, spec.imag], dim=0)
        return out

    def _wave(self, x: torch.Tensor, lens: list[int], samples: int) -> torch.Tensor:
        """conv_post's log-magnitudes and phases -> (B, samples) audio by the inverse STFT,
        each item over its valid frames."""
        cfg, spf = self.cfg, self.cfg.samples_per_frame
        nfft, hop = cfg.n_fft, cfg.hop_len
        win = self.window.to(x.device)
        nb = nfft // 2 + 1
        mag = torch.exp(x[:, :nb]).clip(max=1e2)
        ph = torch.sin(x[:, nb:])
        spec = torch.complex(mag * torch.cos(ph), mag * torch.sin(ph))
        out = torch.zeros(x.shape[0], samples, device=x.device)
        for i, n in enumerate(lens):
            y = torch.istft(spec[i, :, : n * spf // hop + 1], nfft, hop, nfft, window=win)
            out[i, : y.shape[-1]] = y
        return out.clamp(-cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def inference(
        self,
        mels: list[torch.Tensor],
        cache_sources: list[torch.Tensor | None] | None = None,
        generators: list[torch.Generator | None] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Vocode several mels (80, T_b) at once. Returns per item (speech (T_b*spf,), source
        (T_b*spf,)). ``cache_sources[b]`` overwrites the start of item b's source (streaming);
        ``generators[b]`` draws its noise (None = zero noise)."""
        spf, b = self.cfg.samples_per_frame, len(mels)
        dev = self.conv_pre.weight.device
        lens = [m.shape[-1] for m in mels]
        t = max(lens)
        mel = torch.zeros(b, self.cfg.in_channels, t, device=dev)
        for i, m_ in enumerate(mels):
            mel[i, :, : m_.shape[-1]] = h2d(m_, dev)
        # f0 per item: its classifier amplifies conv reassociation noise (~1e-7 -> ~1e-3 Hz), and
        # per-item shapes keep an item's f0 independent of the batch it is in
        f0 = torch.zeros(b, t, device=dev)
        for i, m_ in enumerate(mels):
            mi = h2d(m_, dev)[None]
            f0[i, : mi.shape[-1]] = self.f0_predictor(mi, torch.ones_like(mi[:, :1]))[0]
        noise = []
        for i in range(b):
            g = generators[i] if generators else None
            if g is None:
                noise.append(None)
                continue
            n = lens[i] * spf
            h = self.cfg.nb_harmonics + 1
            torch.rand(1, h, generator=g, device=g.device)  # initial phases: drawn upstream,
            # without effect (see spec)
            noise.append(torch.randn(n, h, generator=g, device=g.device))
        s, _, _ = self.source(f0, noise)
        for i, c in enumerate(cache_sources or []):
            if c is not None and c.numel():
                s[i, 0, : c.numel()] = c.reshape(-1).to(s)
        y = self.decode(mel, s, lens)
        return [(y[i, : lens[i] * spf], s[i, 0, : lens[i] * spf]) for i in range(b)]


def _normalize_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``generator.``; map legacy ``weight_g``/``weight_v`` to the parametrization spelling."""
    out = {}
    for k, v in sd.items():
        if k.startswith("generator."):
            k = k[len("generator.") :]
        if k.endswith(".weight_g"):
            k = k[: -len("weight_g")] + "parametrizations.weight.original0"
        elif k.endswith(".weight_v"):
            k = k[: -len("weight_v")] + "parametrizations.weight.original1"
        out[k] = v
    return out


def build_hift(cfg: HiFTConfig) -> HiFT:
    """Randomly initialised HiFT (v2) or CausalHiFT (v3, ``cfg.causal``); ``state_dict()`` has the
    official hift.pt layout (parametrized weight norm: ``*.parametrizations.weight.original0/1``)."""
    if cfg.causal:
        from cosyvoice.hift.causal import CausalHiFT

        return CausalHiFT(cfg).eval()
    return HiFT(cfg).eval()


def load_hift_state(m: HiFT, sd: dict[str, torch.Tensor]) -> HiFT:
    """Strict load accepting ``weight_g/_v``, ``parametrizations.weight.original0/1`` or an already
    folded ``weight``; folds weight norm afterwards."""
    sd = _normalize_keys(sd)
    if any(k.endswith(".parametrizations.weight.original0") for k in sd):
        m.load_state_dict(sd, strict=True)
        return m.fold_weight_norm()
    m.fold_weight_norm()
    m.load_state_dict(sd, strict=True)
    return m


def load_hift(model_dir: str | Path, cfg: HiFTConfig | None = None, device="cpu") -> HiFT:
    model_dir = Path(model_dir)
    if cfg is None:
        from cosyvoice.config import load_model_yaml

        cfg = HiFTConfig.from_yaml(load_model_yaml(model_dir)[1])
    sd = torch.load(model_dir / "hift.pt", map_location="cpu", weights_only=True)
    return load_hift_state(build_hift(cfg), sd).to(device).eval()
