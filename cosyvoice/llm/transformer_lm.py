"""CosyVoice v1 ``TransformerLM`` (spec §7.1): causal rel-pos Conformer text encoder + causal
rel-pos Transformer LM, with the same packed-batch / per-request KV cache as the Qwen2 LM.

Relative-position attention (espnet "rel_selfattn"): score[i, j] = ((q_i + u)·k_j +
(q_i + v)·P[i - j]) / sqrt(d_k), with P[r] = linear_pos(PE(r)) and PE(r)[2m] = sin(r w_m),
PE(r)[2m+1] = cos(r w_m), w_m = 10000^(-2m/d). Only r >= 0 is ever unmasked (causal), so we
keep a per-layer table of P[r] for r = 0.. instead of recomputing the +-K window every step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LLMConfig
from .kv import KVCache, KVPool, Layout, blocks_for, gather, write
from .qwen2 import last_positions


def rel_pe(n: int, d: int, device=None) -> torch.Tensor:
    """PE(r) for r = 0..n-1, (n, d), interleaved sin/cos."""
    pos = torch.arange(n, dtype=torch.float32, device=device).unsqueeze(1)
    div = torch.exp(
        torch.arange(0, d, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d)
    )
    pe = torch.zeros(n, d, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class RelPosAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h, self.dk = heads, d // heads
        self.linear_q = nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d)
        self.linear_v = nn.Linear(d, d)
        self.linear_out = nn.Linear(d, d)
        self.linear_pos = nn.Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, self.dk))
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, self.dk))
        self._p: torch.Tensor | None = None  # (R, H, dk) cached linear_pos(PE(r))

    def pos_table(self, n: int) -> torch.Tensor:
        w = self.pos_bias_u  # dtype and device (linear_pos may be packed: devices.pack_linears)
        if self._p is None or self._p.shape[0] < n or self._p.dtype != w.dtype:
            cap = max(n, 1024)
            pe = rel_pe(cap, self.linear_pos.in_features, w.device).to(w.dtype)
            self._p = self.linear_pos(pe).view(cap, self.h, self.dk)
        return self._p[:n]

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, mask
    ) -> torch.Tensor:
        """Padded batch: q (B, L, H, dk) at positions ``q_pos`` (B, L); k/v (B, T, H, dk) at
        positions 0..T-1; mask (B, 1, L, T) -> (B, L, H * dk)."""
        b, L, T = q.shape[0], q.shape[1], k.shape[1]
        qu = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, L, dk)
        qv = (q + self.pos_bias_v).transpose(1, 2)
        ac = qu @ k.permute(0, 2, 3, 1)  # (B, H, L, T)
        m = qv @ self.pos_table(T).permute(1, 2, 0)  # (B, H, L, R): (q_i + v)·P[r]
        rel = (q_pos[:, :, None] - torch.arange(T, device=q.device)).clamp(min=0)  # (B, L, T)
        bd = m.gather(3, rel[:, None].expand(b, self.h, L, T))
        scores = ((ac + bd) / math.sqrt(self.dk)).masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1) @ v.transpose(1, 2)  # (B, H, L, dk)
        return out.transpose(1, 2).reshape(b, L, -1)


class FeedForward(nn.Module):
    def __init__(self, d: int, units: int, act) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d, units)
        self.w_2 = nn.Linear(units, d)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.act(self.w_1(x)))


class Block(nn.Module):
    """Pre-LN block; norm names differ between the text encoder and the LM in the checkpoint."""

    def __init__(self, d: int, heads: int, units: int, act, norm_names: tuple[str, str]) -> None:
        super().__init__()
        self.self_attn = RelPosAttention(d, heads)
        self.feed_forward = FeedForward(d, units, act)
        self._n1, self._n2 = norm_names
        setattr(self, self._n1, nn.LayerNorm(d, eps=1e-12))
        setattr(self, self._n2, nn.LayerNorm(d, eps=1e-12))

    def norm1_(self, x):
        return getattr(self, self._n1)(x)

    def norm2_(self, x):
        return getattr(self, self._n2)(x)


class _Embed(nn.Module):
    def __init__(self, d_in: int, d: int, relu: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, d), nn.LayerNorm(d, eps=1e-5), nn.Identity()]
        if relu:
            layers.append(nn.ReLU())
        self.out = nn.Sequential(*layers)


class RelPosEncoder(nn.Module):
    def __init__(
        self, d_in: int, d: int, heads: int, units: int, n: int, act, legacy: bool, names
    ) -> None:
        super().__init__()
        self.d = d
        self.embed = _Embed(d_in, d, relu=legacy)
        self.encoders = nn.ModuleList(Block(d, heads, units, act, names) for _ in range(n))
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(
        self, x: torch.Tensor, caches: list[KVCache] | None, seg_lens: list[int]
    ) -> torch.Tensor:
        """x packed (N, d_in). With caches (one pool): append K/V per request; without: each
        segment is a standalone causal sequence (the text encoder)."""
        x = self.embed.out(x) * math.sqrt(self.d)
        if caches is not None:
            pool = caches[0].pool
            layout = pool.layout(caches, seg_lens)
        else:
            layout = Layout.build([0] * len(seg_lens), seg_lens, _no_blocks(seg_lens), x.device)
        for li, blk in enumerate(self.encoders):
            h = blk.norm1_(x)
            att = blk.self_attn
            q = att.linear_q(h).view(-1, att.h, att.dk)
            k = att.linear_k(h).view(-1, att.h, att.dk)
            v = att.linear_v(h).view(-1, att.h, att.dk)
            if caches is not None:
                kv = pool.layer(li)
                write(kv, layout.slots, torch.stack((k, v)))
                out = layout.attend(
                    q, lambda g, kv=kv: gather(kv, g), _rel_attend(att, cached=True)
                )
            else:  # the text encoder: keys are this forward's own rows
                out = layout.attend(
                    q, lambda g, k=k, v=v: (g.pad(k), g.pad(v)), _rel_attend(att, cached=False)
                )
            x = x + att.linear_out(out)
            x = x + blk.feed_forward(blk.norm2_(x))
        if caches is not None:
            pool.commit(caches, seg_lens)
        return self.after_norm(x)


def _rel_attend(att: RelPosAttention, cached: bool):
    """The per-group call for :meth:`Layout.attend`; uncached keys are padded to the queries'
    length, so the mask is cut to match."""

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g) -> torch.Tensor:
        mask = g.mask if cached else g.mask[..., : g.q_len]
        return att.attend(q, k, v, g.q_pos, mask)

    return fn


def _no_blocks(seg_lens: list[int]) -> list[list[int]]:
    """Placeholder block lists for an uncached layout (only its shapes and masks are used)."""
    return [[0] * blocks_for(n) for n in seg_lens]


def _size(node: dict | None, key: str, default):
    return type(default)((node or {}).get(key, default))


class TransformerSpeechLM(nn.Module):
    family = "v1"

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        text_encoder_input_size = int(cfg.text_encoder_input_size or 512)
        d = cfg.llm_input_size
        te, lm = cfg.v1_text_encoder or {}, cfg.v1_llm or {}
        te_d = _size(te, "output_size", d)
        self.text_embedding = nn.Embedding(
            int(cfg.text_token_size or 51866), text_encoder_input_size
        )
        self.text_encoder = RelPosEncoder(
            text_encoder_input_size, te_d, _size(te, "attention_heads", 16), _size(te, "linear_units", 4096),
            _size(te, "num_blocks", 6), F.silu, legacy=False, names=("norm_mha", "norm_ff"),
        )  # fmt: skip
        self.text_encoder_affine_layer = nn.Linear(te_d, d)
        self.llm_embedding = nn.Embedding(2, d)
        self.llm = RelPosEncoder(
            d, cfg.llm_output_size, _size(lm, "attention_heads", 16), _size(lm, "linear_units", 4096),
            _size(lm, "num_blocks", 14), F.relu, legacy=True, names=("norm1", "norm2"),
        )  # fmt: skip
        s = cfg.speech_token_size
        self.llm_decoder = nn.Linear(cfg.llm_output_size, s + 1)
        self.speech_embedding = nn.Embedding(s, d)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, d)
        self.stop_ids = range(s, s + 1)
        self._pools: dict[tuple[torch.dtype, torch.device], KVPool] = {}

    @property
    def speech_token_size(self) -> int:
        return self.cfg.speech_token_size

    def new_cache(self, dtype=None, device=None) -> KVCache:
        return self.kv_pool(dtype, device).new_cache()

    def kv_pool(self, dtype=None, device=None, **kw) -> KVPool:
        """The pool every request shares (one per dtype and device), as in the Qwen2 LM."""
        w = self.speech_embedding.weight  # linears may be packed (devices.pack_linears)
        key = (dtype or w.dtype, torch.device(device or w.device))
        if key not in self._pools:
            blk = self.llm.encoders[0].self_attn
            self._pools[key] = KVPool(len(self.llm.encoders), blk.h, blk.dk, *key, **kw)
        return self._pools[key]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.text_encoder(self.text_embedding(ids), None, [ids.shape[0]])
        return self.text_encoder_affine_layer(x)

    def prefix_embeds(
        self,
        text_ids: torch.Tensor,
        prompt_speech: torch.Tensor,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = [self.llm_embedding.weight[0:1]]
        if embedding is not None and embedding.numel():
            e = F.normalize(embedding.reshape(1, -1).to(self.llm_embedding.weight), dim=1)
            parts.append(self.spk_embed_affine_layer(e))
        parts += [
            self.encode_text(text_ids),
            self.llm_embedding.weight[1:2],
            self.speech_embedding(prompt_speech),
        ]
        return torch.cat(parts)

    def forward_packed(self, x, caches, seg_lens, last_only: bool = True) -> torch.Tensor:
        h = self.llm(x, caches, seg_lens)
        return self.llm_decoder(last_positions(h, seg_lens) if last_only else h)

    def load_checkpoint(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.load_state_dict(state, strict=True)
        for m in self.modules():
            if isinstance(m, RelPosAttention):
                m._p = None
