"""Text input, worst cases: long text that arrives one character at a time, or all at once
with many tiny sentences.

    uv run python bench/text_stream.py [--model DIR] [--chars 5000 20000]

Times what every WebSocket text fragment (or HTTP text) goes through, per character of input:
- `IncrementalSplitter`: CosyVoice's sentence mode, one character per message;
- `TextRun`: CosyVoice's text streaming (its text goes to the LLM's tokenizer at each word
  boundary; `--model` tokenizes with that dir's tokenizer);
- `Segmenter`, the built-in voice's: a sentence that waits on "3.14", then spaces one per
  message; and `split_text` over "Yes. " repeated (an HTTP request of tiny sentences).
Linear time shows as a per-character cost that stays flat as the text grows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from cosyvoice.frontend import Frontend
from cosyvoice.frontend.incremental import IncrementalSplitter
from cosyvoice.utterance import TextRun
from rtserver.session import speakable
from rtserver.text import Segmenter, split_text


def words(n: int) -> str:
    """Words of 7 letters, a sentence end every 50 characters."""
    return "".join(
        "." if i % 50 == 49 else " " if i % 8 == 7 else "abcdefg"[i % 7] for i in range(n)
    )


def per_char_us(feed: Callable[[str], object], s: str) -> float:
    t0 = time.perf_counter()
    for c in s:
        feed(c)
    return (time.perf_counter() - t0) / len(s) * 1e6


def stream_run(encode: Callable[[str], object]) -> Callable[[str], object]:
    run = TextRun(tag=0)

    def feed(c: str) -> object:
        run.add(c)
        return encode(run.take())

    return feed


def waiting_segmenter() -> Callable[[str], object]:
    seg = Segmenter(first_chars=60)
    seg.push("It is 3.14")  # pysbd cannot end a sentence here yet

    def feed(c: str) -> object:
        seg.push(c)
        return speakable(seg.pending)  # what the WebSocket asks after every fragment

    return feed


def one_shot_us(n: int) -> float:
    text = ("Yes. " * (n // 5 + 1))[:n]
    t0 = time.perf_counter()
    split_text(text, first_chars=60)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a CosyVoice2/3 dir: its tokenizer")
    ap.add_argument("--chars", type=int, nargs="+", default=[5000, 20000])
    args = ap.parse_args()
    encode = Frontend(args.model, "v2").encode if args.model else len
    print("| characters | IncrementalSplitter | TextRun | Segmenter, spaces | split_text, tiny "
          "sentences |\n| --- | --- | --- | --- | --- |")  # fmt: skip
    for n in args.chars:
        splitter = IncrementalSplitter(lambda t: [t], min_len=10**9)  # never emits: worst case
        row = [
            per_char_us(splitter.push, words(n)),
            per_char_us(stream_run(encode), words(n)),
            per_char_us(waiting_segmenter(), " " * n),
            one_shot_us(n),
        ]
        print(f"| {n} | " + " | ".join(f"{us:.2f} us" for us in row) + " |")


if __name__ == "__main__":
    main()
