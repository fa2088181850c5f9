"""Sentence segmentation for streaming synthesis, batch or incremental.

A segment is the unit an engine synthesizes: a sentence, merged with its neighbour when too
short (prosody suffers on fragments) and cut at clauses when too long (latency suffers). The
first segment of a stream may be cut early at a clause so the first audio comes quickly.
The same class serves HTTP (push everything, then flush) and WebSocket (tokens as they come).
"""

from __future__ import annotations

_HARD_END = "。！？；…\n"  # ends a sentence wherever it stands
_SOFT_END = ".!?;"  # ends a sentence only before whitespace (3.14, e.g., URLs)
_CLOSERS = "\"'”’」』)]）】"
_CLAUSE = ",，、:：—"
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "jr",
    "sr",
    "prof",
    "no",
}


def _sentence_end(buf: str, i: int, final: bool) -> int | None:
    """If a sentence ends at buf[i], the index just past it (closers included), else None.
    Returns None when more text is needed to decide (non-final buffer)."""
    c = buf[i]
    if c not in _HARD_END and c not in _SOFT_END:
        return None
    j = i + 1
    while j < len(buf) and (buf[j] in _CLOSERS or buf[j] in _HARD_END or buf[j] in _SOFT_END):
        j += 1
    if c in _HARD_END:
        return j
    if j == len(buf):
        return j if final else None
    if not buf[j].isspace():
        return None
    if c == ".":
        word = buf[:i].rsplit(None, 1)[-1].lower() if buf[:i].strip() else ""
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            return None
    return j


def _weight(text: str) -> int:
    return len(text) - sum(ch.isspace() for ch in text)


def _cut(text: str, limit: int, min_chars: int) -> int:
    """Where to cut `text` so the head is at most `limit` long: the last clause mark, else
    the last space, else a hard cut."""
    window = text[: limit + 1]
    for marks in (_CLAUSE, " "):
        pos = max(window.rfind(m) for m in marks)
        if pos + 1 >= min_chars:
            return pos + 1
    return limit


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
        self._buf = ""
        self._held = ""  # a complete sentence too short to send alone
        self._emitted = 0

    def push(self, text: str) -> list[str]:
        self._buf += text
        return self._drain(final=False)

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
        start = 0
        for i in range(len(self._buf)):
            if i < start:
                continue
            end = _sentence_end(self._buf, i, final)
            if end is None:
                continue
            sentence = self._buf[start:end]
            start = end
            self._held += sentence
            if _weight(self._held) >= self.min_chars:
                out += self._shape(self._held.strip())
                self._held = ""
        self._buf = self._buf[start:]
        # A run-on without punctuation: don't wait forever, cut at a clause.
        while _weight(self._held + self._buf) > self.max_chars:
            text = self._held + self._buf
            cut = _cut(text, self.max_chars, self.min_chars)
            out += self._shape(text[:cut].strip())
            self._held, self._buf = "", text[cut:]
        return [s for s in out if s]

    def _shape(self, sentence: str) -> list[str]:
        """Cut one sentence into the segments actually sent."""
        pieces: list[str] = []
        while sentence:
            limit = self.max_chars
            if self._emitted == 0 and self.first_chars:
                limit = min(limit, self.first_chars)
            if self.clause_chars:
                limit = min(limit, self.clause_chars)
            if _weight(sentence) <= limit or len(sentence) <= limit:
                head, sentence = sentence, ""
            else:
                cut = _cut(sentence, limit, self.min_chars)
                head, sentence = sentence[:cut].strip(), sentence[cut:].strip()
                # Never leave a tail too short to say well.
                if _weight(sentence) < self.min_chars:
                    head, sentence = f"{head} {sentence}".strip(), ""
            if head:
                pieces.append(head)
                self._emitted += 1
        return pieces


def split_text(text: str, **options: int) -> list[str]:
    seg = Segmenter(**options)
    return seg.push(text) + seg.flush()
