"""An utterance: one stream of speech in one voice, driven by :meth:`CosyVoiceModel.step`.

Text arrives in pieces, each with a caller's ``tag`` (a WebSocket flush, an HTTP request's
text); every piece is normalized and split into segments by the frontend, and every segment is
one LLM run plus one token2wav stream. Audio leaves as :class:`Output` chunks tagged with the
piece they belong to, so a caller can tell where each piece's audio ends.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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
    recorded noise with it).
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
    status: Status = Status.WAITING
    closed: bool = False  # no more text will come
    pending: deque[tuple[Any, str, bool]] = field(default_factory=deque)  # (tag, text, last)
    tag: Any = None  # the piece the segment in flight belongs to
    tag_last: bool = False  # the segment in flight is the last one of its piece
    llm: Any = None  # LLMRequest of the segment in flight
    t2w: Any = None  # its token2wav state
    runs: int = 0  # segments started
    fed: int = 0  # LLM tokens handed to token2wav
    ready_since: int = 0  # model step at which its next chunk became ready (0: not ready)

    @property
    def in_flight(self) -> bool:
        return self.t2w is not None

    @property
    def busy(self) -> bool:
        """Whether a step can make progress (a segment in flight or queued, or an end to
        report)."""
        if self.status is Status.FINISHED:
            return False
        return self.in_flight or bool(self.pending) or self.closed


@dataclass
class Output:
    """A chunk of audio (float32 mono, possibly empty) for ``utterance``; ``tag_end``: the last
    audio of piece ``tag``; ``done``: the utterance finished with this output; ``error``: it
    failed (its speaker was deleted, ...)."""

    utterance: Utterance
    audio: torch.Tensor
    tag: Any = None
    tag_end: bool = False
    done: bool = False
    error: str | None = None
