"""Sentence segmentation for streaming synthesis, batch or incremental.

A segment is the unit an engine synthesizes: a sentence, merged with its neighbour when too
short (prosody suffers on fragments) and cut at clauses when too long (latency suffers). The
first segment of a stream may be cut early at a clause so the first audio comes quickly.
The same class serves HTTP (push everything, then flush) and WebSocket (tokens as they come).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

import pysbd
import regex


def speakable(text: Iterable[str]) -> bool:
    """Whether any character would be spoken: a letter or a digit in any script. Punctuation,
    symbols, spaces and invisible format characters alone give no audio."""
    return any(unicodedata.category(c)[0] in "LN" for c in text)


_HARD_END = "。！？；…\n"  # ends a sentence wherever it stands, even at the end of the buffer
_SOFT_END = ".!?;"  # may end one (pysbd decides: 3.14, e.g., U.S. in 2019, 5 p.m. today)
_CLAUSE = ",，、:：—"
# pysbd's rule-based boundaries (abbreviations, numbers, URLs, quotes, CJK); clean=False keeps
# the text exactly, so the sentences concatenate back to the buffer.
_SBD = pysbd.Segmenter(language="en", clean=False, char_span=False)


# pysbd's time grows with the square of the sentences it is given (5000 characters of "a. "
# take half a second), so it reads long text a window at a time. A window in which no sentence
# ends is not widened: the text is a run-on, cut at max_chars by the caller, and read on after.
_WINDOW = 600
_CLOSER = r"[\p{Pe}\p{Pf}\"']"  # closing brackets and quotes
# a soft end, its closers, then a word: only that word tells an end from "p.m."
_SOFT_THEN_WORD = regex.compile(rf"[{regex.escape(_SOFT_END)}]{_CLOSER}*\s+\S")
_CLOSER_OR_SPACE = regex.compile(rf"{_CLOSER}|\s")


def _complete_sentences(buf: str, final: bool, window: int = _WINDOW) -> tuple[list[str], str]:
    """The complete sentences at the head of `buf`, and what is left. Unless `final`, the last
    sentence waits for more text (the next words decide "5 p.m." + "today") unless it ends at
    a hard end."""
    done: list[str] = []
    while len(buf) > window:
        # a window ends between two words, or after a hard end (CJK has no spaces)
        cut = max(buf.rfind(c, 0, window) for c in " " + _HARD_END) + 1 or window
        parts, rest = _sentences(buf[:cut], final=False)
        if not parts:
            return done, buf
        done += parts
        buf = rest + buf[cut:]
    parts, rest = _sentences(buf, final)
    return done + parts, rest


def _may_end(buf: str, start: int) -> bool:
    """Whether the text pushed at `buf[start:]` may complete a sentence: a hard end, or the
    first word after a soft end (only that word tells "5 p.m." + "today" from an end). Other
    text leaves the splitter's answer as it was, so it is not asked again."""
    new = buf[start:]
    if any(c in _HARD_END for c in new):
        return True
    if new.isspace() or not new:
        return False  # spaces decide nothing: the word after them does
    k = start  # a soft end and its closers may have come in earlier fragments
    while k and _CLOSER_OR_SPACE.match(buf, k - 1):
        k -= 1
    return bool(_SOFT_THEN_WORD.search(buf, max(0, k - 1)))


def _sentences(buf: str, final: bool) -> tuple[list[str], str]:
    if not any(c in _HARD_END or c in _SOFT_END for c in buf):
        return [], buf  # no possible end: skip the splitter (it runs on every token)
    parts = _SBD.segment(buf)
    if not final and parts and not parts[-1].rstrip(" \t").endswith(tuple(_HARD_END)):
        return parts[:-1], parts[-1]
    return parts, ""


def _next_clause(text: str) -> int | None:
    ends = [i + 1 for i, c in enumerate(text[:-1]) if c in _CLAUSE]
    return ends[0] if ends else None


def _weight(text: str) -> int:
    return len(text) - sum(ch.isspace() for ch in text)


def _cut(text: str, limit: int, min_chars: int, marks: str) -> int | None:
    """Where to cut `text` so the head is at most `limit` long: after the last of `marks`
    that leaves a head of at least `min_chars`; None if there is none."""
    window = text[: limit + 1]
    pos = max(window.rfind(m) for m in marks)
    return pos + 1 if pos + 1 >= min_chars else None


class Segmenter:
    def __init__(
        self,
        min_chars: int = 12,
        max_chars: int = 200,
        first_chars: int = 0,
        clause_chars: int = 0,
    ) -> None:
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.first_chars = first_chars  # cut the first segment at a clause past this many chars
        self.clause_chars = clause_chars  # cut every segment at clauses past this (finest chunks)
        # pysbd reads windows longer than a run-on may be (max_chars), so one holds an end
        self._window = max(_WINDOW, 3 * max_chars)
        self._buf = ""
        self._held = ""  # a complete sentence too short to send alone
        self._emitted = 0

    def push(self, text: str) -> list[str]:
        start = len(self._buf)
        self._buf += text
        if _may_end(self._buf, start) or _weight(self._held + self._buf) > self.max_chars:
            return self._drain(final=False)
        return []  # nothing the splitter could answer differently now: not read again

    def flush(self) -> list[str]:
        """Everything buffered, now (a flush, a close, or an idle timeout)."""
        out = self._drain(final=True)
        rest = (self._held + self._buf).strip()
        self._held = self._buf = ""
        if rest:
            out += self._shape(rest)
        return out

    @property
    def pending(self) -> str:
        return self._held + self._buf

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            sentences, self._buf = _complete_sentences(self._buf, final, self._window)
            for sentence in sentences:
                self._held += sentence
                if _weight(self._held) >= self.min_chars:
                    out += self._shape(self._held.strip())
                    self._held = ""
            if _weight(self._held + self._buf) <= self.max_chars:
                return [s for s in out if s]
            # A run-on with no sentence end in reach: don't wait forever, cut at a clause or a
            # space, and read on after the cut.
            text = self._held + self._buf
            cut = _cut(text, self.max_chars, self.min_chars, _CLAUSE + " ") or self.max_chars
            out += self._shape(text[:cut].strip())
            self._held, self._buf = "", text[cut:]

    def _shape(self, sentence: str) -> list[str]:
        """Cut one sentence into the segments actually sent. Cuts made for latency (the first
        segment, clause mode) fall only at clause marks: a cut between two words mid-phrase
        is audible. Only a sentence past max_chars is cut at a space."""
        pieces: list[str] = []
        while sentence:
            head, sentence = self._head(sentence)
            if head:
                pieces.append(head)
                self._emitted += 1
        return pieces

    def _head(self, sentence: str) -> tuple[str, str]:
        fast = [n for n in (self.first_chars if self._emitted == 0 else 0, self.clause_chars) if n]
        cut = None
        if fast and _weight(sentence) > min(fast):
            # The last clause mark in reach, else the next one: never between two words.
            cut = _cut(sentence, min(fast), self.min_chars, _CLAUSE) or _next_clause(sentence)
        if cut is None and _weight(sentence) > self.max_chars:
            cut = _cut(sentence, self.max_chars, self.min_chars, _CLAUSE + " ") or self.max_chars
        if cut is None:
            return sentence, ""
        head, rest = sentence[:cut].strip(), sentence[cut:].strip()
        if _weight(rest) < self.min_chars:  # never leave a tail too short to say well
            return f"{head} {rest}".strip(), ""
        return head, rest


def split_text(text: str, **options: int) -> list[str]:
    seg = Segmenter(**options)
    return seg.push(text) + seg.flush()


_WORD = re.compile(
    r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]|[^\s\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]+"
)
_PAUSE = 3.0  # weight of the pause after a comma or sentence end, in letters


def estimate_words(text: str, start_ms: float, end_ms: float) -> list[tuple[str, float, float]]:
    """Word timings spread over [start_ms, end_ms] by length: a CJK character counts as three
    letters (about a syllable either way), punctuation after a word as a short pause after it.
    Words are whitespace-separated, each CJK character is one; punctuation stays on its word."""
    words: list[str] = []
    for w in _WORD.findall(text):  # punctuation alone (a CJK comma, a dash) joins the word before
        if words and not any(ch.isalnum() for ch in w):
            words[-1] += w
        else:
            words.append(w)
    pauses = [_PAUSE if not w[-1].isalnum() else 0.0 for w in words]
    speech = [_speech(w) for w in words]
    scale = max(end_ms - start_ms, 0.0) / (sum(speech) + sum(pauses) or 1.0)
    t, out = start_ms, []
    for w, sp, pause in zip(words, speech, pauses, strict=True):
        out.append((w, round(t, 1), round(t + sp * scale, 1)))
        t += (sp + pause) * scale
    return out


def _speech(word: str) -> float:
    return max(sum(3.0 if _cjk(ch) else 1.0 for ch in word if ch.isalnum()), 1.0)


def _cjk(ch: str) -> bool:
    return "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"
