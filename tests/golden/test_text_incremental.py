"""Incremental splitter: fragments fed in arbitrary pieces give complete sentences as soon as
they are safe, and together the same normalised text as splitting the whole at once."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest
from tokenizers import Regex, pre_tokenizers

from cosyvoice.frontend import Frontend
from cosyvoice.frontend.tokenizer import QWEN2_SPLIT
from cosyvoice.utterance import TextRun, run_cut

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def frontend(golden_dir):
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    return Frontend(d, "v2")


def _long_texts(golden_dir):
    items = json.loads((golden_dir / "frontend" / "text_frontend.json").read_text("utf-8"))["items"]
    return [it["input"] for it in items if len(it["input"]) > 150]


@pytest.mark.parametrize("piece", [1, 3, 7])
def test_pieces_join_to_whole(frontend, golden_dir, piece):
    texts = _long_texts(golden_dir)
    assert texts
    for text in texts:
        s = frontend.incremental(min_len=40, first_min_len=1)
        segs = []
        for i in range(0, len(text), piece):
            segs += s.push(text[i : i + piece])
        segs += s.flush()
        whole = frontend.split(text)
        assert len(segs) >= 2
        sep = "" if any("\u4e00" <= c <= "\u9fff" for c in text) else " "
        assert sep.join(x.strip() for x in segs) == sep.join(x.strip() for x in whole)


def test_waits_for_decimal_and_quote(frontend):
    s = frontend.incremental(min_len=1)
    assert s.push("售价4799.") == []  # could be a decimal point
    assert s.push("2元！") == []  # "！" is last: a closing quote may follow
    assert s.push("”然后") == ["售价四千七百九十九点二元！”"]
    assert s.flush() == ["然后。"]
    assert s.flush() == []


def test_first_sentence_early(frontend):
    s = frontend.incremental(min_len=60, first_min_len=1)
    assert s.push("Hi. Next") == ["Hi."]
    assert s.push(" one. And more") == []  # below min_len: keep collecting
    assert s.flush() == ["Next one. And more."]  # each chunk is normalised (stripped)


TRICKY = (
    "It's 4.5 km,  isn't it?\nYes —   she'll say \"no\"…  then 3,000 more.\n\n"
    "你好，世界。今天天气怎么样？很好！ Mixed 中文 and English; 100% done. "
)


@pytest.mark.parametrize("piece", [1, 2, 5, "random"])
def test_streamed_text_tokenizes_as_the_whole(frontend, golden_dir, piece):
    """A text-streaming run hands the LLM each fragment's text once, cut at word boundaries:
    the tokens must be those of the whole text, wherever the fragments were cut."""
    rng = random.Random(7)
    for text in [TRICKY, *_long_texts(golden_dir)]:
        run, ids, at = TextRun(tag=0), [], 0
        while at < len(text):
            n = rng.randint(1, 12) if piece == "random" else piece
            run.add(text[at : at + n])
            at += n
            ids += frontend.encode(run.take())
        run.sealed = True
        ids += frontend.encode(run.take())
        assert ids == frontend.encode(text)
        assert run.tail == ""


# Cuts that changed the pre-tokens: just after CJK punctuation (`，` joins the letters after
# it) and inside the line breaks after punctuation (`.\n\n` is one pre-token).
CUTS = (
    "我们，都来了。\n\nIt ends.\n\nNext line,\n  more 「引用」， 中文：好。 [laughter] ok\r\n "
    "पहा\u095c\nऔर 我们\u095c，都"  # ड़ is a letter, but NFC splits it: letter + mark
)


def _pre_tokens(text: str) -> list[str]:
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    return [t for t, _ in split.pre_tokenize_str(unicodedata.normalize("NFC", text))]


def _streamed(fragments: list[str]) -> list[str]:
    run, pieces = TextRun(tag=0), []
    for f in fragments:
        run.add(f)
        pieces.append(run.take())
    run.sealed = True
    return [*pieces, run.take()]


@pytest.mark.parametrize("word", CUTS.split(" "))
def test_streamed_text_a_character_at_a_time_pre_tokenizes_as_the_whole(word):
    text = f"{word} {word}\n"
    pieces = _streamed(list(text))
    assert [t for p in pieces for t in _pre_tokens(p)] == _pre_tokens(text), pieces


@pytest.mark.parametrize("seed", range(40))
def test_streamed_text_pre_tokenizes_as_the_whole_wherever_it_was_cut(seed):
    """The pieces a text-streaming run hands over split as the whole text does, so the ids
    are the same with any BPE vocabulary (the golden one lacks most merges that would show
    a wrong cut; the released one has `，我们`-like merges)."""
    rng = random.Random(seed)
    words = rng.sample(CUTS.split(" "), 6)
    text = "".join(w + rng.choice(["", " ", "  ", "\n", " \n"]) for w in words)
    fragments, at = [], 0
    while at < len(text):
        n = rng.randint(1, 4)
        fragments.append(text[at : at + n])
        at += n
    pieces = _streamed(fragments)
    assert [t for p in pieces for t in _pre_tokens(p)] == _pre_tokens(text), pieces


def _words(text: str) -> int:
    return len(text.split())


def test_a_run_ends_at_the_first_sentence_end_past_its_tokens():
    text = "One two three. Four five six seven. Eight nine. Ten."
    assert run_cut(text, 0, _words, tokens=5, cap=100) == len("One two three. Four five six seven.")
    assert run_cut(text, 4, _words, tokens=5, cap=100) == len("One two three.")
    assert run_cut(text, 0, _words, tokens=50, cap=100) is None  # under its tokens: all of it
    assert run_cut("Pi is 3.14 or so", 0, _words, tokens=1, cap=100) is None  # not an end
    # CJK marks end a sentence wherever they are; closing quotes stay with it
    assert run_cut("他说“走吧。”我们走", 0, len, tokens=3, cap=100) == len("他说“走吧。”")


def test_a_run_never_takes_past_its_cap():
    words = " ".join(f"w{i}" for i in range(1000))  # no sentence end at all
    for text in [words, "A short one. " + words]:
        cut = run_cut(text, 0, _words, tokens=500, cap=100)
        assert cut is not None and 0 < _words(text[:cut]) <= 100
        assert text[cut] == " " and text[cut - 1] != " "  # between words
    assert run_cut(words, 90, _words, tokens=5, cap=100) == len("w0 w1 w2 w3 w4 w5 w6 w7 w8 w9")
    assert run_cut(words, 100, _words, tokens=5, cap=100) == 0  # nothing more fits: ends here
    # a sentence that does not fit what is left is cut at the cap, as it is when it comes word
    # by word (it ended the run before the sentence when it came whole)
    text = "One two. Three four five six seven."
    assert run_cut(text, 0, _words, tokens=50, cap=4) == len("One two. Three four")
