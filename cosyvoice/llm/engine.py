"""Step API of the speech-token LM for a continuous-batching scheduler.

A request is an :class:`LLMRequest` (its token ids, KV cache, seed, length limits, done
flag). :meth:`LLMEngine.step` runs ONE forward over any subset of live requests: those without a
cache are prefilled, the others decode one token; all are packed into the same forward. Finished
or cancelled requests are simply not passed again; their cache is dropped when they finish (or
when the caller calls :meth:`LLMRequest.cancel`).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import SamplingConfig
from ..devices import Calls, h2d
from .bistream import SPEECH_CHUNK, BistreamState
from .graphs import CONTEXT_BLOCKS, DecodeGraphs
from .kv import KVCache
from .lm import QwenSpeechLM
from .sampling import Draw, Sampler
from .silence import SilentFilter
from .transformer_lm import TransformerSpeechLM

log = logging.getLogger("cosyvoice")

MIN_TOKEN_TEXT_RATIO = 2
MAX_TOKEN_TEXT_RATIO = 20


@dataclass(eq=False)
class LLMRequest:
    """One text segment to turn into speech tokens.

    ``text_ids``: tokens of the text to speak (they set min/max length);
    ``prompt_text_ids`` / ``prompt_speech_tokens``: zero-shot prompt (transcript tokens and the
    aligned prompt speech tokens); ``seed``: 0 = random; ``greedy``: argmax instead of RAS
    (debugging / parity); ``max_len`` may be lowered by the caller before the first step.
    """

    text_ids: Sequence[int]
    prompt_text_ids: Sequence[int] = ()
    prompt_speech_tokens: Sequence[int] = ()
    seed: int = 0
    greedy: bool = False
    embedding: torch.Tensor | None = None  # speaker x-vector (1, 192); used by the v1 LLM only
    min_len: int = -1
    max_len: int = -1
    max_speech: int | None = None  # speech tokens the flow can take (its noise buffer); None: any
    # runtime state
    out_tokens: list[int] = field(default_factory=list)  # every token the LLM produced
    flow_tokens: list[int] = field(default_factory=list)  # what goes on to token2wav (v3 filter)
    cache: KVCache | None = None
    done: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    last_logits: torch.Tensor | None = None  # llm_decoder output of the latest step (V,), float32
    # on the model's device
    silent_filter: SilentFilter | None = None
    bistream: BistreamState | None = None  # set by LLMRequest.streaming()
    prefix: torch.Tensor | None = None  # an input being fed in chunks (a prefix, streamed text)
    prefix_fed: int = 0

    def __post_init__(self) -> None:
        n = len(self.text_ids)
        if n == 0 and self.bistream is None:
            raise ValueError("LLMRequest needs at least one text token")
        if self.min_len < 0:
            self.min_len = int(n * MIN_TOKEN_TEXT_RATIO)
        if self.max_len < 0:
            self.max_len = int(n * MAX_TOKEN_TEXT_RATIO)
        if self.seed == 0:
            self.seed = secrets.randbits(63) or 1

    @classmethod
    def streaming(
        cls,
        prompt_text_ids: Sequence[int] = (),
        prompt_speech_tokens: Sequence[int] = (),
        seed: int = 0,
        greedy: bool = False,
        eop_id: int | None = None,
    ) -> LLMRequest:
        """A bistream request: text arrives later through :meth:`push_text` and ends with
        :meth:`close_text` (v2/v3 only, see :mod:`cosyvoice.llm.bistream`). ``eop_id``: the
        ``<|endofprompt|>`` id for v3 (its system prompt is fed whole, first)."""
        st = BistreamState.start(list(prompt_text_ids), list(prompt_speech_tokens), eop_id)
        return cls(
            text_ids=(),
            prompt_text_ids=prompt_text_ids,
            prompt_speech_tokens=prompt_speech_tokens,
            seed=seed,
            greedy=greedy,
            min_len=0,
            max_len=1 << 30,  # bounded per phase instead (bistream module docstring)
            bistream=st,
        )

    def push_text(self, ids: Sequence[int]) -> None:
        if self.bistream is None:
            raise ValueError("push_text() needs a streaming request")
        self.bistream.push(list(ids))

    def close_text(self) -> None:
        if self.bistream is None:
            raise ValueError("close_text() needs a streaming request")
        self.bistream.closed = True

    @property
    def ready(self) -> bool:
        """Whether :meth:`LLMEngine.step` can run this request now (a streaming request may be
        waiting for more text)."""
        if self.done:
            return False
        return self.bistream is None or self.prefix is not None or self.bistream.ready

    @property
    def started(self) -> bool:
        return self.cache is not None or bool(self.out_tokens)

    @property
    def prefilled(self) -> bool:
        """The whole prefix is in the cache (a chunked prefill may still be running)."""
        return (self.cache is not None and self.prefix is None) or bool(self.out_tokens)

    def cancel(self) -> None:
        self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason
        if self.cache is not None:
            self.cache.release()  # its blocks go back to the pool now
        self.cache = None
        self.prefix, self.prefix_fed = None, 0  # an input cancelled while going in


def _check_steppable(requests: Sequence[LLMRequest]) -> None:
    for r in requests:
        if r.done:
            raise ValueError("step() got a finished request")
        if r.bistream is not None and not r.ready:
            raise ValueError("step() got a streaming request that is waiting for text")
    if len({id(r) for r in requests}) != len(requests):
        raise ValueError("step() got the same request twice")


@dataclass
class _Packed:
    """One step's inputs, packed, and what the step changes in its requests once its forward
    has run (:meth:`commit`)."""

    requests: list[LLMRequest] = field(default_factory=list)  # in the forward
    full: list[LLMRequest] = field(default_factory=list)  # left out: no room in the pool
    embeds: list[torch.Tensor] = field(default_factory=list)  # each request's new positions
    lens: list[int] = field(default_factory=list)
    caches: list[KVCache] = field(default_factory=list)
    fresh: list[tuple[LLMRequest, KVCache]] = field(default_factory=list)  # first step
    # inputs longer than prefill_chunk, and how far they got with this step
    partial: list[tuple[LLMRequest, torch.Tensor, int]] = field(default_factory=list)
    streamed: list[BistreamState] = field(default_factory=list)  # pending inputs taken

    def mid_prefill(self) -> set[int]:
        """The ids of the requests whose input is not all in after this step."""
        return {id(r) for r, prefix, fed in self.partial if fed < prefix.shape[0]}

    def commit(self) -> None:
        """Record the step in its requests."""
        for r, cache in self.fresh:
            r.cache = cache
        for bs in self.streamed:
            bs.pending = []
        for r, prefix, fed in self.partial:
            r.prefix, r.prefix_fed = (None, 0) if fed >= prefix.shape[0] else (prefix, fed)


class LLMEngine:
    """Wraps a loaded speech LM (v2/v3 :class:`QwenSpeechLM`, v1 :class:`TransformerSpeechLM`);
    ``model.llm`` of :func:`cosyvoice.load`."""

    def __init__(self, net: QwenSpeechLM | TransformerSpeechLM, sampling: SamplingConfig) -> None:
        self.net = net
        self.sampling = sampling
        # Chunked prefill: at most this many input positions of a request per step (None: all
        # at once). A prefix's attention costs the square of its length: 5000 tokens of one
        # unpunctuated text took one 5.9 s step on the tiny golden model, every other stream's
        # step included; in chunks, no step costs much more than a new short request's.
        self.prefill_chunk: int | None = 128
        # the scheduler calls from one thread; the lock only guards against accidental sharing
        self._lock = threading.Lock()
        self.graphs: DecodeGraphs | None = None
        self.calls = Calls()  # steps by how they ran
        self.sampler = Sampler(net.speech_token_size, sampling)
        self._idle = self.sampler.idle_row()

    def enable_graphs(self, max_batch: int, capture: bool | None = None) -> None:
        """Run decode steps of up to ``max_batch`` requests at static shapes, replayed as CUDA
        graphs on a GPU (``capture=False``: eagerly, to test the padding on a CPU). v2/v3 only;
        call before any request runs: the KV pool becomes fixed-size."""
        if not isinstance(self.net, QwenSpeechLM):
            raise ValueError("decode graphs need the Qwen2 LM (v2/v3)")
        net, dtype = self.net, self.dtype
        blocks = max_batch * CONTEXT_BLOCKS[-1] + 1
        pool = net.kv_pool(dtype, self.device, blocks=blocks, fixed=True)
        if self.graphs is not None or not pool.fixed or pool.blocks != blocks:
            raise ValueError("enable_graphs() must come once, before the first request")
        self.graphs = DecodeGraphs(net, pool, max_batch, self.sampler, capture)
        try:
            with torch.inference_mode():
                self.graphs.capture_all()
        except Exception:  # the eager step still works (over the same, now fixed, pool)
            log.exception("capturing the LLM's CUDA graphs failed; decode steps run eagerly")
            self.graphs = None

    @property
    def speech_token_size(self) -> int:
        return self.net.speech_token_size

    @property
    def device(self) -> torch.device:
        return self.net.speech_embedding.weight.device  # not a linear's: those may be packed

    @property
    def dtype(self) -> torch.dtype:
        return self.net.speech_embedding.weight.dtype

    def held_blocks(self) -> int:
        """KV blocks the requests hold now (the pool's scratch block not counted)."""
        return self.net.kv_pool(self.dtype, self.device).used_blocks - 1

    def prefill(self, requests: Sequence[LLMRequest]) -> list[int | None]:
        if any(r.started for r in requests):
            raise ValueError("prefill() got a request that already ran")
        chunk, self.prefill_chunk = self.prefill_chunk, None  # the whole prefix, in one forward
        try:
            return self.step(requests)
        finally:
            self.prefill_chunk = chunk

    def decode(self, requests: Sequence[LLMRequest]) -> list[int | None]:
        if not all(r.prefilled for r in requests):
            raise ValueError("decode() got a request that was not prefilled")
        return self.step(requests)

    @torch.inference_mode()
    def step(self, requests: Sequence[LLMRequest]) -> list[int | None]:
        """One forward for all ``requests``; returns each one's new speech token, or None if
        there is none: it finished with a stop token (``done``/``finish_reason``), its chunked
        prefill is not complete yet (``prefill_chunk``), or a streaming request produced *fill*
        and now waits for text (``ready``). A request that reaches
        ``max_len`` returns its last token and is done ("length"). ``r.flow_tokens`` gets the
        tokens meant for token2wav (v3 drops long silent runs, spec §8.5)."""
        _check_steppable(requests)
        if not requests:
            return []
        if self.graphs is not None and len(requests) > (n := self.graphs.max_batch):
            # more than the graphs hold (a library caller; the server's steps are capped):
            # as steps the graphs replay, not one eager forward of all
            return [t for i in range(0, len(requests), n) for t in self.step(requests[i : i + n])]
        batch = self._pack(requests)
        for r in batch.full:
            log.warning("KV pool full: a segment ends early")
            r._finish("length")
        if not batch.requests:
            return [None] * len(requests)
        plan = self._plan(batch)
        rows = [d.row(self.sampling) if isinstance(d, Draw) else self._idle for d in plan]
        with self._lock:  # (the graphs' outputs are read before another step replays them)
            logits, tokens = self._forward(batch, rows)
            # a copy: a replayed graph reuses its output buffer; last_logits outlives the step
            logits = logits.to(torch.float32, copy=True)
            tokens = tokens.tolist()  # the step's one wait for the device
        batch.commit()  # only now: a failed forward leaves requests as they were
        got = []
        for r, d, lg, tok in zip(batch.requests, plan, logits, tokens, strict=True):
            if d is not None:
                r.last_logits = lg
            got.append(None if d is None else self._take(r, d if isinstance(d, int) else tok))
        if not batch.full:
            return got
        by_id = {id(r): t for r, t in zip(batch.requests, got, strict=True)}
        return [by_id.get(id(r)) for r in requests]

    def _forward(self, batch: _Packed, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits and drawn tokens (``rows``: each request's :class:`Draw` row):
        replayed graphs where it fits them (its decode rows as a decode step, its first inputs
        as a prefill: a step where requests join others decoding is two replays), else one
        eager forward of the whole packed batch and the draw."""
        g, caches, lens = self.graphs, batch.caches, batch.lens
        dec = [i for i, (c, n) in enumerate(zip(caches, lens, strict=True)) if c.length and n == 1]
        pre = [i for i in range(len(caches)) if i not in dec]

        def pick(rows: list[int], items: list) -> list:
            return [items[i] for i in rows]

        if (
            g is None
            or (dec and not g.fits(pick(dec, caches)))
            or (pre and not g.fits_prefill(pick(pre, caches), pick(pre, lens)))
        ):
            self.calls["dynamic"] += 1
            logits = self.net.forward_packed(torch.cat(batch.embeds), caches, lens)
            return logits, self.sampler(logits, h2d(rows, logits.device))
        self.calls.at_static_shapes(g.capture)
        if not pre:
            return g.run(batch.embeds, caches, rows)
        got = g.run_prefill(pick(pre, batch.embeds), pick(pre, caches), pick(pre, rows))
        if not dec:
            return got
        logits = got[0].new_empty(len(caches), got[0].shape[-1])
        tokens = got[1].new_empty(len(caches))
        dev = logits.device  # (indices through pinned memory: a list would wait for the device)
        at = h2d(pre, dev)
        logits[at], tokens[at] = got  # copies, first: graphs share their memory pool, so the
        at = h2d(dec, dev)  # decode replay may overwrite a prefill graph's output
        logits[at], tokens[at] = g.run(pick(dec, batch.embeds), pick(dec, caches), pick(dec, rows))
        return logits, tokens

    def _pack(self, requests: Sequence[LLMRequest]) -> _Packed:
        """Each request's input for this step: its last token, its whole prefix, or the next
        chunk of a long one (``prefill_chunk``)."""
        batch = _Packed()
        last = self._last_tokens(requests)
        for r in requests:
            if r.prefix is not None:  # the rest of a long input, a chunk per step
                full, cache, st = r.prefix, r.cache, r.prefix_fed
            else:
                full, cache, st = last.get(id(r)), r.cache, 0
                if full is None:
                    full = self._input(r)
                if cache is None:
                    cache = self.net.new_cache(self.dtype, self.device)
            n = full.shape[0] - st
            if self.prefill_chunk is not None:
                n = min(n, self.prefill_chunk)
            try:  # its blocks now: a pool that may not grow (CUDA graphs) may be full
                cache.reserve(n)
            except MemoryError:  # it ends here alone; raised in the forward, it ended them all
                batch.full.append(r)
                continue
            batch.requests.append(r)
            if r.prefix is None and r.bistream is not None:
                batch.streamed.append(r.bistream)
            if cache is not r.cache:
                batch.fresh.append((r, cache))
            if st or n < full.shape[0]:
                batch.partial.append((r, full, st + n))
            batch.embeds.append(full[st : st + n])
            batch.lens.append(n)
            batch.caches.append(cache)
        return batch

    def _plan(self, batch: _Packed) -> list[Draw | int | None]:
        """What each request of the step draws (a :class:`Draw`), the token forced on it, or
        None: its input is not all in yet."""
        mid = batch.mid_prefill()
        return [None if id(r) in mid else self._draw(r) for r in batch.requests]

    def _last_tokens(self, requests: Sequence[LLMRequest]) -> dict[int, torch.Tensor]:
        """The embedding of each request that feeds only its last token, by ``id(request)``:
        looked up together, so a decode step at batch 64 makes one copy to the device and one
        kernel, not 64 of each."""
        plain = [
            r for r in requests
            if r.started and r.prefix is None and not (r.bistream and r.bistream.pending)
        ]  # fmt: skip
        if not plain:
            return {}
        ids = h2d([r.out_tokens[-1] for r in plain], self.device)  # not waiting for the GPU
        rows = self.net.speech_embedding(ids)
        return {id(r): rows[i : i + 1] for i, r in enumerate(plain)}

    def _input(self, r: LLMRequest) -> torch.Tensor:
        """The embeddings ``r`` feeds next, unless it feeds only its last token: its whole
        prefix (first step) or its streamed inputs (bistream)."""
        net, dev = self.net, self.device
        if r.bistream is not None:  # pending from its start (sos), or _last_tokens took it
            return torch.cat([net.embed_item(k, ids) for k, ids in r.bistream.pending])
        text = torch.tensor([*r.prompt_text_ids, *r.text_ids], dtype=torch.long, device=dev)
        speech = torch.tensor(list(r.prompt_speech_tokens), dtype=torch.long, device=dev)
        return net.prefix_embeds(text, speech, r.embedding)

    def _draw(self, r: LLMRequest) -> Draw | int:
        """What request ``r`` samples this step (or the token forced on it)."""
        gen = None if r.greedy else r.seed
        bs = r.bistream
        if bs is None:
            return Draw(r.out_tokens, len(r.out_tokens) < r.min_len, gen)
        if bs.final:
            return Draw(r.out_tokens, False, gen)
        if len(r.out_tokens) == bs.next_fill:
            return self.net.fill_id  # forced: the block's 15 speech tokens are done
        return Draw(r.out_tokens, True, gen, allow=self.net.fill_id)

    def _take(self, r: LLMRequest, tok: int) -> int | None:
        """Apply ``r``'s new token: stop, fill (a streaming request waits for text) or speech;
        returns the speech token or None."""
        bs = r.bistream
        if bs is not None and not bs.final and tok == self.net.fill_id:
            bs.next_fill = len(r.out_tokens) + SPEECH_CHUNK + 1
            r.out_tokens.append(tok)  # counts for RAS and the schedule, never reaches the flow
            bs.waiting = True
            return None
        if tok >= self.speech_token_size:
            r._finish("stop")
            return None
        self._emit(r, tok)
        if bs is None:
            limit = r.max_len
        elif bs.final:
            limit = MAX_TOKEN_TEXT_RATIO * max(bs.n_text, 1) + 2 * SPEECH_CHUNK
        else:
            limit = None
        # A segment past the flow's limit (text with no sentence end, a long streamed piece)
        # ends there: in a batched flow call it failed every stream of the batch.
        full = r.max_speech is not None and len(r.flow_tokens) >= r.max_speech
        if full or self._context_full(r) or (limit is not None and len(r.out_tokens) >= limit):
            r._finish("length")
        return tok

    def _context_full(self, r: LLMRequest) -> bool:
        """Under the decode graphs, a request whose next decode step has no context bucket
        ends there: past the largest, every step it was in ran eagerly for the whole batch (on
        a GPU several times a replay's time), and it took more than its share of the fixed KV
        pool, which ends other requests. Real speech stays well within it (a 320-token segment
        and a 30 s prompt: about 3800 of 4096 positions); a runaway LLM does not. (A
        text-streaming request's next input may be a block of its text, which may pass it by
        that block for one eager step.)"""
        g = self.graphs
        return g is not None and r.cache is not None and not g.holds(r.cache)

    def _emit(self, r: LLMRequest, tok: int) -> None:
        r.out_tokens.append(tok)
        if self.net.family != "v3":
            r.flow_tokens.append(tok)
            return
        if r.silent_filter is None:
            r.silent_filter = SilentFilter()
        if r.silent_filter.keep(tok):
            r.flow_tokens.append(tok)

    def generate(self, request: LLMRequest) -> list[int]:
        """Run one request to completion alone (tests, scripts)."""
        while not request.done:
            self.step([request])
        return list(request.out_tokens)
