"""The loaded model object returned by :func:`cosyvoice.load`."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import Family, LLMConfig, llm_config, load_model_yaml
from .devices import (
    Calls,
    can_pack_linears,
    pack_linears,
    resolve_device,
    resolve_dtype,
    store_in,
)
from .flow.cache import FlowPool
from .frontend import Frontend
from .frontend.text import MAX_SEGMENT_TOKENS
from .llm.engine import LLMEngine, LLMRequest
from .llm.lm import QwenSpeechLM
from .llm.transformer_lm import TransformerSpeechLM
from .speakers import Speaker, SpeakerError, SpeakerStore, Steering
from .utterance import RUN_TOKENS, Output, Status, TextRun, Utterance, run_cut

log = logging.getLogger("cosyvoice")

EOP = "<|endofprompt|>"  # where v2/v3 prompt text (system, instruction) ends
# What CosyVoice-300M-Instruct was trained to read after an instruction: plain text to its
# tokenizer, put after the instruction as upstream's v1 frontend does.
V1_EOP = "<endofprompt>"
V3_SYSTEM = "You are a helpful assistant."
V3_SYSTEM_PREFIX = V3_SYSTEM + EOP
# What normalizing text may add to a step while other utterances have audio to make (one
# group of sentences at least, ~40 ms on a slow CPU).
NORMALIZE_SLICE_S = 0.02
# seconds of audio an utterance's listener has left to play (None before its first audio)
Slack = Callable[[Utterance], float | None] | None


class _TurnLock:
    """A lock taken in the order it was asked for. keep_prompt takes it once per piece of a
    prompt, letting go between; with a plain lock the keeping thread, still running, would
    take it again before a step that waits for it wakes, and every stream would wait for the
    whole prompt."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._next = self._serving = 0

    def __enter__(self) -> None:
        with self._cv:
            turn, self._next = self._next, self._next + 1
            self._cv.wait_for(lambda: self._serving == turn)

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


@dataclass(eq=False)
class CosyVoiceModel:
    """One model dir: ``frontend`` (text), ``llm`` (batched step API), ``token2wav`` (flow +
    HiFT), ``speakers`` (store), and the utterance API that drives them all
    (:meth:`start`, :meth:`add_text`, :meth:`close_text`, :meth:`step`, :meth:`cancel`).

    ``config`` is the parsed yaml (plain dicts, see :mod:`cosyvoice.config`).
    """

    model_dir: Path
    family: Family
    config: dict[str, Any]
    llm_config: LLMConfig
    frontend: Frontend
    llm: LLMEngine
    speakers: SpeakerStore
    device: torch.device
    dtype: torch.dtype
    token2wav: Any = None  # Token2Wav | Token2WavV1; None when loaded with token2wav=False
    # A ready chunk may wait up to this many steps for others to batch with (see _to_vocode),
    # unless its listener has under run_dry_s of audio left; a long whole utterance's hop
    # whose listener has over ahead_s left (plus two recent steps) waits while others make
    # tokens (its hops, each costlier than the last, would otherwise ride every step).
    vocode_wait_steps: int = 3
    run_dry_s: float = 1.0
    ahead_s: float = 5.0
    # While another listener waits for audio, batches of prompt pieces (a stream's recording
    # going through the flow before its tokens: no audio) take at most this share of the time.
    # Four 29 s recordings' pieces, run as they came, held another stream's first audio 3 s.
    prompt_share: float = 0.5
    # A text-streaming run ends at its first sentence end past run_tokens text tokens, and
    # takes no more than run_cap (see :data:`cosyvoice.utterance.RUN_TOKENS`).
    run_tokens: int = RUN_TOKENS
    run_cap: int = MAX_SEGMENT_TOKENS
    # token2wav on a thread of its own (and its own CUDA stream), so decode steps go on while
    # a batch is vocoded; its audio is handed out by a later step (see _advance)
    vocoder_thread: bool = False
    _steps: int = field(default=0, repr=False)
    _step_s: float = field(default=0.0, repr=False)  # recent steps' longest time (decaying)
    _pieces_due: float = field(default=0.0, repr=False)  # when prompt pieces may run again
    _vocoder: ThreadPoolExecutor | None = field(default=None, repr=False)
    _slice_end: float = field(default=0.0, repr=False)  # this step's time for normalizing
    _free_group: bool = field(default=False, repr=False)  # a group not yet taken this step
    _vocoder_stream: Any = field(default=None, repr=False)
    # one flow call at a time when they run inline (steps, keep_prompt from another thread)
    _flow_lock: _TurnLock = field(default_factory=_TurnLock, repr=False)
    _inflight: deque[tuple[Future, list[Utterance]]] = field(default_factory=deque, repr=False)
    _outbox: list[Output] = field(default_factory=list, repr=False)

    @property
    def sample_rate(self) -> int:
        if self.token2wav is not None:
            return self.token2wav.sample_rate
        return int(self.config.get("sample_rate", 24000))

    @property
    def instructions(self) -> bool:
        """Whether :meth:`instructed` works: CosyVoice2/3 (instruct2), and CosyVoice-300M-Instruct,
        which holds the same files as the other v1 dirs; upstream tells it by its dir's name."""
        names = (self.model_dir.name, self.model_dir.resolve().name)
        return self.family != "v1" or any("-instruct" in n.lower() for n in names)

    @property
    def text_streaming(self) -> bool:
        """Whether utterances can take ``text_stream=True`` (bistream needs the Qwen2 LM)."""
        return self.family != "v1"

    def held(self) -> dict[str, int]:
        """What live utterances hold: KV blocks of the LLM's pool and blocks and slots of the
        flow's (v2/v3 streams); both 0 once every utterance finished or was cancelled."""
        pool = self._flow_pool
        return {"kv_blocks": self.llm.held_blocks(), "flow_blocks": pool.held if pool else 0}

    def let_go(self) -> bool:
        """Nothing is synthesizing (the caller knows): the flow's state pool lets its tensors
        go once it has been idle for its ``hold_s`` (GBs after a burst on the CPU, which the
        next burst soon after would take from the OS again). On a GPU, one CUDA graph for a
        flow shape met since warm-up is captured, while nobody waits on it. True while either
        has more to do (call again while still idle)."""
        left = 0
        if (pool := self._flow_pool) is not None:
            if capture := getattr(self.token2wav.flow, "capture_pending", None):
                left = self._where_flow_runs(capture)
            left += pool.shrink_if_idle(drop=True)
        return left > 0

    @property
    def _flow_pool(self) -> FlowPool | None:
        return getattr(getattr(self.token2wav, "flow", None), "pool", None)

    # ---- utterances ----------------------------------------------------------------------

    def start(
        self,
        speaker: str | Speaker,
        seed: int = 0,
        speed: float = 1.0,
        stream: bool = True,
        **opts: Any,
    ) -> Utterance:
        """A new utterance in ``speaker``'s voice (raises ``SpeakerError`` for an unknown one;
        a Speaker object is used as it is). ``seed`` 0 picks a random one. ``opts``: the other
        :class:`Utterance` fields."""
        voice = self._steered_now(self._voice(speaker))
        if not speed > 0:
            raise ValueError("speed must be > 0")
        if opts.get("text_stream") and not self.text_streaming:
            raise ValueError("text streaming needs a CosyVoice2/3 model")
        if self.family == "v1" and speed != 1.0:
            stream = False  # v1's streaming vocoder cannot time-scale: one chunk per segment
        seed = seed or secrets.randbits(62) + 1
        return Utterance(voice.name, seed, speed, stream, voice=voice, **opts)

    def add_text(self, utt: Utterance, text: str, tag: Any = None) -> None:
        """Queue a piece of text: normalized and split into segments (one LLM run each). Its
        audio comes out tagged ``tag``; a piece with nothing speakable still ends (empty)."""
        if utt.closed or utt.status is Status.FINISHED:
            raise ValueError("add_text() after close_text() or the end of the utterance")
        if utt.text_stream:
            self._stream_text(utt, text, tag)
            return
        # Normalized by the steps that start it (a long text takes seconds on a CPU: spread
        # over several steps, it never stalls the other utterances' audio).
        utt.pending.append((tag, self.frontend.split_steps(text, utt.text_frontend), True))
        utt.status = Status.RUNNING

    def _stream_text(self, utt: Utterance, text: str, tag: Any) -> None:
        """Text streaming: a fragment joins the open run of its tag (a new tag seals the
        previous run and opens one). Raw text: fragments are not normalized."""
        run = utt.open_run
        if run is None or run.tag != tag:
            self.seal(utt)
            run = utt.open_run = TextRun(tag)
            utt.pending.append((tag, run, True))
        run.add(text)
        self._push_run(utt, run)
        utt.status = Status.RUNNING

    def seal(self, utt: Utterance) -> None:
        """Text streaming: the open piece is complete (its run decodes to the end)."""
        run, utt.open_run = utt.open_run, None
        if run is not None:
            run.sealed = True
            self._push_run(utt, run)

    def _push_run(self, utt: Utterance, run: TextRun) -> None:
        """Give a started run (``utt``'s segment in flight) the text it may have now."""
        if run.llm is None:
            return  # not started: its text goes in when it starts
        text = run.take()
        if text and run.llm.done:  # it reached a limit (the flow's 300 s, a full KV pool)
            if not run.cut:
                log.warning("text for a streamed piece that already ended: not spoken")
            run.cut = True
        elif text:
            taken = run.llm.bistream.n_text
            # (a token is at least a byte: short text skips the search for a cut; a long one,
            # piled up while the run was queued, is read only up to its cut, so a reply that
            # goes through many runs costs linear time)
            if taken + len(text.encode()) >= self.run_tokens:
                cut = run_cut(text, taken, self._text_tokens, self.run_tokens, self.run_cap)
                if cut is not None and (text[cut:].strip() or not run.sealed):
                    self._go_on(utt, run, text[:cut], text[cut:])
                    return
            run.llm.push_text(self.frontend.encode(text))
        if run.sealed and not run.llm.bistream.closed and not run.llm.done:
            if run.llm.bistream.n_text:
                run.llm.close_text()
            else:  # a run that got no text (the piece's text ended where its last run did):
                run.llm.cancel()  # closed, the LLM would speak from none (up to 2 s of it)

    def _go_on(self, utt: Utterance, run: TextRun, head: str, rest: str) -> None:
        """End ``run``'s LLM after ``head``: the rest of its piece goes to a new run, queued
        next (see :data:`RUN_TOKENS`)."""
        if head := head.rstrip():
            run.llm.push_text(self.frontend.encode(head))
        run.llm.close_text()
        run.llm = None
        tail = rest + run.tail
        run.tail = tail.lstrip()  # (a new run starts at a word, as a whole text's segment does)
        run.ready = max(len(rest) - (len(tail) - len(run.tail)), 0)
        utt.pending.appendleft((run.tag, run, True))
        utt.tag_last = False

    def _text_tokens(self, text: str) -> int:
        return len(self.frontend.encode(text))

    def close_text(self, utt: Utterance) -> None:
        """No more text: the utterance finishes once everything queued is spoken."""
        self.seal(utt)
        utt.closed = True
        if utt.status is Status.WAITING:
            utt.status = Status.RUNNING  # a step reports the end

    def cancel(self, utt: Utterance) -> None:
        """Stop now and free the utterance's KV blocks and vocoder state (idempotent)."""
        if utt.llm is not None and not utt.llm.done:
            utt.llm.cancel()
        if utt.t2w is not None and not utt.vocoding:  # (else with the batch in flight)
            self.token2wav.drop(utt.t2w)
        utt.llm = utt.t2w = None
        utt.pending.clear()
        utt.status = Status.FINISHED

    def step(self, utts: list[Utterance], slack: Slack = None) -> list[Output]:
        """Advance every busy utterance by one step: ONE packed LLM forward for all of them,
        then (when chunks are ready) ONE batched flow call and ONE HiFT call. ``slack(u)``:
        seconds of audio ``u``'s listener has left to play (None before its first audio), so
        a chunk about to be missed is vocoded now instead of waiting a few steps to share the
        batch, and a long whole utterance's hop far ahead of its listener waits while others
        have work.

        Per-utterance problems (its speaker was deleted) end that utterance with an output
        whose ``error`` is set; an exception means the whole step failed."""
        self._collect(wait=False)  # vocoded batches first: they may end segments
        # Text is normalized within a slice of the step while others have (or will have) audio
        # to make; with nobody to stall, at once. One group is free each step, whatever the
        # slice, so the text gets on.
        began = time.perf_counter()
        others = len(utts) > 1 or any(u.in_flight for u in utts)
        self._slice_end = began + NORMALIZE_SLICE_S if others else float("inf")
        self._free_group = True
        active = self._start(utts)
        if active:
            self._advance(active, slack, utts)
        # outputs wait in the outbox until a step returns: collected audio outlives a step
        # that raises, and goes out with the next one
        out, self._outbox = self._outbox, []
        self._step_s = max(time.perf_counter() - began, 0.9 * self._step_s)
        return out

    def _start(self, utts: list[Utterance]) -> list[Utterance]:
        """Those of ``utts`` with a segment in flight (started now if need be); of the others,
        those whose next piece is still being normalized go on, the rest wait or end."""
        just_done = {id(o.utterance) for o in self._outbox if o.done}
        active: list[Utterance] = []
        for u in utts:
            if id(u) in just_done:
                continue
            if u.status is Status.FINISHED:
                raise ValueError("step() got a finished utterance")
            try:
                if u.in_flight:
                    self._normalized(u)  # the next piece, while this one plays
                started = u.in_flight or self._next_segment(u)
            except Exception as exc:  # noqa: BLE001 - reported on this utterance only
                log.exception("could not start a segment")
                self.cancel(u)
                self._outbox.append(_failed(u, exc))
                continue
            if started:
                active.append(u)
            elif u.preparing:
                continue
            elif u.closed:
                u.status = Status.FINISHED
                self._outbox.append(Output(u, _EMPTY, done=True))
            else:
                u.status = Status.WAITING
        return active

    def _advance(self, active: list[Utterance], slack: Slack, utts: list[Utterance]) -> None:
        llm = [u.llm for u in active if u.llm.ready]  # not: done, or waiting for text
        if llm:
            self.llm.step(llm)
        idle = [u for u in active if not u.vocoding]  # a state being vocoded is the thread's
        for u in idle:
            self._feed(u)
        self._steps += 1
        ready = []
        for u in idle:
            u.chunk_ready = self.token2wav.ready(u.t2w)
            if u.chunk_ready:
                u.ready_since = u.ready_since or self._steps
                ready.append(u)
        ready = self._to_vocode(active, ready, slack)
        if ready:
            items = [(u.t2w, [], u.llm.done) for u in ready]
            # (read before the thread may change it)
            audible = [u for u in ready if not u.t2w.in_prompt]
            if self.vocoder_thread:
                for u in ready:
                    u.vocoding = True
                if len(audible) < len(ready):  # no more pieces until these are done
                    self._pieces_due = math.inf
                self._inflight.append((self._vocoder_pool().submit(self._vocode, items), ready))
                if self._wait_for_batch(utts, audible, slack):
                    while self._inflight:  # one worker: the batch is the last one queued
                        self._collect(wait=True)
            else:
                try:
                    with self._flow_lock:
                        chunks = self._flow_step(items)
                except Exception as exc:  # noqa: BLE001 - as on the vocoder thread (_collect)
                    self._fail(ready, exc)
                else:
                    self._outputs(ready, chunks)
        if self._inflight and not llm:
            self._collect(wait=True)  # nothing else to do meanwhile

    def _wait_for_batch(
        self, utts: list[Utterance], audible: list[Utterance], slack: Slack
    ) -> bool:
        """Whether the steps stop until this batch is vocoded instead of going on beside it: its
        ``audible`` part (not prompts' pieces) carries a listener's first audio (or audio about
        to be missed) and no other listener of ``utts`` (those between segments too) is about
        to run dry meanwhile. Beside it, the steps' Python contends with the batch's for the
        GIL and their kernels with its on the GPU: an H200 gave one stream its first audio in
        178-210 ms inline and 218-222 ms beside the steps, 16 streams in 270-286 vs 324-472 ms
        (bench/ttfa_split.py)."""

        batch = {id(u) for u in audible}
        others = [u for u in utts if id(u) not in batch and u.heard]
        short = functools.partial(self._short, slack=slack)
        return any(map(short, audible)) and not any(map(short, others))

    def _short(self, u: Utterance, slack: Slack) -> bool:
        """Whether ``u``'s listener is about to run dry: under ``run_dry_s`` of audio left, or
        (no slack known: before its first audio, or no caller's) nothing heard yet."""
        left = None if slack is None else slack(u)
        return not u.heard if left is None else left < self.run_dry_s

    def _feed(self, u: Utterance) -> None:
        """Hand the segment's new LLM tokens (and whether they ended) to its token2wav state;
        flow_tokens, not the LLM step's return: v3 drops long silent runs there."""
        self.token2wav.feed(u.t2w, u.llm.flow_tokens[u.fed :], u.llm.done)
        u.fed = len(u.llm.flow_tokens)

    def _outputs(self, ready: list[Utterance], chunks: list) -> None:
        """The outputs of a vocoded batch; finished segments leave their utterance. Tokens that
        came while the batch was on the vocoder thread are fed now, so whether a next chunk is
        ready does not wait for more LLM work (a text-streaming run may have none)."""
        t2w = self.token2wav
        for u, chunk in zip(ready, chunks, strict=True):
            u.ready_since = 0
            seg_done = u.t2w.done
            if not seg_done:
                self._feed(u)
                u.chunk_ready = t2w.ready(u.t2w)
            if chunk is None and not seg_done:
                continue
            tag, tag_end = u.tag, seg_done and u.tag_last
            truncated = False
            if seg_done:
                u.tag_truncated |= _truncated(u)
                if u.tag_last:  # the piece ends: it says whether it was cut; the next starts clean
                    truncated, u.tag_truncated = u.tag_truncated, False
                u.llm = u.t2w = None
                u.chunk_ready = False
            done = seg_done and u.closed and not u.pending
            if done:
                u.status = Status.FINISHED
            audio = _EMPTY if chunk is None else chunk  # token2wav hands out CPU float32
            u.heard = u.heard or audio.numel() > 0
            self._outbox.append(Output(u, audio, tag, tag_end, done, truncated=truncated))

    def _normalized(self, u: Utterance) -> bool:
        """Whether the next piece is normalized: if not, normalize some more of it (a group
        of sentences, then more until this step's slice is spent)."""
        if not u.preparing:
            return True
        if not self._free_group and time.perf_counter() >= self._slice_end:
            return False
        tag, steps, _ = u.pending[0]
        self._free_group = False
        try:
            next(steps)
            while time.perf_counter() < self._slice_end:
                next(steps)
        except StopIteration as done:  # its segments take its place
            segs = done.value or [""]  # nothing speakable: the piece still ends (empty)
            u.pending.popleft()
            u.pending.extendleft(
                reversed([(tag, s, k == len(segs) - 1) for k, s in enumerate(segs)])
            )
            return True
        return False

    def _vocoder_pool(self) -> ThreadPoolExecutor:
        with self._flow_lock:  # keep_prompt may come from another thread
            return self._vocoder_pool_locked()

    def _vocoder_pool_locked(self) -> ThreadPoolExecutor:
        if self._vocoder is None:
            self._vocoder = ThreadPoolExecutor(1, thread_name_prefix="cosyvoice-vocoder")
            if self.device.type == "cuda":
                self._vocoder_stream = torch.cuda.Stream(self.device)
        return self._vocoder

    def _vocode(self, items: list) -> list:
        """On the vocoder thread: the flow and HiFT of one batch, queued on the thread's own
        CUDA stream (the decode steps' stream never waits for it), audio back on the CPU."""
        return self._on_vocoder_stream(self._flow_step, items)

    def _flow_step(self, items: list) -> list:
        """token2wav's step over ``items``; one that ran prompts' pieces says when the next may
        come while others wait for audio (``prompt_share`` of the time; on a GPU without
        waiting for the device, so there it counts the launches: pieces cost little there)."""
        began = time.perf_counter()
        try:
            return self.token2wav.step(items)
        finally:
            end = time.perf_counter()
            share = min(max(self.prompt_share, 0.01), 1.0)
            if self.token2wav.pieces:
                self._pieces_due = end + (end - began) * (1 - share) / share
            elif self._pieces_due == math.inf:  # a batch of pieces that ran none (restored)
                self._pieces_due = end

    def _on_vocoder_stream(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._vocoder_stream is None:
            return fn(*args)
        with torch.cuda.stream(self._vocoder_stream):
            return fn(*args)

    def keep_prompt(self, speaker: str | Speaker, stop: Callable[[], bool] | None = None) -> bool:
        """Compute a zero-shot speaker's prompt part of the flow's state now and keep it, so
        that its streams start past the prompt from the first one (otherwise a prompt is kept
        from its second stream on): for a speaker registered to be used. Only into room the
        store has. False where nothing is kept (no prompt, v1, no room). The prompt goes
        through the flow a chunk per call, each where flow calls run, with the steps' flow
        calls free to run between (on a CPU a 10 s prompt takes many seconds). ``stop()``,
        asked between pieces, ends it early (the server's shutdown, the speaker deleted)."""
        args = self._prompt_args(speaker)
        if args is None or not hasattr(self.token2wav, "keep_prompt"):
            return False
        pieces = self.token2wav.keep_prompt(*args)
        while (kept := self._where_flow_runs(_next_piece, pieces)) is None:
            if stop is not None and stop():
                self._where_flow_runs(pieces.close)  # its cache goes back where it was used
                return False
        return kept

    def forget_prompt(self, speaker: str | Speaker) -> bool:
        """Drop a zero-shot speaker's prompt from the flow's store (the speaker was deleted):
        its memory goes now, unless a speaker still here has the same prompt. Whether it was
        dropped."""
        args = self._prompt_args(speaker)
        if args is None or not hasattr(self.token2wav, "forget_prompt") or self._shared(speaker):
            return False
        return self._where_flow_runs(self.token2wav.forget_prompt, *args)

    def _shared(self, speaker: str | Speaker) -> bool:
        """Whether a speaker in the store (``speaker`` itself aside) has its flow prompt."""
        spk = self._voice(speaker)
        for name in self.speakers.list():
            try:
                other = self.speakers.get(name)
            except SpeakerError:  # deleted since the list, by another process
                continue
            if other is not spk and other.zero_shot and spk.same_flow_prompt(other):
                return True
        return False

    def _prompt_args(self, speaker: str | Speaker) -> tuple[torch.Tensor, ...] | None:
        """What token2wav needs of a speaker's prompt; None for a speaker without one."""
        spk = self._voice(speaker)
        if not spk.zero_shot:
            return None
        tokens = torch.tensor(spk.prompt_speech_tokens, dtype=torch.long)
        return spk.embedding, tokens, spk.prompt_feat

    def _where_flow_runs(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` where flow calls run: on the vocoder thread when that is on (after
        the batch being vocoded), else here between the steps' flow calls. Any thread may
        call (the server's registrations and deletions do); :meth:`close` may come between."""
        with self._flow_lock:
            if not self.vocoder_thread:
                return fn(*args)
            job = self._vocoder_pool_locked().submit(self._on_vocoder_stream, fn, *args)
        try:
            return job.result()
        finally:
            del job  # a raised error's traceback holds this frame: no cycle through the job

    def stats(self) -> dict[str, int]:
        """The flow's prompt store (v2/v3): prompts kept, their bytes, and streams that found
        their prompt kept or not."""
        store = getattr(getattr(self.token2wav, "flow", None), "prompts", None)
        if store is None:
            return {}
        return {"prompts": len(store), "prompt_bytes": store.nbytes, "prompt_hits": store.hits,
                "prompt_misses": store.misses}  # fmt: skip

    def graph_stats(self) -> dict[str, GraphStats]:
        """Per stage (llm, flow, vocoder): whether it runs at CUDA graphs' static shapes now
        (``graphs``: 0 when off, or since a failed capture dropped them) and its ``calls`` by
        how they ran (:class:`cosyvoice.devices.Calls`). Counts only: read off the
        inference thread."""
        t2w = self.token2wav
        owners = {"llm": self.llm, "flow": getattr(t2w, "flow", None),
                  "vocoder": getattr(t2w, "hift", None)}  # fmt: skip
        return {
            stage: {
                "graphs": int(o.graphs is not None),
                "calls": {m: o.calls[m] for m in Calls.MODES},
            }
            for stage, o in owners.items()
            if hasattr(o, "calls")  # (v3's causal HiFT vocodes each stream alone, eagerly)
        }

    def _collect(self, wait: bool) -> None:
        """Outputs of the vocoded batches that are done, oldest first (``wait``: block for the
        oldest). A failed batch fails its utterances only; cancelled ones are dropped."""
        while self._inflight and (wait or self._inflight[0][0].done()):
            wait = False
            job, utts = self._inflight.popleft()
            for u in utts:
                u.vocoding = False
            # Not result() in a try: re-raised here, the error's traceback would hold this
            # frame and through it the job, a cycle keeping the batch's states (their flow
            # blocks) until a full garbage collection.
            if (exc := job.exception()) is not None:
                self._fail(utts, exc)  # reported on those utterances only
                continue
            chunks = job.result()
            live = [(u, c) for u, c in zip(utts, chunks, strict=True)
                    if u.status is not Status.FINISHED]  # fmt: skip
            self._outputs([u for u, _ in live], [c for _, c in live])

    def _fail(self, utts: list[Utterance], exc: Exception) -> None:
        """A vocoded batch failed: its utterances end with the error, the others go on."""
        log.error("vocoding failed", exc_info=exc)
        for u in utts:
            if u.status is not Status.FINISHED:
                self.cancel(u)
                self._outbox.append(_failed(u, exc))

    def close(self) -> None:
        """Stop the vocoder thread (after its batches in flight, whose audio goes out with the
        next step); the model stays usable inline."""
        with self._flow_lock:  # a keep_prompt from another thread goes on inline after
            if self._vocoder is not None:
                self._vocoder.shutdown(wait=True)
                if self._vocoder_stream is not None:  # what it wrote, before others read it
                    torch.cuda.current_stream(self.device).wait_stream(self._vocoder_stream)
                self._vocoder, self.vocoder_thread = None, False
        self._collect(wait=False)  # all done now

    def _to_vocode(
        self, active: list[Utterance], ready: list[Utterance], slack: Slack
    ) -> list[Utterance]:
        """Which ready chunks to vocode now. Chunks of utterances that started a step or two
        apart become ready a step or two apart; vocoding each alone wastes the batch (the flow
        is most of the cost), so they wait up to ``vocode_wait_steps`` steps while others still
        produce tokens, unless a listener is about to run dry. A long whole utterance's hops
        (each costlier than the last, see Token2Wav.max_whole_tokens) also wait while others
        make tokens or have a chunk due, while their listener has over ``ahead_s`` (and two
        recent steps) of audio left: the steps they would ride are everyone's latency."""
        if not ready:
            return ready
        ready = self._hold_pieces(active, ready, slack)
        if not ready:
            return ready
        left = {id(u): None if slack is None else slack(u) for u in ready}
        busy = any(u.llm.ready for u in active if u not in ready)  # others still make tokens
        far = self.ahead_s + 2 * self._step_s
        held = [u for u in ready if u.t2w.in_hops and (s := left[id(u)]) is not None and s > far]
        if held and (busy or len(held) < len(ready)):
            ready = [u for u in ready if u not in held]
        if not ready or not busy:
            return ready
        if self._steps - min(u.ready_since for u in ready) >= self.vocode_wait_steps:
            return ready
        if any((s := left[id(u)]) is not None and s < self.run_dry_s for u in ready):
            return ready
        return []

    def _hold_pieces(
        self, active: list[Utterance], ready: list[Utterance], slack: Slack
    ) -> list[Utterance]:
        """Prompt pieces (no audio: ``FlowModel.prompt_piece``) wait while another listener is
        about to run dry (first audio included) and the time since the last batch of pieces is
        short of its share (``prompt_share``); they run as they come otherwise."""
        if time.perf_counter() >= self._pieces_due:
            return ready
        if not any(self._short(u, slack) for u in active if not u.t2w.in_prompt):
            return ready
        return [u for u in ready if not u.t2w.in_prompt]

    def _next_segment(self, u: Utterance) -> bool:
        """Start the next queued segment: its LLM request and token2wav state."""
        if not u.pending or not self._normalized(u):
            return False
        tag, text, last = u.pending.popleft()
        seed = u.seed + u.runs
        spk = u.voice
        if isinstance(text, TextRun):
            blank = text.sealed and not text.tail.strip()  # (its piece ended where a run did)
            req = text.llm = (
                None if blank else self.new_stream_request(spk, seed=seed, greedy=u.greedy)
            )
        elif text:
            req = self.new_request(text, spk, seed=seed, greedy=u.greedy)
            if u.fixed_tokens:
                req.min_len = req.max_len = u.fixed_tokens
        else:
            req = None
        st = self.token2wav.new_state(
            spk.embedding,
            torch.tensor(spk.prompt_speech_tokens, dtype=torch.long),
            spk.prompt_feat,
            stream=u.stream,
            speed=u.speed,
            seed=seed if u.noise else None,
        )
        if req is not None:
            req.max_speech = self.token2wav.most_tokens(st)
        if u.on_segment is not None:
            u.on_segment(st, u.runs)
        u.runs += 1
        u.llm, u.t2w, u.fed = req or _Spoken(), st, 0
        u.tag, u.tag_last = tag, last
        if req is not None and isinstance(text, TextRun):
            self._push_run(u, text)
        u.status = Status.RUNNING
        return True

    def warmup(self) -> None:
        """One short utterance through every stage, so the first request does not pay for
        lazy initialisation. A model dir with no speaker (CosyVoice2 and 3 ship none) warms up
        with a silent SFT one: an x-vector of zeros, no prompt."""
        names = self.speakers.list()
        spk = (
            names[0] if names else Speaker("warm-up", torch.zeros(1, self.llm_config.spk_embed_dim))
        )
        u = self.start(spk, seed=1, stream=True, fixed_tokens=2 * self.token2wav.cfg.token_hop_len)
        self.add_text(u, "Warm up.")
        self.close_text(u)
        while u.status is not Status.FINISHED:
            self.step([u])
        graphs = getattr(self.token2wav.flow, "graphs", None) if self.token2wav else None
        if graphs is not None and graphs.capture:
            self.token2wav.warm(graphs.batches)
        self._keep_prompts()
        if (pool := self._flow_pool) is not None:
            self.token2wav.reserve_room()  # the layers' sizes are known now
            pool.shrink_if_idle(drop=True, hold=False)  # no burst to keep the memory for

    def _keep_prompts(self) -> None:
        """The zero-shot speakers' prompts into the flow's store (:meth:`keep_prompt`), as many
        as it has room for: after a restart their first streams start past their prompts
        again."""
        for name in self.speakers.list():
            with contextlib.suppress(SpeakerError):  # deleted meanwhile (a shared dir)
                self.keep_prompt(name)

    def new_request(
        self,
        text: str,
        speaker: str | Speaker | None = None,
        seed: int = 0,
        greedy: bool = False,
    ) -> LLMRequest:
        """LLM request for one already-normalised text segment (see ``frontend.split``), with
        the zero-shot prompt of ``speaker`` if it has one.

        v3 needs ``<|endofprompt|>`` in prompt text ++ text (spec §5.3); if it is missing, the
        canonical system prefix is put in front of the prompt transcript (zero-shot) or of
        the text (SFT), as upstream's examples do."""
        prompt_text, prompt_speech, embedding = self._prompt(speaker)
        text_ids = self.frontend.encode(text)
        if self.family == "v3":
            eop = self.frontend.tokenizer.token_to_id("<|endofprompt|>")
            if eop not in prompt_text and eop not in text_ids:
                prefix = self.frontend.encode(V3_SYSTEM_PREFIX)
                if prompt_speech:
                    prompt_text = prefix + prompt_text
                else:
                    text_ids = prefix + text_ids
        return LLMRequest(
            text_ids=text_ids,
            prompt_text_ids=prompt_text,
            prompt_speech_tokens=prompt_speech,
            seed=seed,
            greedy=greedy,
            embedding=embedding,
        )

    def _prompt(
        self, speaker: str | Speaker | None
    ) -> tuple[list[int], list[int], torch.Tensor | None]:
        """The speaker's prompt transcript ids, prompt speech tokens and embedding (only the v1
        LLM reads it); none for no speaker. A name is looked up, a Speaker taken as it is."""
        if speaker is None:
            return [], [], None
        spk = self._voice(speaker)
        speech = spk.prompt_speech_tokens if spk.llm_prompt_speech else []
        return list(spk.prompt_text_ids), speech, spk.embedding if spk.llm_embedding else None

    def instructed(self, speaker: str | Speaker, instruction: str) -> Speaker:
        """``speaker``'s voice steered by an instruction (dialect, emotion, speed, a character;
        see :attr:`instructions`). The LLM's prompt is the instruction and not the speaker's
        prompt speech, which only the flow hears.

        - v2/v3 (upstream's ``inference_instruct2``): it ends in ``<|endofprompt|>``, on v3
          after the system prompt, unless it has its own.
        - v1 (``inference_instruct``): normalised as a transcript is, then ``<endofprompt>``;
          the LLM does not hear the speaker's x-vector either (upstream drops it, as the voice
          would leak into the instruction's).

        A name's steered voice remembers the name: an utterance started with it speaks as the
        name stands then (see :class:`Steering`)."""
        if not self.instructions:
            raise ValueError(
                "instructions need CosyVoice-300M-Instruct (a dir named so), CosyVoice2 or 3"
            )
        spk = self._voice(speaker)
        steering = Steering(speaker, instruction, spk) if isinstance(speaker, str) else None
        text = instruction.strip()
        if self.family == "v1":
            text = self.frontend.normalize(text)
            text += "" if text.endswith(V1_EOP) else V1_EOP
        elif EOP not in text:
            text = (f"{V3_SYSTEM} {text}" if self.family == "v3" else text) + EOP
        return replace(
            spk,
            prompt_text_ids=self.frontend.encode(text),
            llm_prompt_speech=False,
            llm_embedding=self.family != "v1",
            builtin=False,
            steering=steering,
        )

    def _steered_now(self, voice: Speaker) -> Speaker:
        """A steered name's voice as the name stands now (see :class:`Steering`); re-steering
        (rare) normalises a v1 instruction again, up to 0.1 s."""
        steering = voice.steering
        if steering is None or self.speakers.get(steering.name) is steering.source:
            return voice
        return self.instructed(steering.name, steering.instruction)

    def _voice(self, speaker: str | Speaker) -> Speaker:
        """A name looked up in the store (SpeakerError if unknown); a Speaker as it is."""
        return speaker if isinstance(speaker, Speaker) else self.speakers.get(speaker)

    def new_stream_request(
        self, speaker: str | Speaker | None = None, seed: int = 0, greedy: bool = False
    ) -> LLMRequest:
        """Bistream LLM request (v2/v3): feed text with ``r.push_text(frontend.encode(piece))``
        as it arrives, end with ``r.close_text()``; step it whenever ``r.ready``."""
        if not self.text_streaming:
            raise NotImplementedError("text-streaming input needs a v2/v3 model")
        prompt_text, prompt_speech, _ = self._prompt(speaker)
        eop = None
        if self.family == "v3":
            eop = self.frontend.tokenizer.token_to_id("<|endofprompt|>")
            if eop not in prompt_text:
                prompt_text = self.frontend.encode(V3_SYSTEM_PREFIX) + prompt_text
        return LLMRequest.streaming(
            prompt_text, prompt_speech, seed=seed, greedy=greedy, eop_id=eop
        )


def _next_piece(pieces: Generator[None, None, bool]) -> bool | None:
    """One step of a generator that works in pieces: None while it goes on, then its result."""
    try:
        next(pieces)
    except StopIteration as done:
        return bool(done.value)
    return None


@dataclass
class _Spoken:
    """The LLM side of a segment with nothing to say: already done, no tokens."""

    done: bool = True
    ready: bool = False
    finish_reason: str | None = None
    bistream: None = None
    flow_tokens: list[int] = field(default_factory=list)


_EMPTY = torch.zeros(0)


def _truncated(u: Utterance) -> bool:
    """Whether the segment in flight ended at a limit before its text did (a benchmark's
    ``fixed_tokens`` ends every segment but a text-streaming run's there on purpose)."""
    fixed = u.fixed_tokens and u.llm.bistream is None
    return u.llm.finish_reason == "length" and not fixed


def _failed(u: Utterance, exc: Exception) -> Output:
    return Output(u, _EMPTY, done=True, error=f"{type(exc).__name__}: {exc}")


GraphStats = dict[str, Any]  # {"graphs": 0 or 1, "calls": {mode: count}}: see graph_stats


def load(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    speaker_dir: str | Path | None = None,
    use_wetext: bool = True,
    token2wav: bool = True,
    max_batch: int = 64,
    graphs: bool | None = None,
    exact_final: bool | None = None,
    flow_cache_mb: float | None = None,
    vocoder_thread: bool | None = None,
    packed: bool | None = None,
) -> CosyVoiceModel:
    """Load a model dir. ``device`` None: CUDA when available, else CPU; ``dtype`` None:
    bfloat16 on CUDA, float32 on the CPU (see :mod:`cosyvoice.devices` for why a bf16 request
    on a CPU without bf16 matrix units falls back). ``token2wav=False`` loads only the front
    half (text -> speech tokens). ``graphs`` (default: on CUDA; v2/v3 only) runs decode steps of
    up to ``max_batch`` utterances as replayed CUDA graphs (:mod:`cosyvoice.llm.graphs`), and
    so the flow's Euler loop over as many streams (:mod:`cosyvoice.flow.graphs`).
    ``exact_final`` / ``flow_cache_mb``: how v2/v3 streams end and how much flow state they may
    keep together; None: the defaults of :class:`cosyvoice.token2wav.StreamConfig`, except that
    on a GPU the flow state may take half the device memory free once the LLM is loaded.
    ``vocoder_thread`` (default: on CUDA) runs token2wav on its own thread and CUDA stream, so
    decode steps go on while a batch is vocoded (on a 2-core CPU the two would fight for the
    cores). ``packed`` (default: on a CPU, in float32 or in bfloat16 on bf16 matrix units) runs
    the LLM's linears over weights packed once for oneDNN (:class:`cosyvoice.devices.PackedLinear`:
    1.2-1.9x faster float32 decode steps at batch 16-64, 1.2-1.3x in bfloat16 at batch 1-16),
    and in float32 the flow's too (a stream's first chunk 1.1-1.2x faster); the LLM and the
    flow must not change device or dtype afterwards."""
    model_dir = Path(model_dir)
    family, cfg = load_model_yaml(model_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    lcfg = llm_config(family, cfg, model_dir)
    pack = _pack(device, dtype, packed)
    net = _load_llm(model_dir, family, lcfg, device, dtype, pack)
    frontend = Frontend(model_dir, family, use_wetext=use_wetext)
    speakers = SpeakerStore(
        model_dir,
        family,
        cfg,
        frontend.encode,
        speaker_dir=speaker_dir,
        normalize_text=frontend.normalize,
    )
    model = CosyVoiceModel(
        model_dir=model_dir,
        family=family,
        config=cfg,
        llm_config=lcfg,
        frontend=frontend,
        llm=LLMEngine(net, lcfg.sampling),
        speakers=speakers,
        device=device,
        dtype=dtype,
        vocoder_thread=device.type == "cuda" if vocoder_thread is None else vocoder_thread,
    )
    # v1's LLM and flow have no static steps: it runs eagerly (a server's --graphs on too)
    graphs = (device.type == "cuda" if graphs is None else graphs) and family != "v1"
    if graphs:
        model.llm.enable_graphs(max_batch)
    if token2wav:
        if flow_cache_mb is None and device.type == "cuda":
            # 8192 MB is ~36 s of audio in all for the full CosyVoice2 in float32 (~230 MB per
            # second of audio); a GPU serving 64 streams has room for far more
            flow_cache_mb = torch.cuda.mem_get_info(device)[0] / 2 / 2**20
        opts = dict(exact_final=exact_final, flow_cache_mb=flow_cache_mb)
        opts = {k: v for k, v in opts.items() if v is not None}
        model.token2wav = _load_token2wav(model_dir, cfg, device, dtype, pack, **opts)
        if graphs:
            model.token2wav.flow.enable_graphs(max_batch)
            if family == "v2":  # (v3's causal HiFT vocodes each stream alone)
                model.token2wav.hift.enable_graphs(max_batch)
    return model


def _pack(device: torch.device, dtype: torch.dtype, packed: bool | None) -> bool:
    """Whether to pack the linears (``packed`` None: where it can; see :func:`load`)."""
    can_pack = can_pack_linears(device, dtype)
    if packed and not can_pack:
        raise ValueError(
            "packed linears need an x86 CPU with oneDNN, in float32 or in bfloat16 on bf16 "
            f"matrix units, not {dtype} on {device}"
        )
    return can_pack if packed is None else packed


def _load_llm(
    model_dir: Path,
    family: Family,
    lcfg: LLMConfig,
    device: torch.device,
    dtype: torch.dtype,
    pack: bool,
) -> QwenSpeechLM | TransformerSpeechLM:
    """The speech-token LM on ``device`` in ``dtype``, its linears packed if ``pack``."""
    net = TransformerSpeechLM(lcfg) if family == "v1" else QwenSpeechLM(lcfg)
    net.load_checkpoint(model_dir / "llm.pt")
    net = net.to(device=device, dtype=dtype).eval()
    if pack:
        pack_linears(net)
    return net


def _load_token2wav(
    model_dir: Path, cfg: dict, device: torch.device, dtype: torch.dtype, pack: bool, **opts
):
    from .flow import load_flow
    from .hift import HiFTConfig, load_hift
    from .token2wav import make_token2wav

    flow = load_flow(model_dir, device=device)
    hift = load_hift(model_dir, HiFTConfig.from_yaml(cfg), device=device)
    t2w = make_token2wav(flow, hift, **opts)
    if dtype != torch.float32:
        # The flow is most of token2wav's time; autocast runs its matmuls in bf16/fp16 (2x at
        # batch 8 on an AMX CPU, mel within ~1.5%) while HiFT's f0/iSTFT stay float32.
        store_in(flow, dtype)  # what autocast would cast at every op (1.2x a first chunk)
        t2w.flow = _Autocast(flow, device.type, dtype)
    elif pack:
        # MKL ran the flow's skinny matmuls (100 rows of 256 for one stream's chunk) at half
        # to nearly all of oneDNN's speed over packed weights (to_qkv 718 vs 376 us; AMD EPYC,
        # 2 cores). Not under autocast: it would not cast inputs for the packed op.
        pack_linears(flow)
    return t2w


class _Autocast:
    """A flow whose inference runs under torch.autocast; everything else passes through. Its
    linears and convolutions hold bf16/fp16 weights (``devices.store_in``), so the flow computes
    only through these methods: any other call would meet them in float32 and fail."""

    def __init__(self, flow, device_type: str, dtype: torch.dtype) -> None:
        self._flow, self._device_type, self._dtype = flow, device_type, dtype

    def inference(self, *args, **kwargs):
        with torch.autocast(self._device_type, dtype=self._dtype):
            return self._flow.inference(*args, **kwargs)

    def keep_prompt(self, *args, **kwargs):
        """A generator (``FlowModel.keep_prompt``): each piece under autocast, as a stream's
        calls are (the pool's tensors and the flow's CUDA graphs keep one dtype), and none of
        it across the pauses between pieces, where other flow calls run."""
        pieces = self._flow.keep_prompt(*args, **kwargs)
        while True:
            with torch.autocast(self._device_type, dtype=self._dtype):
                kept = _next_piece(pieces)
            if kept is not None:
                return kept
            yield

    def capture_pending(self) -> int:
        """Graphs captured as a stream's calls run: under autocast."""
        with torch.autocast(self._device_type, dtype=self._dtype):
            return self._flow.capture_pending()

    def __getattr__(self, name: str):
        return getattr(self._flow, name)
