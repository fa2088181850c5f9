"""An utterance: one stream of speech in one voice, driven by :meth:`CosyVoiceModel.step`.

Text arrives in pieces, each with a caller's ``tag`` (a WebSocket flush, an HTTP request's
text); every piece is normalized and split into segments by the frontend, and every segment is
one LLM run plus one token2wav stream. Audio leaves as :class:`Output` chunks tagged with the
piece they belong to, so a caller can tell where each piece's audio ends.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from .frontend.text import MAX_SEGMENT_TOKENS, LengthFn, cap_segments


class Status(enum.Enum):
    WAITING = "waiting"  # nothing to speak until more text (or close_text) arrives
    RUNNING = "running"  # a segment is in flight or queued
    FINISHED = "finished"  # text closed and all of it spoken, or cancelled


@dataclass(eq=False)
class Utterance:
    """Per-utterance state; the model owns the fields below ``status``.

    ``seed`` drives LLM sampling and vocoder noise (segment i uses ``seed + i``); ``greedy``
    (argmax LLM) and ``noise=False`` (zero vocoder noise) reproduce the golden fixtures;
    ``fixed_tokens`` makes every LLM run emit exactly that many tokens (benchmarks);
    ``on_segment(t2w_state, i)`` sees each segment's token2wav state before use (tests replay
    recorded noise with it). ``text_stream`` (v2/v3): each piece goes to an LLM run token by
    token as its text arrives (bistream), instead of waiting for the piece to be complete; a
    long piece to several runs, one after another (:data:`RUN_TOKENS`).
    """

    speaker: str
    seed: int
    speed: float = 1.0
    stream: bool = True
    greedy: bool = False
    noise: bool = True
    text_frontend: bool = True
    fixed_tokens: int | None = None
    on_segment: Callable[[Any, int], None] | None = None
    text_stream: bool = False
    status: Status = Status.WAITING
    closed: bool = False  # no more text will come
    # (tag, text, last): a segment, a text-streaming run, or a piece still being normalized
    # (its normalization, in steps: its segments take its place)
    pending: deque[tuple[Any, str | TextRun | Generator[None, None, list[str]], bool]] = field(
        default_factory=deque
    )
    open_run: TextRun | None = None  # text_stream: the piece still taking text
    tag: Any = None  # the piece the segment in flight belongs to
    tag_last: bool = False  # the segment in flight is the last one of its piece
    tag_truncated: bool = False  # a segment of that piece ended at a limit, not at its text's end
    llm: Any = None  # LLMRequest of the segment in flight
    t2w: Any = None  # its token2wav state
    runs: int = 0  # segments started
    # The speaker (cosyvoice.speakers.Speaker) as it was at start(): one deleted or registered
    # anew meanwhile does not change (or end) an utterance already speaking.
    voice: Any = None
    fed: int = 0  # LLM tokens handed to token2wav
    ready_since: int = 0  # model step at which its next chunk became ready (0: not ready)
    chunk_ready: bool = False  # token2wav has a chunk to make (set by the model's step)
    vocoding: bool = False  # a chunk of it is on the vocoder thread (its audio comes later)
    heard: bool = False  # some of its audio has been handed out (see CosyVoiceModel.step)

    @property
    def in_flight(self) -> bool:
        return self.t2w is not None

    @property
    def preparing(self) -> bool:
        """Its next piece is still being normalized."""
        return bool(self.pending) and isinstance(self.pending[0][1], Generator)

    @property
    def open_tag(self) -> Any:
        return None if self.open_run is None else self.open_run.tag

    @property
    def busy(self) -> bool:
        """Whether a step can make progress: a segment to start, tokens to make, a chunk to
        vocode, or an end to report (not: a text-streaming run waiting for text)."""
        if self.status is Status.FINISHED:
            return False
        if self.in_flight:
            return self.llm.done or self.llm.ready or self.chunk_ready or self.vocoding
        return bool(self.pending) or self.closed


_CJK_STOPS = frozenset("，。！？；：、")


def _cuttable(before: str, c: str) -> bool:
    """Whether text may be cut between ``before`` and ``c`` so that Qwen2's pre-tokenizer
    (cosyvoice.frontend.tokenizer.QWEN2_SPLIT) gives the same pieces as for the whole text, whatever follows:
    - before a space or tab that ends a word or punctuation (a run of spaces is split by what
      follows it; a word takes the one space before it);
    - before a line break or CJK punctuation that follows a letter or digit (punctuation
      takes the line breaks after it, and a space or other punctuation before it; CJK
      punctuation joins the letters after it: cut after it, `，都` split in two)."""
    before = unicodedata.normalize("NFC", before)[-1:]  # as the tokenizer sees it (ड़ -> ड + ़)
    if c in " \t":
        return before != "" and not before.isspace()
    return (c.isspace() or c in _CJK_STOPS) and before.isalnum()


def _last_boundary(text: str, before: str = "") -> int | None:
    """The last place ``text`` may be cut (see :func:`_cuttable`; ``before``: the character
    in front of it). None: nowhere."""
    for i in range(len(text) - 1, -1, -1):
        if _cuttable(text[i - 1] if i else before, text[i]):
            return i
    return None


@dataclass(eq=False)
class TextRun:
    """A text-streaming piece: the text the LLM has not been given yet. Text is handed over
    only up to the last word boundary, so the tokens do not depend on where the fragments were
    cut; the rest follows when the piece is sealed. Each fragment is scanned and tokenized
    once: a long piece that arrives a character at a time costs linear time."""

    tag: Any
    tail: str = ""  # not yet given to the LLM; starts at a word boundary
    ready: int = 0  # how much of tail may be given now
    sealed: bool = False
    llm: Any = None  # the bistream LLMRequest once the run started
    cut: bool = False  # its LLM ended at a limit before the piece did: later text is dropped

    def add(self, fragment: str) -> None:
        cut = _last_boundary(fragment, self.tail[-1:])
        if cut is not None:
            self.ready = len(self.tail) + cut
        self.tail += fragment

    def take(self) -> str:
        """The text the LLM may have now: up to the last boundary, or all of it once sealed."""
        n = len(self.tail) if self.sealed else self.ready
        text, self.tail, self.ready = self.tail[:n], self.tail[n:], 0
        return text


# A text-streaming run is one LLM request, whose context holds all its text and speech: a long
# reply streamed as one piece (an agent that never flushes) grew past a stream's share of the
# GPU's fixed KV pool (4096 positions) and the flow's 300 s, and its attention slowed every
# step of its batch. A run that has had RUN_TOKENS text tokens ends at its next sentence end,
# and no run takes more than MAX_SEGMENT_TOKENS (a whole text's segment bound) unless one
# part alone is longer: the piece goes on in a new run, as a whole text's next segment does.
RUN_TOKENS = 160
# a sentence's end: a mark (an ASCII one before a space or the text's end: not "3.14")
# and the closing quotes after it
_SENTENCE_END = re.compile(r"(?:[.?!;]+(?=[\"”’\']*(?:\s|$))|[。？！；]+)[\"”’\']*")


def run_cut(
    text: str,
    taken: int,
    length: LengthFn,
    tokens: int = RUN_TOKENS,
    cap: int = MAX_SEGMENT_TOKENS,
) -> int | None:
    """Where a text-streaming run that has had ``taken`` text tokens stops taking ``text``:
    just past the first sentence end that brings it to ``tokens``, or before the part that
    would take it past ``cap`` (parts: words, the pieces :meth:`TextRun.take` may hand over,
    one longer than ``cap`` cut at commas or characters). None: the run takes all of it and
    goes on. Both depend only on the text before them, so the runs end at the same places
    whether the text came whole, word by word, or piled up while the run was queued."""
    pos = 0
    for part, ends in _parts(text, length, cap):
        k = length(part)
        if taken and taken + k > cap:
            return pos
        taken, pos = taken + k, pos + len(part)
        if ends and taken >= tokens:
            return pos
    return None


def _parts(text: str, length: LengthFn, cap: int) -> Generator[tuple[str, bool]]:
    """``text`` in consecutive parts, each with whether it ends a sentence: cut at sentence
    ends and at every word boundary (:func:`_cuttable`: where :meth:`TextRun.take` may end
    what it hands over), found as they are reached. With whole sentences as parts, a sentence
    past what was left of a run's cap ended the run before it when the text came in one
    piece, but mid-sentence at the cap when it came word by word."""
    ends = _SENTENCE_END.finditer(text)
    end = next(ends, None)
    start = 0
    for i in range(1, len(text) + 1):
        sentence = end is not None and end.end() == i
        if sentence or i == len(text) or _cuttable(text[i - 1], text[i]):
            part = text[start:i]  # (cut when longer than cap: a token is at least a byte)
            *pieces, last = (
                [part] if len(part.encode()) <= cap else cap_segments([part], length, cap)
            )
            yield from ((piece, False) for piece in pieces)
            yield last, sentence
            start = i
        if sentence:
            end = next(ends, None)


@dataclass
class Output:
    """A chunk of audio (float32 mono, possibly empty) for ``utterance``; ``tag_end``: the last
    audio of piece ``tag``; ``truncated`` (with ``tag_end``): a segment of the piece ended at a
    limit before all its text was spoken (the LLM's length cap, the flow's 300 s, a full KV pool);
    ``done``: the utterance finished with this output; ``error``: it failed (its speaker was
    deleted, ...)."""

    utterance: Utterance
    audio: torch.Tensor
    tag: Any = None
    tag_end: bool = False
    done: bool = False
    error: str | None = None
    truncated: bool = False
