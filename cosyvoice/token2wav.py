"""Streaming token2wav: speech tokens -> audio chunks (CosyVoice2 and 3 at 24 kHz; CosyVoice-300M
v1 at 22.05 kHz in :class:`Token2WavV1`). Use :func:`make_token2wav` to get the right one.

API (same for all families)::

    t2w = make_token2wav(load_flow(d), load_hift(d))
    st = t2w.new_state(embedding, prompt_token, prompt_feat, stream=True, speed=1.0, seed=None)
    chunks = t2w.step([(st, new_tokens, input_ended), ...])   # one chunk | None per item
    # call step until st.done; t2w.stream(st, token_lists) / t2w.synthesize(st, tokens) for one request

Every request owns a :class:`Token2WavState` (token list, hop, offsets, HiFT caches, noise
generator); the :class:`Token2Wav` object only holds the (read-only) flow and HiFT modules, so any
number of requests can be advanced together with :meth:`Token2Wav.step`, which runs ONE batched
flow call and ONE batched HiFT call for all items that have a chunk ready.

Chunk schedule (upstream ``CosyVoice2Model.tts`` with the per-request hop it should have had):
* hop sizes 25 (+ ``prompt_pad``) -> 50 -> 100 -> 100 ... tokens, where ``prompt_pad = ceil(P/25)*25
  - P`` aligns the first chunk end to the 25-token attention-chunk grid that starts at the prompt;
* a non-final chunk needs ``hop + 3`` unconsumed tokens (the last 3 are look-ahead only) and runs the
  flow with chunk-masked attention (streaming=True, finalize=False). Upstream recomputes prompt +
  all tokens so far every chunk (O(n^2) in the utterance); here each request keeps a
  :class:`~cosyvoice.flow.FlowCache` (attention keys/values and causal-conv inputs of its finished
  frames, per Euler step) and a chunk computes only its new frames - the same frames, linear work.
  When the caches of all live requests would exceed ``StreamConfig.flow_cache_mb``, the request
  whose cache just grew drops it and recomputes its later chunks (the same frames, upstream's cost);
* when the input has ended and no full hop is left, the final chunk: by default the last piece
  with the same chunk-masked attention, reading the cache (linear; what every earlier chunk did).
  Upstream instead reruns the flow over all tokens without chunk masks (streaming=False), which
  costs a whole non-stream pass; ``StreamConfig(exact_final=True)`` does that, for bit parity;
* HiFT caches: the last 8 mel frames and 3840 source samples are prepended/reused by the next chunk,
  and its first 3840 samples are cross-faded (Hamming 7680, float64) with the held-back tail of the
  previous chunk; every non-final chunk holds back its last 3840 samples.
A request with ``stream=False`` gets one chunk, computed when its input ends (non-stream path).
CosyVoice3 (causal HiFT) keeps the same schedule but no HiFT caches or cross-fades: it emits the
samples that re-vocoding all the mel so far would add (non-final calls hold back 8 frames), as
upstream does, but in linear time: each chunk vocodes only its new frames plus the receptive
field R (30 frames for the released config) to their left, with the f0 context and the sine phase
sum carried in the request's :class:`~cosyvoice.hift.CausalVocoderState`
(:meth:`CausalHiFT.inference_stream`).

``speed``: non-stream: the whole mel is linearly resampled to ``int(T / speed)`` frames before the
vocoder (upstream). Streaming (upstream refuses speed != 1 there): each chunk's new mel frames are
resampled the same way before the HiFT cache is prepended, so the caches and cross-fades operate on
the time-scaled signal and the output stays seamless. Below speed 1 the longest hop shrinks with the
speed (to 25 tokens at 0.25), so a chunk holds no more audio, and costs no more, than at speed 1.
v1 (:class:`Token2WavV1`) refuses speed != 1 when streaming, like upstream.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cosyvoice.flow import FlowCache, FlowInput, FlowModel
from cosyvoice.flow.cache import BLOCK, blocks_for
from cosyvoice.hift import CausalHiFT, CausalVocoderState, HiFT, NoiseBuffer

log = logging.getLogger(__name__)
# Slack over the flow-cache bound in a pool that may not grow: the bound is enforced after
# each call, one cache dropped per stream in it, so a call's streams can leave the pool past it.
POOL_OVERSHOOT = 1.25
PROMPT_SHARE = 0.25  # of the bound, speakers' prompts kept for streams to start from


@dataclass(frozen=True)
class StreamConfig:
    token_hop_len: int = 25  # first hop; must equal the flow's static chunk size (tokens)
    token_max_hop_len: int = 100
    stream_scale_factor: int = 2
    pre_lookahead_len: int = 3
    token_mel_ratio: int = 2
    mel_cache_len: int = 8
    samples_per_frame: int = 480
    exact_final: bool = False  # final chunk: upstream's full-attention recompute of everything
    flow_cache_mb: float = 8192.0  # all requests' flow caches; past it a request recomputes
    # a non-stream utterance whose one flow call would cover more positions, its prompt's
    # included (20 s), is vocoded in hops like a stream (the prompt first, in pieces): one call
    # over all of it held every other stream's step up for seconds to minutes (four 29 s
    # recordings' one-word replies, 8 s)
    max_whole_tokens: int = 500

    @property
    def source_cache_len(self) -> int:
        return self.mel_cache_len * self.samples_per_frame


@dataclass
class Token2WavState:
    """Per-request streaming state. Create with :meth:`Token2Wav.new_state`."""

    prompt_token: torch.Tensor  # (P,) int
    prompt_feat: torch.Tensor  # (2P, 80)
    embedding: torch.Tensor  # (192,)
    stream: bool = True
    speed: float = 1.0
    generator: torch.Generator | None = None  # HiFT noise; None = zero noise
    hop: int = 25
    tokens: list[int] = field(default_factory=list)
    token_offset: int = 0
    input_done: bool = False
    done: bool = False
    cache_mel: torch.Tensor | None = None  # (80, 8)
    cache_source: torch.Tensor | None = None  # (3840,)
    cache_speech: torch.Tensor | None = None  # (3840,)
    prompt_pad: int = 0  # extra first-hop tokens aligning the first chunk to the chunk grid
    # v3 (CausalHiFT): the vocoder's window of the last mel frames, f0/phase state and noise
    vocoder: CausalVocoderState | None = None
    flow_cache: FlowCache | None = None  # streaming: the flow state of the finished frames
    in_hops: bool = False  # a whole (non-stream) utterance vocoded in hops (max_whole_tokens)
    in_prompt: bool = False  # its prompt's part of the flow state is still to compute
    n_chunks: int = 0
    n_samples: int = 0


def hamming(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """numpy's symmetric Hamming window (float64; the cross-fade weights upstream uses)."""
    return torch.from_numpy(np.hamming(n)).to(device)


def fade_in_out(new: torch.Tensor, old: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the first len(window)/2 samples (last dim) of ``new`` with the last ones of
    ``old`` (float64 window and blend, rounded once to float32), on their device."""
    n = len(window) // 2
    w = window.to(new.device)
    out = new.clone()
    k = min(n, new.shape[-1])
    o = old[..., old.shape[-1] - n : old.shape[-1] - n + k].double()
    out[..., :k] = (new[..., :k].double() * w[:k] + o * w[n : n + k]).to(new.dtype)
    return out


def stretch(mel: torch.Tensor, speed: float) -> torch.Tensor:
    """Mel frames (C, T) time-stretched for ``speed``: linear interpolation to int(T / speed)
    frames, as upstream, but never to none (a one-token segment at speed 4 keeps a frame:
    interpolate refuses a size of 0, and that token was spoken)."""
    if speed == 1.0 or mel.shape[-1] == 0:
        return mel
    return F.interpolate(mel[None], size=max(1, int(mel.shape[-1] / speed)), mode="linear")[0]


def _validated(items, vocab: int) -> list[list[int]]:
    """New tokens of every item as int lists; raises ValueError (before any state changes) for a
    finished state or a token id outside [0, vocab), naming the item, so a scheduler can fail just
    that request and step the others again."""
    out = []
    for i, (st, new, _) in enumerate(items):
        if st.done:
            raise ValueError(f"item {i}: step() on a finished state")
        new = new.reshape(-1).tolist() if isinstance(new, torch.Tensor) else [int(t) for t in new]
        bad = [t for t in new if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"item {i}: speech token ids out of range [0, {vocab}): {bad[:5]}")
        out.append(new)
    return out


def to_host(chunks: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """A step's audio chunks as CPU float32 tensors, each in memory of its own (a slice of the
    batch's buffer, pinned or not, would keep all of it while a slow client holds the chunk).
    From a GPU: ONE asynchronous copy of all of them into pinned memory and one wait, after the
    whole flow + vocoder batch was queued (each ``.cpu()`` would stall the host until the
    device drained, once per chunk)."""
    out = list(chunks)
    on_gpu = [i for i, c in enumerate(chunks) if c is not None and c.is_cuda]
    if on_gpu:
        flat = torch.cat([chunks[i].reshape(-1).float() for i in on_gpu])
        host = torch.empty(flat.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        torch.cuda.current_stream(flat.device).synchronize()
        for i, piece in zip(on_gpu, host.split([out[i].numel() for i in on_gpu]), strict=True):
            out[i] = piece
    return [None if c is None else _own(c.float().cpu()) for c in out]


def _own(c: torch.Tensor) -> torch.Tensor:
    return c if c.untyped_storage().nbytes() == c.nbytes else c.clone()


def _vocoded(
    st: Token2WavState | Token2WavV1State,
    mel: torch.Tensor,
    speech: torch.Tensor,
    source: torch.Tensor,
    final: bool,
    cfg: StreamConfig | StreamConfigV1,
    window: torch.Tensor,
) -> torch.Tensor:
    """A vocoded chunk's audio, cross-faded into the last chunk's tail. Unless it is the last,
    its own tail is held back and kept, with the mel and source the next chunk goes on from:
    copies, as a view would keep the whole batch's buffers alive until the next chunk."""
    if st.cache_speech is not None:
        speech = fade_in_out(speech, st.cache_speech, window)
    if final:
        st.cache_mel = st.cache_source = st.cache_speech = None
        return speech
    nc = cfg.source_cache_len
    st.cache_mel = mel[:, -cfg.mel_cache_len :].clone()
    st.cache_source, st.cache_speech = source[-nc:].clone(), speech[-nc:].clone()
    return speech[:-nc]


def _append(st: Token2WavState | Token2WavV1State, new: list[int], final: bool) -> None:
    st.tokens.extend(new)
    st.input_done = st.input_done or bool(final)


@dataclass
class _Job:
    state: Token2WavState
    n_tok: int
    final: bool
    streaming: bool
    prompt: bool = False  # a piece of the state's prompt (FlowModel.prompt_piece), no audio
    piece: FlowInput | None = None  # that piece's flow call


class Token2Wav:
    def __init__(self, flow: FlowModel, hift: HiFT, cfg: StreamConfig | None = None, **opts):
        """``opts``: :class:`StreamConfig` fields to override (``exact_final``, ``flow_cache_mb``)."""
        self.flow, self.hift = flow, hift
        cfg = cfg or StreamConfig(
            token_hop_len=flow.cfg.chunk_size or 25,
            pre_lookahead_len=flow.cfg.pre_lookahead_len,
            token_mel_ratio=flow.cfg.token_mel_ratio,
            samples_per_frame=hift.cfg.samples_per_frame,
        )
        self.cfg = dataclasses.replace(cfg, **opts)
        # up to a quarter of the flow state's bound keeps speakers' prompts for streams to
        # start from (the largest when several share the flow), within the bound
        flow.prompts.budget = max(
            flow.prompts.budget, self.cfg.flow_cache_mb * 2**20 * PROMPT_SHARE
        )
        # requests holding a flow cache, for the memory bound (a dropped request just vanishes);
        # the lock: states are made on the caller's thread, stepped on a vocoder thread
        self._cached: weakref.WeakValueDictionary[int, Token2WavState] = (
            weakref.WeakValueDictionary()
        )
        self._cached_lock = threading.Lock()
        self.pieces = 0  # prompts' pieces the last step ran (no audio: FlowModel.prompt_piece)
        self.device = hift.conv_pre.weight.device
        self.window = hamming(2 * self.cfg.source_cache_len, self.device)  # read-only
        self.causal = isinstance(hift, CausalHiFT)
        self.sample_rate = hift.cfg.sampling_rate

    def new_state(
        self,
        embedding: torch.Tensor,
        prompt_token: torch.Tensor | None = None,
        prompt_feat: torch.Tensor | None = None,
        stream: bool = True,
        speed: float = 1.0,
        seed: int | None = None,
    ) -> Token2WavState:
        """``seed``: HiFT noise from a private generator with this seed; None = no noise (the
        deterministic setting the golden fixtures were recorded with)."""
        if speed <= 0:
            raise ValueError("speed must be > 0")
        pt = torch.zeros(0, dtype=torch.long) if prompt_token is None else prompt_token.reshape(-1)
        pf = torch.zeros(0, 80) if prompt_feat is None else prompt_feat.reshape(-1, 80)
        # on the device: drawn on the host, 64 streams' noise cost ~0.9 s of CPU per vocoder call
        g = None if seed is None else torch.Generator(self.device).manual_seed(int(seed))
        h, p = self.cfg.token_hop_len, int(pt.numel())
        st = Token2WavState(
            pt, pf, embedding.reshape(-1), stream, float(speed), None if self.causal else g,
            hop=h, prompt_pad=math.ceil(p / h) * h - p,
        )  # fmt: skip
        if stream:
            self._keep_flow_cache(st)
        if self.causal:
            noise = None if g is None else NoiseBuffer(g, self.hift.cfg.nb_harmonics + 1)
            st.vocoder = CausalVocoderState(noise)
        return st

    def most_tokens(self, st: Token2WavState) -> int | None:
        """The speech tokens ``st`` can take (the flow's noise buffer, past its prompt)."""
        return self.flow.max_tokens(int(st.prompt_token.numel()))

    # ------------------------------------------------------------------ scheduling
    def _plan(self, st: Token2WavState) -> _Job | None:
        if st.done:
            return None
        # (from its first token on: a request cancelled before it costs no flow call)
        if st.in_prompt and st.flow_cache is not None and st.tokens:
            return _Job(st, 0, False, True, prompt=True)
        c = len(st.tokens) - st.token_offset
        # A whole utterance's hops are cheap only over its flow cache: once the memory bound
        # took that, each hop would recompute everything before it, so the rest goes in one call.
        if st.stream and not (st.in_hops and st.flow_cache is None):
            hop = st.hop + (st.prompt_pad if st.token_offset == 0 else 0)
            if c >= hop + self.cfg.pre_lookahead_len:
                return _Job(st, st.token_offset + hop + self.cfg.pre_lookahead_len, False, True)
        if st.input_done:
            return _Job(st, len(st.tokens), True, st.stream and not self.cfg.exact_final)
        return None

    def _keep_flow_cache(self, st: Token2WavState) -> None:
        """A streaming state keeps its flow state, unless the bound allows none."""
        if self.cfg.flow_cache_mb > 0:
            st.flow_cache = FlowCache()
            with self._cached_lock:
                self._cached[id(st)] = st
            # its prompt's part goes through the flow in pieces before its tokens do
            st.in_prompt = self.flow.prompt_part(self._first_input(st)) is not None

    def _add(self, st: Token2WavState, new: list[int], final: bool) -> None:
        _append(st, new, final)
        n, most = len(st.tokens), self.cfg.max_whole_tokens
        long = n > most * min(st.speed, 1.0) or n > 0 and n + st.prompt_token.numel() > most
        if st.input_done and not st.stream and long and self.cfg.flow_cache_mb > 0:
            # too long for one call: in hops (the longest from the start) like a stream
            st.stream, st.in_hops, st.hop = True, True, self._max_hop(st)
            self._keep_flow_cache(st)

    def _max_hop(self, st: Token2WavState) -> int:
        """The longest hop, in tokens. Below speed 1 a token's audio is longer, and so is the
        vocoder's work for it: hops shrink with the speed (to whole first hops, one at least),
        so one request's chunk costs a step no more at speed 0.25 than at 1. Likewise a whole
        utterance goes in hops past ``max_whole_tokens`` times the speed."""
        cfg = self.cfg
        if st.speed >= 1.0:
            return cfg.token_max_hop_len
        hops = int(cfg.token_max_hop_len * st.speed) // cfg.token_hop_len
        return max(1, hops) * cfg.token_hop_len

    def _job(self, st: Token2WavState) -> _Job | None:
        """``st``'s job now: the next piece of its prompt while there is one (asked here, where
        flow calls run: the prompt store is theirs), else its chunk when one is ready."""
        j = self._plan(st)
        if j is not None and j.prompt:
            j.piece = self._next_piece(st)
            if j.piece is None:
                j = self._plan(st)
        return j

    def _next_piece(self, st: Token2WavState) -> FlowInput | None:
        """The next piece of ``st``'s prompt (``FlowModel.prompt_piece``); None, and the state
        past its prompt, once there is none (computed, and kept in the store if need be, or
        copied from there). Asked after each piece too, so a chunk ready in the step after the
        last piece is not taken for one."""
        piece = None
        if st.flow_cache is not None:
            piece = self.flow.prompt_piece(self._first_input(st), self.cfg.token_max_hop_len)
        st.in_prompt = piece is not None
        return piece

    def ready(self, st: Token2WavState) -> bool:
        """Whether :meth:`step` would produce a chunk for this state now."""
        return self._plan(st) is not None

    def feed(self, st, tokens: list[int] | torch.Tensor, final: bool = False) -> None:
        """Add tokens (and the end of input) without synthesizing: a scheduler can then hold
        ready items back a few steps to vocode them in one larger batch."""
        (new,) = _validated([(st, tokens, final)], self.flow.cfg.vocab_size)
        self._add(st, new, final)

    @torch.inference_mode()
    def step(self, items: list[tuple[Token2WavState, list[int] | torch.Tensor, bool]]) -> list:
        """Add each item's new tokens (and whether its input has ended), then produce at most one
        chunk per item: a 1-D float32 tensor of samples, or None when the item is not ready.
        All ready items share one flow call and one HiFT call. A state is finished when
        ``state.done``; an item whose input ended may need more calls (one chunk per call) until then.
        """
        jobs: list[_Job | None] = []
        self.pieces = 0  # of the prompts' pieces this step ran
        for (st, _, final), new in zip(
            items, _validated(items, self.flow.cfg.vocab_size), strict=True
        ):
            self._add(st, new, final)
            jobs.append(self._job(st))
        out: list[torch.Tensor | None] = [None] * len(items)
        run = [
            (i, j)
            for i, j in enumerate(jobs)
            if j is not None and (j.n_tok > 0 or j.piece is not None)
        ]
        for i, j in enumerate(jobs):  # nothing to synthesize at all
            if j is not None and j.n_tok == 0 and j.piece is None:
                j.state.done = True
                out[i] = torch.zeros(0)
        if run:
            self._fit_pool([j for _, j in run])
            # (a prompt's piece is moot once the bound took its cache)
            run = [(i, j) for i, j in run if j.piece is None or j.state.flow_cache is not None]
        if not run:
            return out
        mels = self.flow.inference([self._flow_input(j) for _, j in run])
        for _, j in run:
            self._keep_or_drop_cache(j)
        for _, j in run:
            if j.piece is not None:
                self.pieces += 1
                self._next_piece(j.state)
        sound = [k for k, (_, j) in enumerate(run) if j.piece is None]  # pieces make none
        run, mels = [run[k] for k in sound], [mels[k] for k in sound]
        if not run:
            return out
        if self.causal:
            return self._finish_causal(run, mels, out)
        hift_in, caches, gens = [], [], []
        for (_, j), mel in zip(run, mels, strict=True):
            st = j.state
            mel = self._new_frames(st, mel)
            if st.cache_mel is not None:
                mel = torch.cat([st.cache_mel, mel], dim=-1)
            hift_in.append(mel)
            caches.append(st.cache_source)
            gens.append(st.generator)
        res = self.hift.inference(hift_in, caches, gens)
        for (i, j), mel, (speech, source) in zip(run, hift_in, res, strict=True):
            chunk = _vocoded(j.state, mel, speech, source, j.final, self.cfg, self.window)
            self._advance(j, chunk)
            out[i] = chunk
        return to_host(out)

    def warm(self, batches: list[int], hops: int = 3) -> None:
        """Before requests come, for a flow under CUDA graphs: size its pool (:meth:`_size_pool`),
        then run the first ``hops`` chunks of streams at each batch size, largest first, so that
        the shapes of a stream's first seconds (hops of 25, 50 and 100 tokens) are captured
        before a listener waits on them; longer streams' and final chunks' shapes run eagerly
        when first met, and are captured when the model is idle (``let_go``) or at a later call."""
        self._chunks(max(batches), 1)  # makes the pool's tensors: their bytes per position
        if self.flow.pool.position_bytes["frames"]:
            self._size_pool(max(batches))
        for b in sorted(batches, reverse=True):
            self._chunks(b, hops)
        if self.flow.graphs is not None:  # (None: a capture failed, the flow runs eagerly)
            self.flow.graphs.defer = True  # shapes met from now on are captured when idle

    def _size_pool(self, batch: int) -> None:
        """Graphs over the pool stay valid only while it does not grow, so it is made as large
        as streams under the memory bound get: the bound (streams overshoot it a little) and
        one call of ``batch`` streams at the longest hop; a call past that (new streams with
        long prompts) drops caches first (:meth:`_fit_pool`). Within the device's room: where
        that is less, the bound is lowered to fit (on a GPU the default bound, half the free
        memory at load, always is: a pool grown past the device's memory fails every stream)."""
        pool, cfg = self.flow.pool, self.cfg
        per_token = self._token_bytes()
        call = self._call_tokens(batch)
        bound = cfg.flow_cache_mb * 2**20 / per_token  # tokens
        # the warm-up's first call grew the pool for `batch` streams (15 GB of the full
        # CosyVoice2 in float32 at 64): that memory is the pool's to take again, not used
        pool.drop()
        if self.flow.graphs is not None:  # and the graphs captured over it, with their memory
            self.flow.graphs.drop()
        # the prompts' copies live outside the pool, in the same device memory
        fits = (self._room() / per_token - call) / (POOL_OVERSHOOT + PROMPT_SHARE)
        if fits < bound:
            self.cfg = dataclasses.replace(cfg, flow_cache_mb=max(fits, 0) * per_token / 2**20)
            self.flow.prompts.budget = min(
                self.flow.prompts.budget, self.cfg.flow_cache_mb * 2**20 * PROMPT_SHARE
            )
            log.info(
                "flow cache bound: %.0f MB, to fit the device with one call of %d streams",
                self.cfg.flow_cache_mb,
                batch,
            )
            bound = max(fits, 0)
        if not math.isfinite(bound):
            return
        # a slot per stream holding a cache: 4x the batch (slots 0 and 1 are no stream's)
        pool.presize(self._blocks_for(POOL_OVERSHOOT * bound + call), 4 * batch + 2)

    def reserve_room(self) -> None:
        """On the CPU, where a page costs nothing until it is first written, the flow pool's
        tensors are made with room for all the state the memory bound lets streams hold
        (address space, :attr:`FlowPool.room`), so that the pool's growth does not copy: a
        copy takes the state's memory a second time, a page fault per page (a 6 s stream's
        first call after warm-up copied 1.2 GB of a full CosyVoice2's state in float32). The
        layers' sizes must be known: call after a flow call. No more than the machine's memory:
        a tensor past it is refused even as address space (Linux's overcommit heuristic)."""
        per_token = self._token_bytes()
        if self.device.type != "cpu" or not per_token or self.cfg.flow_cache_mb <= 0:
            return
        bound = self.cfg.flow_cache_mb * 2**20 / per_token
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / per_token
        tokens = min(POOL_OVERSHOOT * bound + self._call_tokens(1), ram)
        self.flow.pool.room = self._blocks_for(tokens)

    def _token_bytes(self) -> float:
        """A token's flow state over every layer (0 before the pool's first call)."""
        pool = self.flow.pool  # (as its layers were, if it has let its tensors go since)
        return pool.bytes_for(1, self.cfg.token_mel_ratio) - pool.bytes_for(0, 0)

    def _call_tokens(self, batch: int) -> int:
        """The positions one call of ``batch`` streams at the longest hop may take."""
        cfg = self.cfg
        return batch * (blocks_for(cfg.token_max_hop_len + cfg.pre_lookahead_len) + 1) * BLOCK

    def _blocks_for(self, tokens: float) -> dict[str, int]:
        blocks = tokens / BLOCK
        return {"tokens": int(blocks), "frames": int(self.cfg.token_mel_ratio * blocks)}

    def _room(self) -> float:
        """Bytes the flow's pool may take on its device: 0.6 of the free memory on a GPU (with
        what the allocator holds unused given back first: it is free for the pool too)."""
        dev = self.flow.input_embedding.weight.device
        if dev.type != "cuda":
            return math.inf
        torch.cuda.synchronize(dev)  # (once, at warm-up) so freed tensors' blocks go back too
        torch.cuda.empty_cache()
        return 0.6 * torch.cuda.mem_get_info(dev)[0]

    def keep_prompt(
        self, embedding: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor
    ) -> Generator[None, None, bool]:
        """Compute a speaker's prompt part of a stream's flow state now and keep it in the
        flow's store (see ``FlowModel.keep_prompt``): its streams start past it from the
        first. A generator: each ``next()`` is one bounded flow call; drive it where
        :meth:`step` is called, letting steps run between. Returns whether it is kept."""
        st = self._prompt_state(embedding, prompt_token, prompt_feat)
        if st is None:
            return False
        try:
            return (yield from self.flow.keep_prompt(self._first_input(st)))
        finally:
            st.flow_cache.release()

    def forget_prompt(
        self, embedding: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor
    ) -> bool:
        """Drop a speaker's prompt from the flow's store (the speaker was deleted); called
        where :meth:`step` is called."""
        st = self._prompt_state(embedding, prompt_token, prompt_feat)
        return st is not None and self.flow.forget_prompt(self._first_input(st))

    def _prompt_state(self, *speaker: torch.Tensor) -> Token2WavState | None:
        """A stream's state for a speaker's prompt alone, with a flow cache the memory bound
        does not count or take (the prompt store bounds what it holds, and it is gone at the
        end of the call that made it); None when the bound keeps no state at all."""
        if self.cfg.flow_cache_mb <= 0:
            return None
        st = self.new_state(*speaker, stream=False)  # not among the bound's streams
        st.flow_cache = FlowCache()
        return st

    def _first_input(self, st: Token2WavState) -> FlowInput:
        """A stream's first flow call before it has any token: what its prompt alone decides."""
        return self._flow_input(_Job(st, 0, False, True))

    def _chunks(self, b: int, hops: int) -> None:
        """The first ``hops`` chunks of ``b`` streams of silence, together."""
        states = [self.new_state(torch.zeros(self.flow.cfg.spk_embed_dim)) for _ in range(b)]
        new = [self.cfg.token_hop_len + self.cfg.pre_lookahead_len] * b
        for _ in range(hops):
            self.step([(st, [0] * n, False) for st, n in zip(states, new, strict=True)])
            new = [st.hop for st in states]
        for st in states:
            if st.flow_cache is not None:
                st.flow_cache.release()

    def _flow_input(self, j: _Job) -> FlowInput:
        """The flow call of a job: new frames only (from the request's token offset), over its
        cache when it streams (upstream's exact final pass recomputes without one); a piece of
        its prompt's."""
        if j.piece is not None:
            return j.piece
        st = j.state
        return FlowInput(
            torch.tensor(st.tokens[: j.n_tok], dtype=torch.long),
            st.prompt_token,
            st.prompt_feat,
            st.embedding,
            streaming=j.streaming,
            finalize=j.final,
            emit_from=st.token_offset * self.cfg.token_mel_ratio,
            cache=st.flow_cache if j.streaming else None,
        )

    def _fit_pool(self, jobs: list[_Job]) -> None:
        """A pool sized to the device (under CUDA graphs, :meth:`_size_pool`) may not grow: where
        this call would take more blocks than it has free (new streams with long prompts, past
        what the sizing foresaw), the streams that would take the most drop their caches and
        recompute (the same frames, at upstream's cost). Grown, it ran out of device memory."""
        if not self.flow.pool.pinned:
            return
        cached = [j for j in jobs if j.state.flow_cache is not None]
        while cached and not self.flow.fits([self._flow_input(j) for j in cached]):
            most = max(
                cached, key=lambda j: sum(self.flow.blocks_needed(self._flow_input(j)).values())
            )
            with self._cached_lock:
                self._drop_cache(most.state)
            cached = [j for j in cached if j is not most]  # (== compares their tensors)

    def _keep_or_drop_cache(self, j: _Job) -> None:
        """A finished request frees its cache. When all requests' caches are past the memory
        bound, the largest goes (a long whole utterance paced in hops, say, not the stream
        that just grew): its request recomputes its later chunks from scratch (the same
        frames, at upstream's cost), or, a whole utterance in hops, ends in one call."""
        if j.state.flow_cache is None:
            return
        with self._cached_lock:
            if j.final:
                self._drop_cache(j.state)
                return
            # a snapshot of the refs: a state collected meanwhile (on any thread) is just None
            refs = self._cached.data.copy().values()
            cached = [st for r in refs if (st := r()) is not None and st.flow_cache is not None]
            bound = self.cfg.flow_cache_mb * 2**20
            # the prompt store's part (its budget may be another Token2Wav's, on one flow)
            held = sum(st.flow_cache.nbytes for st in cached)
            if held + min(self.flow.prompts.nbytes, bound * PROMPT_SHARE) > bound:
                self._drop_cache(max(cached, key=lambda st: st.flow_cache.nbytes))

    def drop(self, st: Token2WavState) -> None:
        """A request ended before its last chunk (cancelled, or failed): its flow state goes
        back to the pool now, not when collected. Never while a step vocodes it."""
        with self._cached_lock:
            if st.flow_cache is not None:
                self._drop_cache(st)

    def _drop_cache(self, st: Token2WavState) -> None:  # with the lock held
        st.flow_cache.release()  # the pool's blocks go back now, not at gc
        st.flow_cache, st.in_prompt = None, False
        self._cached.pop(id(st), None)

    def _new_frames(self, st: Token2WavState, mel: torch.Tensor) -> torch.Tensor:
        """A flow output's new frames in float32 (still on the device: the vocoder runs there),
        time-stretched by the request's speed where that applies."""
        mel = mel.float()
        if st.stream or st.token_offset == 0:
            mel = stretch(mel, st.speed)
        return mel

    def _advance(self, j: _Job, chunk: torch.Tensor) -> None:
        st = j.state
        if j.final:
            st.done = True
        else:
            st.token_offset = j.n_tok - self.cfg.pre_lookahead_len
            st.hop = min(self._max_hop(st), st.hop * self.cfg.stream_scale_factor)
        st.n_chunks += 1
        st.n_samples += chunk.numel()

    def _finish_causal(self, run, mels, out):
        """v3: each request's new mel frames through the causal HiFT's streaming window (linear
        time; the samples re-vocoding all its mel would add)."""
        res = self.hift.inference_stream(
            [j.state.vocoder for _, j in run],
            [self._new_frames(j.state, mel) for (_, j), mel in zip(run, mels, strict=True)],
            [j.final for _, j in run],
        )
        for (i, j), chunk in zip(run, res, strict=True):
            self._advance(j, chunk)
            out[i] = chunk
        return to_host(out)

    # ------------------------------------------------------------------ single-request helpers
    def stream(self, st: Token2WavState, token_chunks):
        """Generator: feed an iterable of token lists (the LLM output as it arrives), yield audio
        chunks as soon as they are ready, then the rest after the input ends."""
        for toks in token_chunks:
            self.feed(st, toks)
            while self.ready(st):
                (c,) = self.step([(st, [], False)])
                if c is not None:  # (None: a piece of its prompt)
                    yield c
        while not st.done:
            (c,) = self.step([(st, [], True)])
            if c is not None:
                yield c

    def synthesize(self, st: Token2WavState, tokens) -> torch.Tensor:
        """All tokens at once -> the whole waveform (concatenated chunks if ``st.stream``)."""
        chunks = list(self.stream(st, [list(torch.as_tensor(tokens).reshape(-1).tolist())]))
        return torch.cat(chunks) if chunks else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
# v1 (CosyVoice-300M, 22.05 kHz): fixed 100-token hops with 20 overlap tokens, flow cache, mel
# overlap cross-fade (34 frames) and HiFT caches (20 mel frames / 5120 samples).


@dataclass(frozen=True)
class StreamConfigV1:
    token_hop_len: int = 100
    token_overlap_len: int = 20
    mel_overlap_len: int = 34
    mel_cache_len: int = 20
    source_cache_len: int = 20 * 256


@dataclass
class Token2WavV1State:
    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor
    stream: bool = True
    speed: float = 1.0
    generator: torch.Generator | None = None  # HiFT noise; None = zero noise
    flow_generator: torch.Generator | None = None  # flow noise (v1 draws it every call)
    flow_noise: list[torch.Tensor] = field(default_factory=list)  # test hook: z per flow call
    tokens: list[int] = field(default_factory=list)  # not yet consumed (incl. the overlap)
    input_done: bool = False
    done: bool = False
    flow_cache: torch.Tensor | None = None
    mel_overlap: torch.Tensor | None = None
    in_hops: bool = False  # never: v1 vocodes a whole utterance in one call
    in_prompt: bool = False  # never: v1's flow keeps no prompt state
    cache_mel: torch.Tensor | None = None
    cache_source: torch.Tensor | None = None
    cache_speech: torch.Tensor | None = None
    n_chunks: int = 0
    n_samples: int = 0


class Token2WavV1:
    """Same API as :class:`Token2Wav` for the v1 family. Flow calls run per request (v1 flow is
    not batched); HiFT runs batched."""

    pieces = 0  # never: v1's flow keeps no prompt state to compute in pieces

    def __init__(self, flow, hift: HiFT, cfg: StreamConfigV1 | None = None):
        self.flow, self.hift = flow, hift
        self.cfg = cfg or StreamConfigV1(source_cache_len=20 * hift.cfg.samples_per_frame)
        self.mel_window = hamming(2 * self.cfg.mel_overlap_len)
        self.window = hamming(2 * self.cfg.source_cache_len)
        self.sample_rate = hift.cfg.sampling_rate

    def most_tokens(self, st: Token2WavV1State) -> int | None:
        return None  # each v1 flow call draws its own noise: no bound

    def new_state(
        self, embedding, prompt_token=None, prompt_feat=None, stream=True, speed=1.0, seed=None
    ):
        if speed <= 0:
            raise ValueError("speed must be > 0")
        if stream and speed != 1.0:  # the 34-frame mel overlap fade needs unscaled chunks
            raise ValueError("v1 streaming supports speed 1.0 only (non-stream applies any speed)")
        pt = torch.zeros(0, dtype=torch.long) if prompt_token is None else prompt_token.reshape(-1)
        pf = torch.zeros(0, 80) if prompt_feat is None else prompt_feat.reshape(-1, 80)
        g = None if seed is None else torch.Generator().manual_seed(int(seed))
        fg = torch.Generator().manual_seed(0 if seed is None else int(seed) + 1)
        return Token2WavV1State(pt, pf, embedding.reshape(-1), stream, float(speed), g, fg)

    def _plan(self, st) -> str | None:
        if st.done:
            return None
        if st.stream and len(st.tokens) >= self.cfg.token_hop_len + self.cfg.token_overlap_len:
            return "chunk"
        return "final" if st.input_done else None

    ready = Token2Wav.ready
    feed = Token2Wav.feed
    _add = staticmethod(_append)  # what feed calls: v1 has no long-utterance switch

    @torch.inference_mode()
    def step(self, items) -> list:
        out: list[torch.Tensor | None] = [None] * len(items)
        run, mels = [], []
        valid = _validated(items, self.flow.cfg.vocab_size)
        for i, ((st, _, final), new) in enumerate(zip(items, valid, strict=True)):
            self._add(st, new, final)
            kind = self._plan(st)
            if kind is None:
                continue
            n = (
                self.cfg.token_hop_len + self.cfg.token_overlap_len
                if kind == "chunk"
                else len(st.tokens)
            )
            if n == 0:
                st.done, out[i] = True, torch.zeros(0)
                continue
            z = st.flow_noise.pop(0) if st.flow_noise else None
            mel, st.flow_cache = self.flow.inference(
                torch.tensor(st.tokens[:n]), st.prompt_token, st.prompt_feat, st.embedding,
                st.flow_cache, z=z, generator=st.flow_generator,
            )  # fmt: skip
            mel = mel.float().cpu()
            if st.mel_overlap is not None:
                mel = fade_in_out(mel, st.mel_overlap, self.mel_window)
            if kind == "chunk":
                st.tokens = st.tokens[self.cfg.token_hop_len :]
            elif st.cache_mel is None:
                mel = stretch(mel, st.speed)
            if st.cache_mel is not None:
                mel = torch.cat([st.cache_mel, mel], dim=-1)
            if kind == "chunk":
                st.mel_overlap = mel[:, -self.cfg.mel_overlap_len :]
                mel = mel[:, : -self.cfg.mel_overlap_len]
            run.append((i, st, kind))
            mels.append(mel)
        if not run:
            return out
        res = self.hift.inference(
            mels, [st.cache_source for _, st, _ in run], [st.generator for _, st, _ in run]
        )
        for (i, st, kind), mel, (speech, source) in zip(run, mels, res, strict=True):
            final = kind == "final"
            chunk = _vocoded(st, mel, speech.cpu(), source.cpu(), final, self.cfg, self.window)
            st.done = st.done or final
            st.n_chunks += 1
            st.n_samples += chunk.numel()
            out[i] = chunk
        return to_host(out)

    stream = Token2Wav.stream
    synthesize = Token2Wav.synthesize


def make_token2wav(flow, hift, **opts):
    """The streaming token2wav for a loaded flow/HiFT pair (v1, v2 or v3). ``opts``: v2/v3
    :class:`StreamConfig` fields (``exact_final``, ``flow_cache_mb``); v1 has no such choices."""
    from cosyvoice.flow.v1 import FlowV1

    return Token2WavV1(flow, hift) if isinstance(flow, FlowV1) else Token2Wav(flow, hift, **opts)
