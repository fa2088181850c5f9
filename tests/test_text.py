"""Sentence segmentation: what the engine is asked to say, batch or token by token."""

import pytest

from rtserver.text import Segmenter, split_text

TEXT = (
    "Hello there. This is Mr. Smith, who paid 3.14 dollars for it! "
    "你好。我是一个很长的句子，里面有逗号。"
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the deep dark "
    "forest where nobody can ever find it again."
)


def words(segments: list[str]) -> str:
    return "".join("".join(segments).split())


def test_sentences_keep_all_text_and_respect_abbreviations_and_decimals():
    segs = split_text(TEXT)
    assert words(segs) == words([TEXT])
    assert segs[0] == "Hello there. This is Mr. Smith, who paid 3.14 dollars for it!"
    assert any(s.startswith("你好。") for s in segs)


def test_short_sentences_are_merged():
    segs = split_text("Yes. No. Maybe so. Perhaps we should talk about it tomorrow.", min_chars=12)
    assert all(len(s) >= 12 for s in segs[:-1]), segs


def test_first_segment_is_cut_at_a_clause_for_low_latency():
    segs = split_text(TEXT, first_chars=40)
    assert segs[0] == "Hello there. This is Mr. Smith,"
    assert words(segs) == words([TEXT])


def test_clause_mode_gives_finer_segments():
    coarse = split_text(TEXT)
    fine = split_text(TEXT, clause_chars=40)
    assert len(fine) > len(coarse)
    assert max(len(s) for s in fine) < max(len(s) for s in coarse)
    assert words(fine) == words(coarse)


def test_token_by_token_equals_one_piece():
    seg = Segmenter()
    out: list[str] = []
    for token in TEXT.replace(" ", " \x00").split("\x00"):
        out += seg.push(token)
    # Sentences are released as soon as they are complete, before the flush.
    assert len(out) >= 2
    out += seg.flush()
    assert out == split_text(TEXT)


def test_run_on_text_without_punctuation_is_cut():
    text = "and then " * 60
    segs = Segmenter(max_chars=100).push(text)
    assert segs and all(len(s) <= 100 for s in segs)


def test_piper_pieces_are_bounded_and_cut_at_clauses_or_words():
    from rtserver.engines.piper_voice import split_phonemes

    text = "ðə wˈɛðɚ tədˈeɪ ɪz sˈʌni, wɪð ɐ lˈaɪt bɹˈiːz fɹʌmðə wˈɛst ænd klˈaʊdz lˈeɪɾɚ."
    pieces = ["".join(p) for p in split_phonemes(list(text), limit=30)]
    assert all(0 < len(p) <= 30 for p in pieces)
    assert pieces[0].endswith(",")  # the clause mark that fits wins over a later space
    assert " ".join(pieces).split() == text.split()  # cut between words, nothing lost
    assert split_phonemes(list(text), limit=1000) == [list(text)]


AGENT_TEXT = "We moved to the U.S. in 2019 and stayed. Meet me at 5 p.m. today, please. Thanks!"


@pytest.mark.parametrize("by_token", [False, True])
def test_abbreviations_and_times_are_not_sentence_ends(by_token):
    seg = Segmenter()
    if by_token:  # as an LLM streams it: the words after "U.S." decide
        out = [s for token in AGENT_TEXT.split(" ") for s in seg.push(token + " ")]
    else:
        out = seg.push(AGENT_TEXT)
    out += seg.flush()
    assert out == ["We moved to the U.S. in 2019 and stayed.", "Meet me at 5 p.m. today, please.",
                   "Thanks!"]  # fmt: skip


def test_a_fast_first_segment_is_never_cut_between_two_words():
    text = "Call Dr. Smith at half past three tomorrow morning before you leave the office today."
    assert split_text(text, first_chars=40) == [text]  # no clause mark: whole
    with_comma = (
        "Call Dr. Smith tomorrow morning before you leave the office, then rest all weekend."
    )
    assert split_text(with_comma, first_chars=40)[0].endswith("office,")  # the next clause


def test_word_estimates_tile_the_span_with_pauses_at_punctuation():
    from rtserver.text import estimate_words

    words = estimate_words("Hello there, my friend.", 100.0, 1500.0)
    assert [w for w, _, _ in words] == ["Hello", "there,", "my", "friend."]
    assert words[0][1] == 100.0 and words[-1][2] <= 1500.0
    gaps = [b[1] - a[2] for a, b in zip(words, words[1:], strict=False)]
    assert gaps[0] == gaps[2] == 0 and gaps[1] > 0  # a pause only after the comma
    # a CJK character is a word and weighs about a syllable (three letters)
    zh = estimate_words("你好，世界", 0.0, 1000.0)
    assert [w for w, _, _ in zh] == ["你", "好，", "世", "界"]
    assert zh[0][2] - zh[0][1] == pytest.approx(zh[3][2] - zh[3][1])
    assert estimate_words("", 0.0, 100.0) == []
    assert [w for w, _, _ in estimate_words("— wait —", 0.0, 100.0)] == ["—", "wait—"]


def test_long_text_is_read_a_window_at_a_time_with_the_same_sentences(monkeypatch):
    """pysbd is quadratic in the sentences it is given, so long text goes to it in windows;
    where the windows fall must not move a sentence boundary."""
    import rtserver.text as text

    long = " ".join(f"{TEXT} Dr. Who paid $4.50 at 5 p.m. on day {i}." for i in range(25))
    many = "Yes. " * 1000  # many tiny sentences: the quadratic case
    assert len(long) > 4 * text._WINDOW
    windowed = [split_text(t, first_chars=60) for t in (long, many)]
    # A run-on with no sentence end is cut at windows too, but never inside a word.
    runon = " ".join(f"word{i}" for i in range(600))
    assert {w for s in split_text(runon) for w in s.split()} == set(runon.split())
    monkeypatch.setattr(text, "_WINDOW", 10**9)
    assert windowed == [split_text(t, first_chars=60) for t in (long, many)]


def test_fragments_of_spaces_change_nothing():
    """Spaces alone end no sentence (the segmenter does not reread its buffer for them)."""
    seg = Segmenter(first_chars=60)
    out = seg.push("It is 3.14")
    for _ in range(3000):
        out += seg.push(" ")
    out += seg.push("and more to come. Next one!") + seg.flush()
    assert out == split_text(
        "It is 3.14" + " " * 3000 + "and more to come. Next one!", first_chars=60
    )
    # A newline does end one, at once.
    seg = Segmenter()
    assert seg.push("Hello there, my friend.") == []
    assert seg.push("\n") == ["Hello there, my friend."]


def test_a_window_over_cjk_ends_at_a_sentence_end(monkeypatch):
    """CJK has no spaces between words: a window over it ends after a sentence end, not after
    an early space inside a sentence, and a window with no sentence end reads further."""
    import rtserver.text as text

    texts = [
        "今天我们来讨论一下 Python 编程的问题，" + "这是一个很长的句子，" * 150 + "。好的。" * 3,
        "今天我们来讨论一下 Python 编程的问题，" + "这是一个很长的句子，" * 150,  # no end at all
    ]
    assert all(len(t) > 2 * text._WINDOW for t in texts)
    windowed = [split_text(t) for t in texts]
    monkeypatch.setattr(text, "_WINDOW", 10**9)
    assert windowed == [split_text(t) for t in texts]


def test_the_splitter_reads_each_possible_end_once_and_a_window_at_most(monkeypatch):
    """Text whose periods never end a sentence ("Mr. ", "e.g. ") made every fragment reread
    the whole pending sentence, and one long message reread ever wider windows: seconds of
    event-loop time per client. The splitter is asked once per word after a possible end, not
    per fragment, and never about more than a window of text."""
    import rtserver.text as text

    sizes: list[int] = []
    real = text._SBD.segment
    monkeypatch.setattr(text._SBD, "segment", lambda t: sizes.append(len(t)) or real(t))
    abbreviations = "Mr. " * 1250
    seg = Segmenter(first_chars=60)
    for c in abbreviations:
        seg.push(c)
    seg.flush()
    runon_cuts = len(abbreviations) // seg.max_chars + 1
    assert len(sizes) <= abbreviations.count(". ") + 2 * runon_cuts
    sizes.clear()
    split_text("e.g. " * 1000)
    assert max(sizes) <= text._WINDOW


@pytest.mark.parametrize("quotes", ['""', "''", "«»", "‹›", "「」", "（）"])
def test_a_sentence_ends_when_the_word_after_its_closing_quote_arrives(quotes):
    """A fragment that starts with the closing quote of a sentence and then the next word
    completes that sentence at once (not at the next hard end or flush)."""
    fragments = ["He ", f"said {quotes[0]}stop now.", f"{quotes[1]} N", "ext one is here"]
    seg = Segmenter()
    out = [seg.push(f) for f in fragments]
    # what the whole text splits into, all but its last sentence (which waits for more)
    assert out[2] == split_text("".join(fragments))[:-1]


def test_a_long_max_chars_still_cuts_at_sentence_ends():
    text = "word " * 130 + "end. " + "more " * 60 + "done."
    segs = split_text(text, max_chars=1000)
    assert [s[-4:] for s in segs] == ["end.", "one."]
