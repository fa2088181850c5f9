"""CosyVoice2 flow (``CausalMaskedDiffWithXvec``): speech tokens -> 80-bin mel at 2x token rate.

Batched inference: ``FlowModel.inference(reqs)`` takes several :class:`FlowInput` at once, pads them
and returns one mel per request, equal to what the request gives alone. A streaming request that
carries a :class:`FlowCache` computes only the frames past the cache and extends it (non-final
calls), so an utterance's chunks cost their own frames, not a recompute of everything before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cosyvoice.devices import Calls, CaptureFailed, h2d
from cosyvoice.flow.cache import (
    RESOLUTIONS,
    EncoderInputs,
    FlowCache,
    FlowPool,
    Past,
    PromptStore,
    blocks_for,
)
from cosyvoice.flow.decoder import CFM, CausalConditionalDecoder, cfm_euler
from cosyvoice.flow.dit import DiT
from cosyvoice.flow.encoder import PreLookahead, UpsampleConformerEncoder
from cosyvoice.flow.graphs import FlowGraphs

NOISE_FRAMES = 15000

log = logging.getLogger("cosyvoice")


@dataclass(frozen=True)
class FlowConfig:
    vocab_size: int = 6561
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4
    chunk_size: int = 25  # tokens (encoder static chunk); the estimator uses chunk*ratio frames
    est_in_channels: int = 320
    est_channels: int = 256
    est_head_dim: int = 64
    est_n_blocks: int = 4
    est_num_mid_blocks: int = 12
    est_num_heads: int = 8
    est_chunk: int = 50
    cfg_rate: float = 0.7
    n_timesteps: int = 10
    # v3 (CausalMaskedDiffWithDiT): no conformer; pre-lookahead on the raw embeddings + DiT
    estimator: str = "unet"  # "unet" (v2) | "dit" (v3)
    pre_lookahead_channels: int = 1024
    dit_dim: int = 1024
    dit_depth: int = 22
    dit_heads: int = 16
    dit_dim_head: int = 64
    dit_ff_mult: int = 2

    @classmethod
    def from_yaml(cls, cfg: dict[str, Any]) -> FlowConfig:
        """From the ``flow`` node of a parsed cosyvoice2.yaml (:func:`cosyvoice.config.read_yaml`)."""
        f = cfg.get("flow", cfg)
        target = str(f.get("_target_", ""))
        dec = f["decoder"]
        est = dec["estimator"]
        cfm = dec.get("cfm_params", {})
        cfm = cfm.get("content", cfm) if isinstance(cfm, dict) else {}
        if target and not target.endswith(("CausalMaskedDiffWithDiT", "CausalMaskedDiffWithXvec")):
            raise ValueError(f"flow class {target} is not supported by cosyvoice.flow (v2/v3 only)")
        common = dict(  # the fields v2 (U-Net) and v3 (DiT) read alike
            vocab_size=int(f["vocab_size"]),
            input_size=int(f["input_size"]),
            output_size=int(f["output_size"]),
            spk_embed_dim=int(f["spk_embed_dim"]),
            token_mel_ratio=int(f.get("token_mel_ratio", 2)),
            pre_lookahead_len=int(f.get("pre_lookahead_len", 3)),
            cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
        )
        if target.endswith("CausalMaskedDiffWithDiT"):
            pl = f.get("pre_lookahead_layer", {})
            return cls(
                **common,
                chunk_size=int(est.get("static_chunk_size", 50))
                // int(f.get("token_mel_ratio", 2)),
                est_chunk=int(est.get("static_chunk_size", 50)),
                estimator="dit",
                pre_lookahead_channels=int(pl.get("channels", 1024)),
                dit_dim=int(est["dim"]),
                dit_depth=int(est["depth"]),
                dit_heads=int(est["heads"]),
                dit_dim_head=int(est["dim_head"]),
                dit_ff_mult=int(est.get("ff_mult", 2)),
            )
        enc = f["encoder"]
        return cls(
            **common,
            heads=int(enc.get("attention_heads", 4)),
            linear_units=int(enc.get("linear_units", 2048)),
            num_blocks=int(enc.get("num_blocks", 6)),
            chunk_size=int(enc.get("static_chunk_size", 0)),
            est_in_channels=int(est["in_channels"]),
            est_channels=int(est["channels"][0]),
            est_head_dim=int(est.get("attention_head_dim", 64)),
            est_n_blocks=int(est.get("n_blocks", 1)),
            est_num_mid_blocks=int(est.get("num_mid_blocks", 2)),
            est_num_heads=int(est.get("num_heads", 4)),
            est_chunk=int(est.get("static_chunk_size", 0)),
        )


@functools.cache
def fixed_noise() -> torch.Tensor:
    """The CFM's fixed initial noise: what ``manual_seed(0); randn(1, 80, 15000)`` gives on CPU.
    Drawn from a private generator (the global RNG is left alone); read-only by convention."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 80, NOISE_FRAMES, generator=g)


@functools.cache
def _noise_on(device: torch.device) -> torch.Tensor:
    """:func:`fixed_noise` drawn once and kept on ``device`` (1.2 M draws per call otherwise)."""
    noise = fixed_noise()[0].to(device)
    if noise.is_cuda:  # shared by every stream (a vocoder thread's too): finish the copy first
        torch.cuda.current_stream(noise.device).synchronize()
    return noise


@dataclass
class FlowInput:
    """One request's flow call. ``token`` (N,) int: all of the utterance's tokens so far (for a
    non-final call ending with the look-ahead tokens), ``prompt_token`` (P,), ``prompt_feat``
    (2P, 80), ``embedding`` (192,). ``emit_from``: the first mel frame (after the prompt) to
    return. ``cache``: the request's :class:`FlowCache`; only the positions past it are
    computed, and a non-final call appends its finished positions to it."""

    token: torch.Tensor
    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor
    streaming: bool = False
    finalize: bool = True
    emit_from: int = 0
    cache: FlowCache | None = None


@dataclass
class _Plan:
    """Where each request's call starts and ends, in tokens (prompt included)."""

    caches: list[FlowCache]
    start: list[int]
    lens: list[int]
    commit: list[bool]
    seqs: list[torch.Tensor]  # new tokens followed by the look-ahead tokens (non-final)
    pasts: list[Past] = field(default_factory=list)  # the call's views, finished after it
    pooled: bool = False  # every view through the pool (see FlowModel._replayable)

    def past(self, *args, **kw) -> Past:
        p = Past(self.caches, *args, commit=self.commit, pooled=self.pooled, **kw)
        self.pasts.append(p)
        return p


class FlowModel(nn.Module):
    """``CausalMaskedDiffWithXvec``; parameter names equal the official ``flow.pt`` keys."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.pool = FlowPool()  # every streaming request's state (not a parameter or buffer)
        self.prompts = PromptStore()  # speakers' prompts, for streams to start from
        self.graphs: FlowGraphs | None = None
        self.calls = Calls()  # flow calls by how they ran
        d = cfg.input_size
        self.input_embedding = nn.Embedding(cfg.vocab_size, d)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        if cfg.estimator == "dit":
            self.pre_lookahead_layer = PreLookahead(
                d, cfg.pre_lookahead_channels, cfg.pre_lookahead_len
            )
            self.decoder = CFM(
                DiT(
                    cfg.dit_dim,
                    cfg.dit_depth,
                    cfg.dit_heads,
                    cfg.dit_dim_head,
                    cfg.dit_ff_mult,
                    cfg.output_size,
                    d,
                    cfg.output_size,
                    cfg.output_size,
                    cfg.est_chunk,
                )  # fmt: skip
            )
            return
        self.encoder = UpsampleConformerEncoder(
            d, cfg.heads, cfg.linear_units, cfg.num_blocks, cfg.num_up_blocks,
            cfg.pre_lookahead_len, cfg.chunk_size, cfg.token_mel_ratio,
        )  # fmt: skip
        self.encoder_proj = nn.Linear(d, cfg.output_size)
        self.decoder = CFM(
            CausalConditionalDecoder(
                cfg.est_in_channels,
                cfg.output_size,
                cfg.est_channels,
                cfg.est_head_dim,
                cfg.est_n_blocks,
                cfg.est_num_mid_blocks,
                cfg.est_num_heads,
                cfg.est_chunk,
            )  # fmt: skip
        )

    def enable_graphs(self, max_batch: int, capture: bool | None = None, **ladders) -> None:
        """Run the Euler loop of calls over up to ``max_batch`` pooled streams as replayed
        CUDA graphs (:mod:`cosyvoice.flow.graphs`; ``capture=False``: eagerly at the same
        static shapes, to test the padding on a CPU; ``ladders``: its ``frames`` and
        ``contexts`` buckets). Call after the flow is on its device."""
        dev = self.input_embedding.weight.device
        c = self.cfg
        self.graphs = FlowGraphs(self.decoder.estimator, self.pool, c.n_timesteps, c.cfg_rate,
                                 max_batch, dev, self.calls, capture, **ladders)  # fmt: skip
        if c.estimator != "dit":  # v3's pre-lookahead layer alone is a few ops: eager
            self.graphs.with_encoder(self.encoded, c.token_mel_ratio, c.pre_lookahead_len)

    def plan(self, reqs: list[FlowInput]) -> _Plan:
        dev = self.input_embedding.weight.device
        p = _Plan([], [], [], [], [], pooled=self._replayable(reqs))
        for r in reqs:
            c = r.cache if r.cache is not None else FlowCache()
            start, end = self._span(r)
            if end <= start:
                raise ValueError("a flow call needs new tokens past its cache and look-ahead")
            tok = h2d(torch.cat([r.prompt_token.reshape(-1), r.token.reshape(-1)]).long(), dev)
            p.caches.append(c)
            p.start.append(start)
            p.lens.append(end - start)
            p.commit.append(r.cache is not None and not r.finalize)
            p.seqs.append(tok[start:])
        return p

    def _span(self, r: FlowInput) -> tuple[int, int]:
        """The token positions [start, end) a call computes for ``r`` (prompt included)."""
        n = r.prompt_token.numel() + r.token.numel()
        return (r.cache.tokens if r.cache is not None else 0), n - (
            0 if r.finalize else self.cfg.pre_lookahead_len
        )

    def _replayable(self, reqs: list[FlowInput]) -> bool:
        """Whether a call over ``reqs`` replays a graph: graphs are on, a bucket holds it and
        the pool has the blocks for its positions free now. Then its requests without state (a
        whole utterance, a stream that ends in its first call) go through the pool too, for
        the call (their blocks come back after it): otherwise such a call ran eagerly, ~14 000
        launches on a GPU, where a short reply's first audio waits on it."""
        g = self.graphs
        if g is None or not reqs:
            return False
        spans, ratio = [self._span(r) for r in reqs], self.cfg.token_mel_ratio
        frames, context = ratio * max(e - s for s, e in spans), ratio * max(e for _, e in spans)
        # free now, whether the pool may grow or not: grown for a call without state it keeps
        # nothing of it, and under graphs (a pool that keeps its size) every graph would go
        return g.fits(len(reqs), frames, context) and self._free_for(reqs, stateless=True)

    def encode(self, reqs: list[FlowInput]):
        """Token embedding + encoder + projection of each request's new positions -> mu
        (B, T, 80) and the per-item frame counts (host ints: nothing here waits for the device).
        Nothing is kept: what the views took from the pool goes back."""
        p = self.plan(reqs)
        try:
            enc = self._encoder_inputs(reqs, p)
            return self.encoded(enc), enc.frames
        finally:
            for v in p.pasts:
                v.finish(ok=False)

    def _encoder_inputs(self, reqs: list[FlowInput], p: _Plan) -> EncoderInputs:
        la, dev = self.cfg.pre_lookahead_len, self.input_embedding.weight.device
        t = max(p.lens)
        toks = torch.zeros(len(reqs), t + la, dtype=torch.long, device=dev)
        valid = torch.zeros(len(reqs), t + la, 1, device=dev)
        for i, s in enumerate(p.seqs):
            toks[i, : s.numel()] = s
            valid[i, : s.numel()] = 1.0
        streaming = [r.streaming for r in reqs]
        has_ctx = h2d([not r.finalize for r in reqs], dev)
        tok = p.past(p.start, p.lens, streaming, self.cfg.chunk_size, device=dev, tag="tokens",
                     pool=self.pool, res="tokens")  # fmt: skip
        ratio = self.cfg.token_mel_ratio
        frames = [n * ratio for n in p.lens]
        frm = None
        if self.cfg.estimator != "dit":
            frm = p.past([s * ratio for s in p.start], frames, streaming,
                         self.cfg.chunk_size * ratio, device=dev, tag="frames", pool=self.pool)  # fmt: skip
        return EncoderInputs(toks, valid, has_ctx, tok, frm, frames)

    def encoded(self, e: EncoderInputs) -> torch.Tensor:
        """mu (B, ratio * T, 80) of the call's new positions (the tensors alone: the flow's
        CUDA graphs run it over their static buffers)."""
        la = self.cfg.pre_lookahead_len
        xe = self.input_embedding(e.toks.clamp(min=0)) * e.valid
        if self.cfg.estimator == "dit":
            keep = e.tok.lens_dev + e.has_ctx.long() * la
            kept = torch.arange(xe.shape[1], device=xe.device)[None, :] < keep[:, None]
            xe = xe * kept[..., None]
            h = self.pre_lookahead_layer(xe.contiguous(), e.tok)
            return h.repeat_interleave(self.cfg.token_mel_ratio, dim=1)
        return self.encoder_proj(self.encoder(xe, e.has_ctx, e.tok, e.frm))

    def max_tokens(self, prompt_tokens: int) -> int:
        """The speech tokens a request after this many prompt tokens may have: its frames,
        prompt included, take their noise from one fixed buffer of NOISE_FRAMES (300 s)."""
        return NOISE_FRAMES // self.cfg.token_mel_ratio - prompt_tokens

    @torch.inference_mode()
    def inference(self, reqs: list[FlowInput]) -> list[torch.Tensor]:
        """Returns one mel (80, frames) per request: the frames from ``emit_from`` (after the
        prompt) to the end of the call."""
        pooled = [i for i, r in enumerate(reqs) if _uses_pool(r)]
        if not 0 < len(pooled) < len(reqs):
            return self._call(reqs)
        # requests without state (non-stream, recomputing) run apart: in a call over caches
        # their keys would go through the pool too, and a long one would grow it for nothing
        # (apart, at their own bucket, they go through it where it has room: _replayable)
        rest = [i for i, r in enumerate(reqs) if not _uses_pool(r)]
        out: list[torch.Tensor] = [torch.empty(0)] * len(reqs)
        for group in (pooled, rest):
            for i, mel in zip(group, self._call([reqs[i] for i in group]), strict=True):
                out[i] = mel
        return out

    def _call(self, reqs: list[FlowInput]) -> list[torch.Tensor]:
        p, ok = self.plan(reqs), False
        try:
            out = self._run(reqs, p)
            ok = True
            return out
        finally:
            for v in p.pasts:
                v.finish(ok)
            self.pool.shrink_if_idle()

    def prompt_piece(self, r: FlowInput, most: int) -> FlowInput | None:
        """A stream's prompt goes through the flow ahead of its tokens, a piece of at most
        ``most`` tokens per call (beside other streams' calls): computed in its first call
        with its tokens, a long prompt (a 30 s recording is 750 tokens) held every other
        stream's audio for seconds. The next piece for ``r`` (a stream's first call, over its
        cache), or None once the cache is past the prompt's part: computed, or copied from
        :attr:`prompts` (looked up on the first ask). A prompt seen before
        (:meth:`PromptStore.admit`) is kept there once computed. The piece's call returns no
        frames."""
        part = self.prompt_part(r)
        if part is None:
            return None
        c, n = r.cache, part.prompt_token.numel() - self.cfg.pre_lookahead_len
        if c.tokens == 0:
            key = _prompt_key(part)
            saved = self.prompts.get(key)
            # (a pool that may not grow restores only into blocks it has free; else in pieces,
            # which the caller fits to the pool like any call)
            if saved is not None and self.fits([part]):
                with _unless_out_of_memory():  # a failed copy leaves the cache empty
                    self.pool.restore(saved, c)
                    return None
            c.keep_prompt = self.prompts.admit(key)
        if c.tokens < n:
            return self._piece(part, c.tokens, most)
        key = _prompt_key(part) if c.keep_prompt and c.tokens == n else None
        if key is not None and key not in self.prompts:  # (kept meanwhile by a stream beside)
            with _unless_out_of_memory():  # just computed: the cache holds the part alone
                self._keep(key, c)
        c.keep_prompt = False
        return None

    @torch.inference_mode()
    def keep_prompt(self, r: FlowInput) -> Generator[None, None, bool]:
        """Compute the prompt part of ``r`` (a stream's first call, no tokens yet, over an
        empty cache) and keep it now, without waiting for its second stream: a speaker
        registered to be used. Only into room the store has (what streams use decides what
        it pushes out), and not at all when the estimate says there is none.

        A generator: each ``next()`` is one flow call over the next piece of the prompt (one
        chunk of the encoder and of the estimator), so a caller can let other flow calls run
        between (on a CPU a 10 s prompt is many seconds). Returns whether it is kept."""
        part = self.prompt_part(r)
        if part is None or self.prompts.budget <= 0:
            return False
        key = _prompt_key(part)
        if key in self.prompts:
            return True
        ratio, la = self.cfg.token_mel_ratio, self.cfg.pre_lookahead_len
        n = part.prompt_token.numel() - la  # the positions it makes final
        if not self.prompts.has_room(self.pool.bytes_for(n, n * ratio)):  # 0: not known yet
            return False
        if not self.fits([part]):  # its pieces would grow a pool sized to the device
            return False
        with _unless_out_of_memory():
            while r.cache.tokens < n:
                self._call([self._piece(part, r.cache.tokens, self._piece_tokens())])
                yield
            if self.prompts.has_room(self.pool.bytes_for(n, n * ratio)):  # what a copy takes
                self.prompts.put(key, self.pool.snapshot(r.cache))
        return key in self.prompts

    def _piece(self, part: FlowInput, done: int, most: int) -> FlowInput:
        """The call taking a prompt's part (:meth:`prompt_part`) from ``done`` positions on by
        up to ``most`` (at least one piece): it ends on whole chunks of the encoder and of the
        estimator, its look-ahead tokens after it."""
        step, la, ratio = self._piece_tokens(), self.cfg.pre_lookahead_len, self.cfg.token_mel_ratio
        end = min(part.prompt_token.numel() - la, done + max(1, most // step) * step)
        return replace(part, prompt_token=part.prompt_token[: end + la],
                       prompt_feat=part.prompt_feat[: end * ratio])  # fmt: skip

    def fits(self, reqs: list[FlowInput]) -> bool:
        """Whether calls over these requests take no more of the pool than it has free, for a
        pool that may not grow (under CUDA graphs: it is sized to the device's memory); always
        for one that may."""
        return not self.pool.pinned or self._free_for(reqs)

    def _free_for(self, reqs: list[FlowInput], stateless: bool = False) -> bool:
        """Whether the pool has the blocks calls over ``reqs`` take (:meth:`blocks_needed`)
        free now."""
        free = self.pool.free_blocks()
        need = [self.blocks_needed(r, stateless) for r in reqs]
        return all(sum(n[res] for n in need) <= free[res] for res in RESOLUTIONS)

    def blocks_needed(self, r: FlowInput, stateless: bool = False) -> dict[str, int]:
        """Pool blocks a call over ``r`` takes beyond what its cache holds, per resolution
        (a stream's first call: its prompt's positions too); ``stateless``: also for a request
        without state (in a call that goes through the pool for its graphs)."""
        if not (stateless or _uses_pool(r)):
            return dict.fromkeys(RESOLUTIONS, 0)
        _, end = self._span(r)
        ends = {"tokens": end, "frames": end * self.cfg.token_mel_ratio}
        held = r.cache.blocks if r.cache is not None else dict.fromkeys(RESOLUTIONS, [])
        return {res: max(0, blocks_for(e) - len(held[res])) for res, e in ends.items()}

    def _piece_tokens(self) -> int:
        """The fewest tokens a call over a cache can end on: whole chunks of the encoder whose
        frames are whole chunks of the estimator."""
        chunk, est = self.cfg.chunk_size, max(self.cfg.est_chunk, 1)
        return math.lcm(chunk * self.cfg.token_mel_ratio, est) // self.cfg.token_mel_ratio

    def forget_prompt(self, r: FlowInput) -> bool:
        """Drop the prompt part of ``r`` (as for :meth:`keep_prompt`) from the store: its
        speaker is gone. Whether it was kept."""
        part = self.prompt_part(r)
        return part is not None and self.prompts.discard(_prompt_key(part))

    def prompt_part(self, r: FlowInput) -> FlowInput | None:
        """The part of a stream's first call that its prompt alone decides; None
        when there is none (no prompt, or not a stream over a cache). The part ends on a chunk
        of the encoder and of the estimator (where a hop would end, so its frames are final)
        with the look-ahead tokens after it still in the prompt; the stream computes the rest."""
        c, la, chunk = r.cache, self.cfg.pre_lookahead_len, self.cfg.chunk_size
        if c is None or r.finalize or not r.streaming or not chunk:
            return None
        n = (r.prompt_token.numel() - la) // chunk * chunk
        ratio = self.cfg.token_mel_ratio
        if n <= 0 or n * ratio % max(self.cfg.est_chunk, 1):
            return None
        part = replace(
            r, token=r.token[:0], prompt_token=r.prompt_token.reshape(-1)[: n + la],
            prompt_feat=r.prompt_feat.reshape(-1, self.cfg.output_size)[: n * ratio],
            emit_from=0,
        )  # fmt: skip
        return part

    def _keep(self, key: bytes, c: FlowCache) -> None:
        """Keep a copy of ``c`` (holding a prompt's part alone), unless larger than the whole
        budget: what the copy takes, its positions (the cache's whole blocks take more)."""
        if self.pool.bytes_for(c.length["tokens"], c.length["frames"]) > self.prompts.budget:
            self.prompts.refuse(key)
        else:
            self.prompts.put(key, self.pool.snapshot(c))

    def _run(self, reqs: list[FlowInput], p: _Plan) -> list[torch.Tensor]:
        dev, ratio = self.input_embedding.weight.device, self.cfg.token_mel_ratio
        b = len(reqs)
        enc = self._encoder_inputs(reqs, p)
        hl, t = enc.frames, ratio * max(p.lens)
        emb = h2d(torch.stack([r.embedding.reshape(-1).float() for r in reqs]), dev)
        spks = self.spk_embed_affine_layer(F.normalize(emb, dim=1))
        cond = torch.zeros(b, self.cfg.output_size, t, device=dev)
        mask = torch.zeros(b, 1, t, device=dev)
        z = torch.zeros(b, self.cfg.output_size, t, device=dev)
        noise = _noise_on(dev)
        start = [s * ratio for s in p.start]
        p_len = []
        for i, r in enumerate(reqs):
            n, s = hl[i], start[i]
            if s + n > NOISE_FRAMES:
                raise ValueError(
                    f"flow call of {s + n} frames exceeds the {NOISE_FRAMES}-frame noise buffer"
                )
            pf = r.prompt_feat.reshape(-1, self.cfg.output_size)[s:]  # prompt frames not cached
            cond[i, :, : pf.shape[0]] = h2d(pf.T, dev)
            mask[i, :, :n] = 1.0
            z[i, :, :n] = noise[:, s : s + n]
            p_len.append(r.prompt_feat.reshape(-1, self.cfg.output_size).shape[0])
        past = p.past(start, hl, [r.streaming for r in reqs], self.cfg.est_chunk, rows=2,
                      device=dev, pool=self.pool)  # fmt: skip
        x = self._mel(enc, z, mask, spks, cond, past)
        out = []
        for i, r in enumerate(reqs):
            skip = p_len[i] + r.emit_from - start[i]
            if skip < 0:
                raise ValueError("emit_from lies before the frames this call computes")
            out.append(x[i, :, skip : hl[i]])
        for c, s, n, keep in zip(p.caches, p.start, p.lens, p.commit, strict=True):
            if keep:
                c.tokens = s + n
        return out

    @torch.inference_mode()  # as the calls run: the graphs' buffers are inference tensors
    def capture_pending(self) -> int:
        """Capture a graph bucket met since warm-up (:meth:`FlowGraphs.capture_pending`), for
        an idle model; how many are left."""
        g = self.graphs
        if g is None or not g.pending:
            return 0
        try:
            return g.capture_pending()
        except CaptureFailed:
            self.graphs, self.pool.keep = None, False
            return 0

    def _mel(self, enc: EncoderInputs, z, mask, spks, cond, past: Past) -> torch.Tensor:
        """The encoder and the estimator's Euler loop: replayed at the call's bucket when
        graphs are on and it fits (v2: both in one graph; v3: the Euler loop)."""
        g = self.graphs
        fits = (
            g is not None and past.pooled and g.fits(z.shape[0], z.shape[-1], past.mask.shape[-1])
        )
        mu = None if fits and g.encode is not None else self.encoded(enc).transpose(1, 2)
        if fits:
            try:
                return g.run(z, mask, mu, spks, cond, past, enc)
            except CaptureFailed:
                self.graphs, self.pool.keep = None, False
                mu = self.encoded(enc).transpose(1, 2) if mu is None else mu
        self.calls["dynamic"] += 1
        return cfm_euler(
            self.decoder.estimator, z, mask, mu, spks, cond, past,
            self.cfg.n_timesteps, self.cfg.cfg_rate,
        )  # fmt: skip


@contextlib.contextmanager
def _unless_out_of_memory() -> Iterator[None]:
    """Out of memory for a prompt's copy (CUDA's error, or the CPU allocator's RuntimeError),
    the stream goes on without the store; other errors raise."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        log.warning("the flow's prompt store could not copy a prompt: %s", exc)


def _prompt_key(r: FlowInput) -> bytes:
    """What a prompt's flow state depends on (besides the model): its tokens, mel, x-vector."""
    h = hashlib.blake2b(digest_size=20)
    for t in (r.prompt_token.long(), r.prompt_feat.float(), r.embedding.reshape(-1).float()):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def _uses_pool(r: FlowInput) -> bool:
    """Whether a call reads or keeps flow state (a cache that is continued or extended)."""
    return r.cache is not None and (r.cache.tokens > 0 or not r.finalize)


def build_flow(cfg: FlowConfig) -> FlowModel:
    """Randomly initialised flow of the configured sizes; ``state_dict()`` has the flow.pt layout."""
    return FlowModel(cfg).eval()


def load_flow(model_dir: str | Path, cfg: FlowConfig | None = None, device="cpu") -> FlowModel:
    """Build from ``cosyvoice2.yaml`` (unless ``cfg`` given) and load ``flow.pt`` strictly."""
    model_dir = Path(model_dir)
    if cfg is None:
        from cosyvoice.config import load_model_yaml

        y = load_model_yaml(model_dir)[1]
        if str(y["flow"].get("_target_", "")).endswith(".MaskedDiffWithXvec"):
            from cosyvoice.flow.v1 import load_flow_v1

            return load_flow_v1(model_dir, device)  # v1: a FlowV1, see cosyvoice.flow.v1
        cfg = FlowConfig.from_yaml(y)
    m = FlowModel(cfg)
    sd = torch.load(model_dir / "flow.pt", map_location="cpu", weights_only=True)
    m.load_state_dict(sd, strict=True)
    return m.to(device).eval()
