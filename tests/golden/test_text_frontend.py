"""Text frontend parity with <golden>/frontend/text_frontend.json: segments, unsplit text and
token ids must match exactly, for every item x normaliser x tokenizer key in the file."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from cosyvoice.frontend.text import TextNormalizer
from cosyvoice.frontend.tokenizer import QwenTokenizer, WhisperTokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# tokenizer key -> golden model dir providing it ("" = needs no model dir)
TOKENIZERS = {"qwen_tiny": "cosyvoice2", "whisper_v1": ""}


def _cases(golden: Path):
    p = golden / "frontend" / "text_frontend.json"
    if not p.is_file():
        return []
    d = json.loads(p.read_text(encoding="utf-8"))
    out = []
    for i, item in enumerate(d["items"]):
        for key in item:
            if key == "input":
                continue
            norm, tok = key.split("|")
            marks = []
            if tok not in TOKENIZERS:
                marks = [
                    pytest.mark.xfail(
                        strict=True,
                        raises=NotImplementedError,
                        reason=f"unknown tokenizer {tok}",
                    )
                ]
            out.append(pytest.param((str(golden), i, norm, tok), id=f"{i}-{key}", marks=marks))
    return out


def pytest_generate_tests(metafunc):
    if "text_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config.cosyvoice_golden)
        if not cases:
            cases = [pytest.param(None, marks=pytest.mark.skip(reason="no text_frontend.json"))]
        metafunc.parametrize("text_case", cases)


@functools.cache
def _load(golden: str):
    return json.loads(
        (Path(golden) / "frontend" / "text_frontend.json").read_text(encoding="utf-8")
    )


@functools.cache
def _tokenizer(golden: str, tok: str) -> QwenTokenizer | WhisperTokenizer:
    if tok not in TOKENIZERS:
        raise NotImplementedError(tok)
    if tok == "whisper_v1":
        return WhisperTokenizer()
    return QwenTokenizer(Path(golden) / TOKENIZERS[tok] / "model" / "CosyVoice-BlankEN", "v2")


@functools.cache
def _normalizer(golden: str, norm: str, tok: str) -> TextNormalizer:
    t = _tokenizer(golden, tok)
    return TextNormalizer(lambda s: len(t.encode(s)), use_wetext=(norm == "wetext"))


def test_text_normalize(text_case):
    golden, i, norm, tok = text_case
    item = _load(golden)["items"][i]
    exp = item[f"{norm}|{tok}"]
    n = _normalizer(golden, norm, tok)
    segs = n.normalize(item["input"], split=True)
    assert segs == exp["split"]
    assert n.normalize(item["input"], split=False) == exp["no_split"]
    t = _tokenizer(golden, tok)
    assert [t.encode(s) for s in segs] == exp["split_token_ids"]


@pytest.mark.parametrize("group", [10, 40])
def test_long_text_normalized_in_groups_matches(golden_dir, monkeypatch, group):
    """A long text goes to wetext a group of sentences at a time (so the model's steps get the
    interpreter in between); with groups this small, every fixture is "long" and each seam a
    group could end at is crossed, and the output must still be upstream's."""
    import cosyvoice.frontend.text as text

    pytest.importorskip("wetext")
    monkeypatch.setattr(text, "_GROUP_CHARS", group)
    cases = [c.values[0] for c in _cases(golden_dir) if "wetext|" in c.id and c.values[0]]
    assert cases
    for golden, i, norm, tok in cases:
        if tok not in TOKENIZERS:
            continue
        item = _load(golden)["items"][i]
        n = _normalizer(golden, norm, tok)
        assert n.normalize(item["input"], split=False) == item[f"{norm}|{tok}"]["no_split"]


SEAMY = [
    " ".join(f"Part {i} is done.\nNext part {i} waits!\tThen more; and so on." for i in range(8)),
    " ".join(f"Sentence {i} has  two spaces.  And a blank line.\n\nAfter it." for i in range(8)),
    "".join(f"今天我们讨论 Python 第{i}章的问题。价格是3.5元！\n好的。" for i in range(12)),
]


@pytest.mark.parametrize("group", [10, 40])
def test_groups_never_change_the_text(monkeypatch, group):
    """Seams with newlines, tabs, runs of spaces and CJK with spaces: a text normalized in
    groups is the same as the text normalized in one call."""
    pytest.importorskip("wetext")
    import cosyvoice.frontend.text as text

    n = TextNormalizer(len)
    whole = [n.normalize(t, split=False) for t in SEAMY]
    monkeypatch.setattr(text, "_GROUP_CHARS", group)
    assert [n.normalize(t, split=False) for t in SEAMY] == whole


SEAMLESS = [
    ", ".join(f"then the {w} waited near the river" for w in ("heron", "otter", "willow") * 30),
    ", ".join(f"as Dr. Smith said on Jan. {i}" for i in range(1, 80)),
    "今天我们讨论这个问题然后大家一起吃饭" * 40,
    "，".join("我们明天早上一起出发去看看海边的风景" for _ in range(40)),
]


def test_text_without_sentence_ends_is_normalized_in_bounded_groups(monkeypatch):
    """Thousands of characters with no sentence end a group may stop at (commas only, "Dr."
    after "Dr.", CJK with no marks) still reach wetext in bounded groups, and read the same as
    the whole text normalized in one call; a run with no seam at all is cut at a bound."""
    pytest.importorskip("wetext")
    import cosyvoice.frontend.text as text

    n = TextNormalizer(len)
    whole = [n.normalize(t, split=False) for t in SEAMLESS]
    calls: list[int] = []
    wetext = text._wetext
    monkeypatch.setattr(
        text, "_wetext", lambda norm, t, **o: calls.append(len(t)) or wetext(norm, t, **o)
    )
    assert [n.normalize(t, split=False) for t in SEAMLESS] == whole
    assert len(calls) > 4 * len(SEAMLESS) and max(calls) <= 2 * text._GROUP_CHARS
    calls.clear()
    n.normalize("a" * 4000 + "1" * 1000, split=False)
    assert len(calls) >= 5 and max(calls) <= text._HARD_CHARS
    # no word break a tagger never reads across (capitals, numbers): cut at a space, which
    # stays, so no number is cut in two and no word runs into the next
    for caps in ("AB 1234567, " * 400, "ITEM 12345, " * 400):
        calls.clear()
        assert n.normalize(caps, split=False) == wetext(n._en, caps.strip())
        assert len(calls) >= 4 and max(calls) <= text._HARD_CHARS


def test_runs_of_spaces_do_not_fail_english():
    """wetext asserts on English with a run of spaces; such text reads as with one space."""
    pytest.importorskip("wetext")
    n = TextNormalizer(len)
    assert n.normalize("Hello  world.\n\nIt is 5 pm.", split=False) == n.normalize(
        "Hello world. It is 5 pm.", split=False
    )


@pytest.mark.parametrize("text", ["Room №7 is here.", "I paid ＄7 today.", "Room ²7, _7 and ٣7.",
                                  "房间№7在这里。"])  # fmt: skip
def test_symbols_wetext_fails_on_still_normalize(text):
    """wetext fails an assertion on a digit right after ~1700 symbols; the text still
    normalizes, its digits read as words."""
    pytest.importorskip("wetext")
    out = TextNormalizer(len).normalize(text, split=False)
    assert "7" not in out and ("seven" in out or "七" in out), out


@pytest.mark.parametrize(
    "text",
    [
        "1234567890 " * 500,  # normalizes to ~12 000 tokens of number words with no sentence end
        "我们" * 1000,  # CJK with no mark at all
        "word " * 2000,  # plain words, no comma
        "<|endofprompt|>" + "字" * 1000 + "<|laughter|>",  # special tokens: never normalized
        "<|" + "字" * 1000 + "|>",  # no special token: a run of characters like any other
    ],
    ids=["digits", "cjk", "words", "special", "brackets"],
)
def test_a_sentence_that_never_ends_is_cut_into_segments(golden_dir, text):
    """Upstream keeps a sentence whole as one segment, one LLM prefix, however long it is: a
    stream of 5000 characters of digits was 12 274 tokens in one prefill, which slowed every
    other stream's steps. Past MAX_SEGMENT_TOKENS a segment is cut (at commas, between words,
    between characters, never inside a special token), and nothing is lost."""
    from cosyvoice.frontend.text import MAX_SEGMENT_TOKENS

    pytest.importorskip("wetext")
    n = _normalizer(str(golden_dir), "wetext", "qwen_tiny")
    segs = n.normalize(text, split=True)
    lengths = [n.count_tokens(s) for s in segs]
    assert len(segs) > 1 and max(lengths) <= 100, lengths[:10]
    if "<|" in text:
        assert "".join(segs) == text
        if "<|e" in text:
            assert segs[0].startswith("<|endofprompt|>") and segs[-1].endswith("<|laughter|>")
    else:  # the same text, cut (as a stream's segments are spoken one after the other)
        whole = n.normalize(text, split=False).replace(" ", "")  # (split adds a final mark)
        assert "".join(segs).replace(" ", "").rstrip(".。") == whole.rstrip(".。")
    natural = "This sentence runs on, " * 12 + "and it ends here."  # long, but within the cap
    assert MAX_SEGMENT_TOKENS >= n.count_tokens(natural) > 80
    assert n.normalize(natural, split=True) == [natural]
