"""CosyVoice-300M (v1) flow (``MaskedDiffWithXvec``): conformer encoder (full attention),
``InterpolateRegulator`` (50 Hz tokens -> 22050/256 Hz frames), non-causal U-Net estimator, Euler
CFM with per-call noise and the streaming flow cache (z and mu of prompt + last 34 frames).

Requests are processed one at a time (the U-Net's GroupNorm spans the whole sequence, so padding
would change results); each call's noise comes from the request's generator, or is given."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.flow.decoder import (
    CFM,
    TimestepEmbedding,
    TransformerBlock,
    cfm_euler,
    fresh_past,
    unet_time_terms,
)
from cosyvoice.flow.encoder import ConformerLayer, LinearInput

OVERLAP_FRAMES = 34  # int(20 / 50 * 22050 / 256): mel frames of the 20 overlap tokens


@dataclass(frozen=True)
class FlowV1Config:
    vocab_size: int = 4096
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    input_frame_rate: int = 50
    enc_size: int = 512
    heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    est_in_channels: int = 320
    est_channels: tuple[int, ...] = (256, 256)
    est_head_dim: int = 64
    est_n_blocks: int = 4
    est_num_mid_blocks: int = 12
    est_num_heads: int = 8
    cfg_rate: float = 0.7
    n_timesteps: int = 10
    sample_rate: int = 22050
    hop: int = 256

    @classmethod
    def from_yaml(cls, cfg: dict) -> FlowV1Config:
        f = cfg.get("flow", cfg)
        enc, est = f["encoder"], f["decoder"]["estimator"]
        cfm = f["decoder"].get("cfm_params", {})
        cfm = cfm.get("content", cfm) if isinstance(cfm, dict) else {}
        return cls(
            vocab_size=int(f["vocab_size"]), input_size=int(f["input_size"]),
            output_size=int(f["output_size"]), spk_embed_dim=int(f["spk_embed_dim"]),
            input_frame_rate=int(f.get("input_frame_rate", 50)), enc_size=int(enc["output_size"]),
            heads=int(enc.get("attention_heads", 4)), linear_units=int(enc.get("linear_units", 2048)),
            num_blocks=int(enc.get("num_blocks", 6)), est_in_channels=int(est["in_channels"]),
            est_channels=tuple(int(c) for c in est["channels"]),
            est_head_dim=int(est.get("attention_head_dim", 64)), est_n_blocks=int(est.get("n_blocks", 1)),
            est_num_mid_blocks=int(est.get("num_mid_blocks", 2)), est_num_heads=int(est.get("num_heads", 4)),
            cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
            sample_rate=int(cfg.get("sample_rate", 22050)) if "flow" in cfg else 22050,
        )  # fmt: skip

    def mel_len(self, n_tok: int) -> int:
        return int(n_tok / self.input_frame_rate * self.sample_rate / self.hop)


class ConformerEncoder(nn.Module):
    def __init__(self, idim, d, heads, units, blocks):
        super().__init__()
        self.d = d
        self.embed = LinearInput(idim, d)
        self.encoders = nn.ModuleList(ConformerLayer(d, heads, units) for _ in range(blocks))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x):  # (1, T, idim), full attention
        x = self.embed(x)
        past = fresh_past(x.new_ones(1, 1, x.shape[1]), None, 0)
        for layer in self.encoders:
            x = layer(x, past)
        return self.after_norm(x)


class InterpolateRegulator(nn.Module):
    def __init__(self, ch: int = 80, n: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(n):
            layers += [nn.Conv1d(ch, ch, 3, 1, 1), nn.GroupNorm(1, ch), nn.Mish()]
        layers.append(nn.Conv1d(ch, ch, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, h_prompt, h, mel_len1: int, mel_len2: int):  # (1, T, C) each -> (1, C, T)
        def interp(x, n):
            return F.interpolate(x.transpose(1, 2).contiguous(), size=n, mode="linear")

        if h.shape[1] > 40:
            o = OVERLAP_FRAMES
            parts = [
                interp(h[:, :20], o),
                interp(h[:, 20:-20], mel_len2 - 2 * o),
                interp(h[:, -20:], o),
            ]
            g = torch.cat(parts, dim=2)
        else:
            g = interp(h, mel_len2)
        if h_prompt.shape[1] > 0:
            g = torch.cat([interp(h_prompt, mel_len1), g], dim=2)
        return self.model(g)


class Block1D(nn.Module):
    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish()
        )

    def forward(self, x, mask):
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    def __init__(self, dim, dim_out, time_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_dim, dim_out))
        self.block1, self.block2 = Block1D(dim, dim_out), Block1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x, mask, tproj):  # tproj: mlp(time embedding), (B or 1, C)
        h = self.block1(x, mask) + tproj[:, :, None]
        return self.block2(h, mask) + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x):
        return self.conv(x)


class Upsample1D(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x):
        return self.conv(x)


class ConditionalDecoder(nn.Module):
    """Matcha-style U-Net: down levels (resnet, transformers, downsample or conv), mid blocks,
    up levels with skip concat, final block + 1x1 projection."""

    def __init__(
        self, cin=320, cout=80, channels=(256, 256), head_dim=64, n_blocks=4, n_mid=12, heads=8
    ):
        super().__init__()
        self.cin = cin
        tdim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cin, tdim)

        def level(din, dout, sampler):
            tb = nn.ModuleList(TransformerBlock(dout, heads, head_dim) for _ in range(n_blocks))
            return nn.ModuleList([ResnetBlock1D(din, dout, tdim), tb, sampler])

        n = len(channels)
        self.down_blocks = nn.ModuleList()
        d = cin
        for i, c in enumerate(channels):
            last = i == n - 1
            self.down_blocks.append(
                level(d, c, nn.Conv1d(c, c, 3, padding=1) if last else Downsample1D(c))
            )
            d = c
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], channels[-1], tdim),
                           nn.ModuleList(TransformerBlock(channels[-1], heads, head_dim) for _ in range(n_blocks))])
            for _ in range(n_mid)
        )  # fmt: skip
        up = list(channels[::-1]) + [channels[0]]
        self.up_blocks = nn.ModuleList()
        for i in range(n):
            last = i == n - 1
            c = up[i + 1]
            self.up_blocks.append(
                level(up[i] * 2, c, nn.Conv1d(c, c, 3, padding=1) if last else Upsample1D(c))
            )
        self.final_block = Block1D(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], cout, 1)

    def time_terms(self, t: torch.Tensor) -> list[torch.Tensor]:
        """What the blocks take from the time t (N,) (see :func:`cfm_euler`)."""
        return unet_time_terms(self, t)

    def forward(self, x, mask, mu, t, spks, cond, streaming=None, past=None, time=None):
        """Full attention over each level's frames (``streaming``/``past`` do not apply);
        ``time``: :meth:`time_terms` made already (as the U-Net of CosyVoice2 takes them)."""
        terms = iter(self.time_terms(t) if time is None else time)
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)

        def run(lvl, x, m):
            x = lvl[0](x, m, next(terms)).transpose(1, 2)
            whole = fresh_past(m, None, 0)
            for blk in lvl[1]:
                x = blk(x, whole)
            return x.transpose(1, 2)

        masks, hiddens = [mask], []
        for lvl in self.down_blocks:
            m = masks[-1]
            x = run(lvl, x, m)
            hiddens.append(x)
            x = lvl[2](x * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        for lvl in self.mid_blocks:
            x = run(lvl, x, masks[-1])
        for lvl in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = run(lvl, x, m)
            x = lvl[2](x * m)
        x = self.final_block(x, m)
        return self.final_proj(x * m) * mask


class FlowV1(nn.Module):
    """``MaskedDiffWithXvec``; parameter names equal the official v1 ``flow.pt`` keys."""

    def __init__(self, cfg: FlowV1Config):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = ConformerEncoder(
            cfg.input_size, cfg.enc_size, cfg.heads, cfg.linear_units, cfg.num_blocks
        )
        self.encoder_proj = nn.Linear(cfg.enc_size, cfg.output_size)
        self.length_regulator = InterpolateRegulator(cfg.output_size)
        self.decoder = CFM(
            ConditionalDecoder(
                cfg.est_in_channels,
                cfg.output_size,
                cfg.est_channels,
                cfg.est_head_dim,
                cfg.est_n_blocks,
                cfg.est_num_mid_blocks,
                cfg.est_num_heads,
            )  # fmt: skip
        )

    @torch.inference_mode()
    def inference(
        self, token, prompt_token, prompt_feat, embedding, cache=None, z=None, generator=None
    ):
        """token (N,), prompt_token (P,), prompt_feat (T_p, 80), embedding (192,); ``cache``
        (80, C, 2) from the previous chunk (z and mu of prompt + overlap frames); ``z`` the noise
        (80, T) or None to draw it from ``generator``. Returns (mel (80, mel_len2), new cache)."""
        dev = self.input_embedding.weight.device
        spks = self.spk_embed_affine_layer(
            F.normalize(embedding.reshape(1, -1).float().to(dev), dim=1)
        )
        tok = torch.cat([prompt_token.reshape(-1), token.reshape(-1)]).long().to(dev)
        h = self.encoder_proj(self.encoder(self.input_embedding(tok.clamp(min=0))[None]))
        p, n = prompt_token.numel(), token.numel()
        mel_len1, mel_len2 = prompt_feat.reshape(-1, 80).shape[0], self.cfg.mel_len(n)
        mu = self.length_regulator(h[:, :p], h[:, p:], mel_len1, mel_len2)
        t = mu.shape[-1]
        cond = torch.zeros_like(mu)
        cond[0, :, :mel_len1] = prompt_feat.reshape(-1, 80).T.to(dev)
        if z is None:
            z = torch.randn(1, 80, t, generator=generator).to(dev)
        z = z.reshape(1, 80, t).clone().to(dev)
        mu = mu.clone()
        if cache is not None and cache.shape[1] > 0:
            c = cache.shape[1]
            z[0, :, :c], mu[0, :, :c] = cache[:, :, 0].to(dev), cache[:, :, 1].to(dev)
        o = OVERLAP_FRAMES
        new_cache = torch.stack([torch.cat([z[0, :, :mel_len1], z[0, :, -o:]], dim=1),
                                 torch.cat([mu[0, :, :mel_len1], mu[0, :, -o:]], dim=1)], dim=-1)  # fmt: skip
        mask = torch.ones(1, 1, t, device=dev)
        x = cfm_euler(self.decoder.estimator, z, mask, mu, spks, cond, fresh_past(mask, None, 0),
                      self.cfg.n_timesteps, self.cfg.cfg_rate)  # fmt: skip
        return x[0, :, mel_len1:], new_cache


def load_flow_v1(model_dir, device="cpu") -> FlowV1:
    from pathlib import Path

    from cosyvoice.config import load_model_yaml

    model_dir = Path(model_dir)
    m = FlowV1(FlowV1Config.from_yaml(load_model_yaml(model_dir)[1]))
    m.load_state_dict(
        torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True), strict=True
    )
    return m.to(device).eval()
