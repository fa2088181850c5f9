"""CosyVoice behind the scheduler: continuous batching across every stream.

One step = one packed LLM forward for every job in its token phase (new segments are prefilled
in the same forward) + one batched flow call and one batched HiFT call for every job whose
next streaming chunk became ready. Jobs join and leave between steps; a finished or cancelled
job's KV cache and token2wav caches go with its state.

Text: each job segment is one or more normalized CosyVoice segments (the frontend's own
normalization and splitting rules); each is one LLM run and one token2wav stream. Randomness
is per job: LLM sampling and vocoder noise of segment i use seed + i, so a request's audio
never depends on what else runs in the batch.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtserver.engine import Chunk, Done, Event, Failed, Job, Speaker

log = logging.getLogger("rtserver.cosyvoice")

RUN_DRY_S = 1.0  # a stream with less buffered audio than this is vocoded at once
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)
class _State:
    seed: int
    pending: deque[tuple[int, str, bool]] = field(default_factory=deque)  # (job seg, text, last)
    current: tuple[int, bool] | None = None  # (job segment index, last piece of it)
    llm: object | None = None  # cosyvoice LLMRequest
    t2w: object | None = None  # cosyvoice Token2WavState
    runs: int = 0  # LLM runs started (seeds segment i with seed + i)
    fed: int = 0  # LLM tokens already handed to token2wav
    ready_since: int = 0  # engine step at which its next chunk became ready (0: not ready)


class _Autocast:
    """A flow whose inference runs under torch.autocast; everything else passes through."""

    def __init__(self, flow, device_type: str, dtype: torch.dtype) -> None:
        self._flow, self._device_type, self._dtype = flow, device_type, dtype

    def inference(self, *args, **kwargs):
        with torch.autocast(self._device_type, dtype=self._dtype):
            return self._flow.inference(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._flow, name)


class _WholeText:
    """HTTP segmentation: the whole text, split by the frontend's rules, as upstream does."""

    def __init__(self) -> None:
        self._buf = ""

    def push(self, text: str) -> list[str]:
        self._buf += text
        return []

    def flush(self) -> list[str]:
        text, self._buf = self._buf, ""
        return [text] if text.strip() else []

    @property
    def pending(self) -> str:
        return self._buf


def _raw_sentence(text: str) -> list[str]:
    """WebSocket text is only cut at sentence ends here; the engine normalizes and splits each
    piece like any other segment."""
    return [text.strip()] if text.strip() else []


class CosyVoiceEngine:
    def __init__(
        self,
        model_dir: Path,
        device: str = "cpu",
        dtype: str = "float32",
        speaker_dir: Path | None = None,
        max_batch: int = 64,
        fixed_tokens: int | None = None,
        vocode_wait_steps: int = 3,
    ) -> None:
        import cosyvoice
        from cosyvoice.flow import load_flow
        from cosyvoice.hift import HiFTConfig, load_hift
        from cosyvoice.token2wav import make_token2wav

        self.model = cosyvoice.load(model_dir, device=device, dtype=_DTYPES[dtype],
                                    speaker_dir=speaker_dir)  # fmt: skip
        flow = load_flow(model_dir, device=device)
        hift = load_hift(model_dir, HiFTConfig.from_yaml(self.model.config), device=device)
        self.t2w = make_token2wav(flow, hift)
        if dtype != "float32":
            # The flow is ~85% of token2wav time; autocast runs its matmuls in bf16/fp16 (2x at
            # batch 8 on an AMX CPU, mel within ~1.5%) while HiFT's f0/iSTFT stay float32.
            self.t2w.flow = _Autocast(flow, torch.device(device).type, _DTYPES[dtype])
        self.name = f"cosyvoice-{self.model.family}"
        self.max_batch = max_batch
        self.fixed_tokens = fixed_tokens  # benchmarks: every LLM run emits exactly this many
        self.vocode_wait_steps = vocode_wait_steps
        self._steps = 0

    # ---- speakers -------------------------------------------------------------------------

    def _speaker(self, name: str) -> Speaker:
        return Speaker(name, "zh/en", self.t2w.sample_rate, self.name)

    def speakers(self) -> list[Speaker]:
        # Asked of the store each time: it sees what other replicas sharing its speaker dir
        # registered or deleted (one stat while nothing changed).
        return [self._speaker(n) for n in self.model.speakers.list()]

    def register_speaker(self, spk_id: str, audio: bytes, prompt_text: str) -> Speaker:
        self.model.speakers.register(spk_id, audio, prompt_text)
        return self._speaker(spk_id)

    def delete_speaker(self, spk_id: str) -> None:
        self.model.speakers.delete(spk_id)

    # ---- text -----------------------------------------------------------------------------

    def segmenter(self, incremental: bool):
        if incremental:
            from cosyvoice.frontend import IncrementalSplitter

            return IncrementalSplitter(_raw_sentence)
        return _WholeText()

    # ---- scheduler interface --------------------------------------------------------------

    def warmup(self) -> None:
        name = self.model.speakers.list()[0]
        spk = self.model.speakers.get(name)
        req = self.model.new_request("Warm up.", name, seed=1)
        req.max_len = min(req.max_len, 2 * self.t2w.cfg.token_hop_len)
        st = self._t2w_state(spk, stream=True, speed=1.0, seed=1)
        while not st.done:
            fed = len(req.flow_tokens)
            if not req.done:
                self.model.llm.step([req])
            self.t2w.step([(st, req.flow_tokens[fed:], req.done)])

    def start(self, job: Job) -> None:
        self.model.speakers.get(job.speaker.id)  # raises for a speaker deleted meanwhile
        job.engine_state = _State(seed=job.seed or secrets.randbits(62) + 1)

    def ready(self, job: Job) -> bool:
        st: _State = job.engine_state
        if st is None:
            return False
        return bool(st.current or st.pending) or job.has_pending_text() or job.input_closed

    def step(self, jobs: list[Job]) -> list[tuple[Job, Event]]:
        out: list[tuple[Job, Event]] = []
        active: list[Job] = []
        for job in jobs:
            try:
                if self._advance_segment(job):
                    active.append(job)
                elif job.input_closed and not job.has_pending_text():
                    out.append((job, Done()))
            except Exception as exc:
                log.exception("job %d: could not start a segment", job.id)
                out.append((job, Failed(f"{type(exc).__name__}: {exc}")))
        if not active:
            return out

        # One packed LLM forward for every job still producing tokens.
        llm_jobs = [j for j in active if not j.engine_state.llm.done]
        if llm_jobs:
            self.model.llm.step([j.engine_state.llm for j in llm_jobs])
        for job in active:
            # flow_tokens, not step()'s return: v3 drops long runs of silent tokens there.
            st: _State = job.engine_state
            self.t2w.feed(st.t2w, st.llm.flow_tokens[st.fed :], st.llm.done)
            st.fed = len(st.llm.flow_tokens)

        # One batched flow + HiFT call for the jobs with a chunk ready, unless it pays to wait.
        self._steps += 1
        ready = [j for j in active if self.t2w.ready(j.engine_state.t2w)]
        for job in ready:
            job.engine_state.ready_since = job.engine_state.ready_since or self._steps
        if not ready or not self._vocode_now(active, ready):
            return out
        chunks = self.t2w.step([(j.engine_state.t2w, [], j.engine_state.llm.done) for j in ready])
        for job, chunk in zip(ready, chunks, strict=True):
            st = job.engine_state
            st.ready_since = 0
            t2w_done = st.t2w.done
            if chunk is None and not t2w_done:
                continue
            seg, last_piece = st.current
            audio = chunk.float().numpy() if chunk is not None else torch.zeros(0).numpy()
            if t2w_done:
                st.current, st.llm, st.t2w = None, None, None
            out.append((job, Chunk(audio, seg, segment_end=t2w_done and last_piece)))
            if t2w_done and not st.pending and job.input_closed and not job.has_pending_text():
                out.append((job, Done()))
        return out

    def _vocode_now(self, active: list[Job], ready: list[Job]) -> bool:
        """Chunks of jobs that started a step or two apart become ready a step or two apart;
        vocoding each alone wastes the batch (the flow is most of the cost). So hold ready
        chunks up to `vocode_wait_steps` LLM steps while other jobs are still producing
        tokens, unless a listener is about to run dry."""
        if len(ready) == len(active) or all(
            j.engine_state.llm.done for j in active if j not in ready
        ):
            return True
        if self._steps - min(j.engine_state.ready_since for j in ready) >= self.vocode_wait_steps:
            return True
        now = time.monotonic()
        return any(
            j.first_audio_at is not None and j.first_audio_at + j.audio_seconds - now < RUN_DRY_S
            for j in ready
        )

    def release(self, job: Job) -> None:
        st: _State | None = job.engine_state
        if st and st.llm is not None and not st.llm.done:
            st.llm.cancel()  # frees its KV cache now
        job.engine_state = None

    # ---- internals ------------------------------------------------------------------------

    def _advance_segment(self, job: Job) -> bool:
        """Make sure the job has a segment in flight; False if it has nothing to do."""
        st: _State = job.engine_state
        if st.current is not None:
            return True
        while not st.pending:
            item = job.next_segment()
            if item is None:
                return False
            index, text = item
            pieces = self.model.frontend.split(text)
            for k, piece in enumerate(pieces):
                st.pending.append((index, piece, k == len(pieces) - 1))
            if not pieces:  # nothing speakable (punctuation only): close the segment at once
                st.pending.append((index, "", True))
        index, text, last = st.pending.popleft()
        seed = st.seed + st.runs
        st.runs += 1
        spk = self.model.speakers.get(job.speaker.id)
        req = self.model.new_request(text, job.speaker.id, seed=seed)
        if self.fixed_tokens:
            req.min_len = req.max_len = self.fixed_tokens
        if not text:
            req.cancel()
        st.llm, st.fed = req, 0
        st.t2w = self._t2w_state(spk, stream=job.stream, speed=job.speed, seed=seed)
        st.current = (index, last)
        return True

    def _t2w_state(self, spk, stream: bool, speed: float, seed: int):
        if self.model.family == "v1" and speed != 1.0:
            stream = False  # v1's streaming vocoder cannot time-scale: speak per segment
        return self.t2w.new_state(
            spk.embedding,
            torch.tensor(spk.prompt_speech_tokens, dtype=torch.long),
            spk.prompt_feat,
            stream=stream,
            speed=speed,
            seed=seed,
        )
