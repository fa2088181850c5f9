"""Text normalisation and sentence splitting (spec frontend-llm.md §4).

Every rule here mirrors the documented upstream behaviour so that long texts become the same
segments (golden ``frontend/text_frontend.json``). The deliberate differences: indices that
upstream reads past the end of the string (``replace_blank`` on a trailing space) are treated as
"not ASCII" instead of raising, and a segment over ``MAX_SEGMENT_TOKENS`` (one sentence with
no end: upstream keeps it whole) is cut (:func:`cap_segments`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import regex

log = logging.getLogger("cosyvoice")

# zh: characters; en: tokens of the family's text tokenizer.
LengthFn = Callable[[str], int]

ZH_PUNCT = "。？！；：、.?!;"
EN_PUNCT = ".?!;:"
CLOSING_QUOTES = ('"', "”")
_PUNCT_ONLY = regex.compile(r"^[\p{P}\p{S}]*$")
_DIGIT_RUN = re.compile(r"\d+")  # str.isdigit runs; `re` \d matches Unicode decimal digits
_TRAILING_COMMAS = re.compile(r"[，,、]+$")


def contains_chinese(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def replace_blank(text: str) -> str:
    """Drop every space unless both neighbours are ASCII non-space characters."""
    out = []
    n = len(text)
    for i, c in enumerate(text):
        if c == " ":
            # upstream indexes text[i-1] (wrapping at 0) and text[i+1]
            prev = text[i - 1]
            nxt = text[i + 1] if i + 1 < n else ""
            if nxt and nxt.isascii() and nxt != " " and prev.isascii() and prev != " ":
                out.append(c)
        else:
            out.append(c)
    return "".join(out)


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for ch in ("（", "）", "【", "】", "`"):
        text = text.replace(ch, "")
    return text.replace("——", " ")


@functools.cache
def _inflect_engine():
    import inflect

    return inflect.engine()


def spell_out_number(text: str) -> str:
    """Replace every maximal digit run by inflect's words ("3.5" -> "three.five", as upstream)."""
    out: list[str] = []
    st = None
    for i, c in enumerate(text):
        if c.isdigit():
            if st is None:
                st = i
        else:
            if st is not None:
                out.append(_number_words(text[st:i]))
                st = None
            out.append(c)
    if st is not None:
        out.append(_number_words(text[st:]))
    return "".join(out)


def _number_words(run: str) -> str:
    try:
        return _inflect_engine().number_to_words(run)
    except Exception:  # e.g. superscript digits inflect cannot parse: keep them as they are
        return run


def split_paragraph(
    text: str,
    length: LengthFn,
    lang: str,
    token_max_n: int = 80,
    token_min_n: int = 60,
    merge_len: int = 20,
    comma_split: bool = False,
) -> list[str]:
    """Cut ``text`` at sentence-final punctuation, then greedily merge sentences into segments."""
    punct = ZH_PUNCT if lang == "zh" else EN_PUNCT
    if comma_split:
        punct += "，,"
    if not text:
        return []
    if text[-1] not in punct:
        text += "。" if lang == "zh" else "."
    utts = sentences(text, punct)
    return merge_sentences(utts, length, token_max_n, token_min_n, merge_len)


def sentences(text: str, punct: str) -> list[str]:
    """Cut at punctuation; a closing quote right after the mark sticks to the sentence."""
    utts: list[str] = []
    st = 0
    for i, c in enumerate(text):
        if c in punct:
            if text[st:i]:
                utts.append(text[st:i] + c)
            if i + 1 < len(text) and text[i + 1] in CLOSING_QUOTES:
                if utts:
                    utts[-1] = utts[-1] + text[i + 1]
                st = i + 2
            else:
                st = i + 1
    return utts


def merge_sentences(
    utts: list[str], length: LengthFn, token_max_n: int, token_min_n: int, merge_len: int
) -> list[str]:
    final: list[str] = []
    cur = ""
    for u in utts:
        if length(cur + u) > token_max_n and length(cur) > token_min_n:
            final.append(cur)
            cur = ""
        cur += u
    if cur:
        if length(cur) < merge_len and final:
            final[-1] += cur
        else:
            final.append(cur)
    return final


# A segment is one LLM prefix, and its speech is made in one run: a sentence that never ends
# (5000 characters of "1234567890 " normalize to 12 000 tokens) was one segment, whose
# prefill and attention slowed every stream's steps for its whole length. One longer than
# this is cut into pieces of about token_max_n; a long natural sentence stays whole.
MAX_SEGMENT_TOKENS = 320
_CUTS = (re.compile(r"(?<=[,，、])"), re.compile(r"(?<=\s)(?=\S)"))  # after a comma, a space
_ATOM = re.compile(r"<\|[^\s|]{1,40}\|>|.", re.S)  # a character, or a special token whole


def cap_segments(
    segs: list[str], length: LengthFn, cap: int = MAX_SEGMENT_TOKENS, target: int = 80
) -> list[str]:
    """``segs``, each one longer than ``cap`` cut into pieces of at most ``target``: at commas,
    else between words, else between characters (never inside a ``<|special|>`` token)."""
    return [p for s in segs for p in (_cut(s, length, target) if length(s) > cap else [s])]


def _cut(text: str, length: LengthFn, target: int, level: int = 0) -> list[str]:
    if length(text) <= target:
        return [text]
    if level == len(_CUTS):
        parts = _ATOM.findall(text)
    else:
        parts = [p for p in _CUTS[level].split(text) if p]
        if len(parts) == 1:  # no such mark: the next kind of cut
            return _cut(text, length, target, level + 1)
    pieces, cur, n = [], "", 0
    for p in parts:
        k = length(p)  # a sum of parts' lengths: each part read once (within a token a seam)
        if cur and n + k > target:
            pieces.append(cur)
            cur, n = "", 0
        cur, n = cur + p, n + k
    pieces.append(cur)
    if level == len(_CUTS):
        return pieces
    return [q for piece in pieces for q in _cut(piece, length, target, level + 1)]


@functools.cache
def _wetext_normalizers():
    """(zh, en) wetext normalizers as upstream builds them; shared, FST loading is slow."""
    from wetext import Normalizer

    return Normalizer(remove_erhua=False), Normalizer()


# wetext takes ~0.2 ms a character on a CPU, all of it in one call: a long text is normalized a
# group of sentences at a time, so a caller can spread it over several model steps. A group ends
# at a sentence end whose neighbours a tagger never reads across: a CJK mark with no space
# after it, or ! ? ; or a period after a lowercase word (not "Dr." or "Jan.") and one plain
# space (wetext drops a newline there, which a seam could not give back).
_GROUP_CHARS = 200
_SEAM = re.compile(r"(?<=[。！？；])(?!\s)|(?<=[!?;]) (?=\S)|(?<=[a-z]{4}\.) (?=\S)")
# Past two groups with no sentence end (commas only, "Dr." after "Dr."), a group ends between
# words no tagger joins: one space between lowercase words of 4+ letters (a comma may end the
# first), or between CJK characters 4+ away from anything else. Text with none of those for
# _HARD_CHARS (a run of digits or of one letter) is cut there: one wetext call stays bounded.
_WEAK_SEAM = re.compile(
    r"(?<=[a-z]{4}) (?=[a-z]{4})|(?<=[a-z]{4},) (?=[a-z]{4})"
    r"|(?<=[\u4e00-\u9fff]{4})(?=[\u4e00-\u9fff]{4})|(?<=[\u4e00-\u9fff]{4}，)(?=[\u4e00-\u9fff]{4})"
)
_HARD_CHARS = 1000
_SPACE_RUN = re.compile(r"\s{2,}")
_SYMBOL_DIGIT = re.compile(r"(?<=[^\x00-\x7f\w\s])(?=\d)")  # "№7", "＄7"
_ANY_DIGIT = re.compile(r"(?<=[^0-9\s])(?=\d)")  # "_7", "²7", "٣7"

T = TypeVar("T")
Steps = Generator[None, None, T]  # a computation that pauses (yields) between its pieces


def run_steps(steps: Steps[T]) -> T:
    """A stepwise computation, run to its end."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def _seams(text: str) -> Iterator[tuple[int, int]]:
    """(end of a group, start of the next) for every group of ``text`` but the last."""
    start = 0
    for m in itertools.chain(_SEAM.finditer(text), [None]):
        stop = len(text) if m is None else m.start()
        while stop - start > 2 * _GROUP_CHARS and (seam := _weak_seam(text, start, stop)):
            yield seam
            start = seam[1]
        if m is not None and stop - start >= _GROUP_CHARS:
            yield m.span()
            start = m.end()


def _weak_seam(text: str, start: int, stop: int) -> tuple[int, int] | None:
    end = min(stop, start + _HARD_CHARS)  # a group never grows past _HARD_CHARS
    if m := _WEAK_SEAM.search(text, start + _GROUP_CHARS, end):
        return m.span()
    if stop - start <= _HARD_CHARS:
        return None
    # no word break a tagger never reads across: the last space (kept, so no number is cut
    # and wetext does not drop it), else anywhere
    space = max(
        text.rfind(" ", start + _GROUP_CHARS, end), text.rfind("\n", start + _GROUP_CHARS, end)
    )
    return (space, space + 1) if space > 0 else (end, end)


def _wetext_steps(norm, text: str) -> Steps[str]:
    """``norm.normalize(text)`` (text stripped), pausing between groups of sentences."""
    if len(text) <= _GROUP_CHARS:
        return _wetext(norm, text)
    from wetext.utils import get_lang

    lang = get_lang(text)  # the whole text's, as one call would decide it
    out, start = [], 0
    for end, nxt in _seams(text):
        out += [_wetext(norm, text[start:end], lang=lang), text[end:nxt]]
        start = nxt
        yield
    if start < len(text):
        out.append(_wetext(norm, text[start:], lang=lang))
    return "".join(out)


def _wetext(norm, text: str, **options: str) -> str:
    """``norm.normalize(text)``; where wetext 0.1.8 fails an assertion (on English with a run
    of spaces, on a digit right after "№", "＄", "²", "٣" and ~1700 other characters), the text
    is given to it again with one space in those places, and as a last resort kept as it is."""
    spaced = _SPACE_RUN.sub(" ", text)
    narrow = _SYMBOL_DIGIT.sub(" ", spaced)  # only after a non-ASCII symbol
    for attempt in (text, spaced, narrow, _ANY_DIGIT.sub(" ", narrow)):
        try:
            return norm.normalize(attempt, **options)
        except AssertionError:
            continue
    log.debug("wetext cannot normalize %r: kept as it is", text[:80])
    return text


def is_punct_only(seg: str) -> bool:
    return bool(_PUNCT_ONLY.match(seg))


class TextNormalizer:
    """``text_normalize`` of the spec, with a pluggable token counter for English lengths.

    ``use_wetext=False`` reproduces upstream's ``text_frontend == ''`` fallback (no wetext).
    """

    def __init__(self, count_tokens: LengthFn, use_wetext: bool = True) -> None:
        self.count_tokens = count_tokens
        self._zh = self._en = None
        if use_wetext:
            self._zh, self._en = _wetext_normalizers()

    @staticmethod
    def bypass(text: str) -> bool:
        """Special-token text (``<|...|>``) skips normalisation and splitting entirely."""
        return "<|" in text and "|>" in text

    def _zh_steps(self, text: str) -> Steps[str]:
        if self._zh is not None:
            text = yield from _wetext_steps(self._zh, text)
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = remove_bracket(text)
        return _TRAILING_COMMAS.sub("。", text)

    def _en_steps(self, text: str) -> Steps[str]:
        if self._en is not None:
            text = yield from _wetext_steps(self._en, text)
        return spell_out_number(text)

    def normalize(self, text: str, split: bool = True, text_frontend: bool = True):
        """Return the list of segments (``split=True``) or the normalised string."""
        return run_steps(self.normalize_steps(text, split, text_frontend))

    def normalize_steps(
        self, text: str, split: bool = True, text_frontend: bool = True
    ) -> Steps[list[str] | str]:
        """:meth:`normalize`, pausing between groups of sentences of a long text."""
        if self.bypass(text):
            text_frontend = False
        if not text_frontend or text == "":
            segs = cap_segments([text], self.count_tokens) if text else [text]
            return segs if split else text
        text = text.strip()
        if contains_chinese(text):
            text = yield from self._zh_steps(text)
            segs, length = split_paragraph(text, len, "zh"), len
        else:
            text = yield from self._en_steps(text)
            segs, length = split_paragraph(text, self.count_tokens, "en"), self.count_tokens
        segs = cap_segments([s for s in segs if not is_punct_only(s)], length)
        return segs if split else text
