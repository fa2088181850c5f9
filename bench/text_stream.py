"""Text input, worst cases: long text that arrives one character at a time, or all at once
with many tiny sentences.

    uv run python bench/text_stream.py [--model DIR] [--chars 5000 20000]

Times what every WebSocket text fragment (or HTTP text) goes through, per character of input:
- `IncrementalSplitter`: CosyVoice's sentence mode, one character per message;
- `TextRun`: CosyVoice's text streaming (its text goes to the LLM's tokenizer at each word
  boundary; `--model` tokenizes with that dir's tokenizer);
- `Segmenter`, the built-in voice's: a sentence that waits on "3.14", then spaces one per
  message; and `split_text` over "Yes. " repeated (an HTTP request of tiny sentences);
- then the same `Segmenter` on periods that end no sentence: "Mr. " one character per message,
  and "e.g. " as one message (its cost per character).
Linear time shows as a per-character cost that stays flat as the text grows.

With `--model`, also the steps of a CosyVoice utterance that is speaking while another one's
5000-character text is normalized (seconds of wetext on a CPU), against a one-sentence text.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import cosyvoice
from cosyvoice.frontend import Frontend
from cosyvoice.frontend.incremental import IncrementalSplitter
from cosyvoice.utterance import Status, TextRun
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


def steps_ms(model: cosyvoice.CosyVoiceModel, text: str, n: int = 60) -> list[float]:
    """The durations of `n` steps (add_text included) of one speaking utterance and one
    given `text`, longest last."""
    spk = model.speakers.list()[0]
    speaking = model.start(spk, seed=1, fixed_tokens=400)
    model.add_text(speaking, "Hello there, this is a stream.")
    model.close_text(speaking)
    for _ in range(5):
        model.step([speaking])
    other = model.start(spk, seed=2, fixed_tokens=40)
    t0, ticks = time.perf_counter(), []
    model.add_text(other, text)
    model.close_text(other)
    while speaking.status is not Status.FINISHED and len(ticks) < n:
        model.step([u for u in (speaking, other) if u.status is not Status.FINISHED])
        ticks.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
    model.cancel(speaking)
    model.cancel(other)
    return sorted(ticks)


def stalls(model_dir: str) -> None:
    model = cosyvoice.load(model_dir, device="cpu", dtype="float32")
    long = ("The fox paid $3.50 on 2024-05-01 at 5 p.m. and said 12,345 words. " * 80)[:5000]
    commas = (", ".join(f"as Dr. Smith said on Jan. {i}" for i in range(1, 300)))[:5000]
    cjk = ("今天我们讨论这个问题然后大家一起吃饭" * 300)[:5000]
    cases = {"one sentence": "Short text.", "5000 characters": long,
             "5000 characters, commas only": commas, "5000 CJK characters, no marks": cjk}  # fmt: skip
    print("\n| other text | longest steps, ms | median step, ms |\n| --- | --- | --- |")
    for name, text in cases.items():
        ticks = steps_ms(model, text)
        print(f"| {name} | {', '.join(f'{t:.0f}' for t in ticks[-4:])} | "
              f"{ticks[len(ticks) // 2]:.0f} |")  # fmt: skip
    model.close()


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
    print("\n| characters | Segmenter, \"Mr. \" 1 char per message | split_text, \"e.g. \" |"
          "\n| --- | --- | --- |")  # fmt: skip
    for n in args.chars:
        abbrev = per_char_us(Segmenter(first_chars=60).push, ("Mr. " * n)[:n])
        t0 = time.perf_counter()
        split_text(("e.g. " * n)[:n], first_chars=60)
        print(f"| {n} | {abbrev:.2f} us | {(time.perf_counter() - t0) / n * 1e6:.2f} us |")
    if args.model:
        stalls(args.model)


if __name__ == "__main__":
    main()
