"""Text streaming input, worst case: a long piece that arrives one character at a time.

    uv run python bench/text_stream.py [--model DIR] [--chars 5000 20000]

Times the two objects every WebSocket text fragment goes through: the sentence splitter
(`IncrementalSplitter`, sentence mode) and a text-streaming run (`TextRun`, whose text goes to
the LLM's tokenizer at each word boundary). Linear time shows as a per-character cost that
stays flat as the piece grows; `--model` tokenizes with that dir's tokenizer too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from cosyvoice.frontend import Frontend
from cosyvoice.frontend.incremental import IncrementalSplitter
from cosyvoice.utterance import TextRun


def text(n: int) -> str:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a CosyVoice2/3 dir: its tokenizer")
    ap.add_argument("--chars", type=int, nargs="+", default=[5000, 20000])
    args = ap.parse_args()
    encode = Frontend(args.model, "v2").encode if args.model else len
    print("| characters | splitter us/char | text run us/char |\n| --- | --- | --- |")
    for n in args.chars:
        splitter = IncrementalSplitter(lambda t: [t], min_len=10**9)  # never emits: worst case
        a = per_char_us(splitter.push, text(n))
        b = per_char_us(stream_run(encode), text(n))
        print(f"| {n} | {a:.2f} | {b:.2f} |")


if __name__ == "__main__":
    main()
