"""One long whole (non-stream) utterance against everyone else's short requests.

    uv run python bench/long_whole.py --model DIR [--chars 1500] [--every 0.5] [--count 60]
        [--speed 1.0] [--clients 1] [--sentence-words 0]

A text with no punctuation (`--chars` characters of one sentence's words) is one segment;
spoken whole (`stream` false) it is vocoded in hops once it is longer than 30 s, each later
hop costlier than the last (`--speed` below 1 makes each token's audio, and the vocoder's work
for it, longer: hops and the whole-utterance threshold shrink with it). Meanwhile another
client sends a one-sentence `/tts/pcm` request every `--every` seconds. Prints how long the
long request took (and its audio), and the short requests' time to their last byte.
`--clients K` sends K long requests at once; `--sentence-words W` ends a sentence every W words,
so each sentence is a whole segment of its own (below the hop threshold when short enough).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import httpx
from report import pct
from serverproc import ServerProcess

WORDS = "the quick brown fox jumps over the lazy sleeping dog while birds sing loudly above"


async def timed(client: httpx.AsyncClient, body: dict) -> tuple[float, int | None]:
    """Seconds to the last byte, and seconds of audio (None: refused, the queue was full)."""
    t0 = time.monotonic()
    r = await client.post("/tts/pcm", json=body)
    if r.status_code == 429:
        return time.monotonic() - t0, None
    r.raise_for_status()
    return time.monotonic() - t0, len(r.content) // 2 // int(r.headers["X-Sample-Rate"])


def long_text(chars: int, sentence_words: int) -> str:
    words = WORDS.split()
    text = []
    for i in range(chars):  # more words than characters: cut below
        end = sentence_words and (i + 1) % sentence_words == 0
        text.append(words[i % len(words)] + ("." if end else ""))
    return " ".join(text)[:chars]


async def run(args: argparse.Namespace, base: str) -> None:
    text = long_text(args.chars, args.sentence_words)
    body = {"tts_text": text, "spk_id": args.speaker, "stream": False, "speed": args.speed}
    short = {"tts_text": "Hello there, this is short.", "spk_id": args.speaker}
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await timed(client, short)  # warm
        longs = [asyncio.create_task(timed(client, body)) for _ in range(args.clients)]
        shorts = []
        for _ in range(args.count):
            shorts.append(asyncio.create_task(timed(client, short)))
            await asyncio.sleep(args.every)
        done = await asyncio.gather(*shorts)
        for long_s, long_audio in await asyncio.gather(*longs):
            print(f"long request: {long_audio} s of audio in {long_s:.1f} s (None: refused)")
    took = [t for t, audio in done if audio is not None] or [float("nan")]
    print("| short requests | refused (429; not in the times) | p50 s | p95 s | max s |\n"
          "| --- | --- | --- | --- | --- |")  # fmt: skip
    print(f"| {args.count} | {sum(a is None for _, a in done)} | {pct(took, 50):.2f} | "
          f"{pct(took, 95):.2f} | {max(took):.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a CosyVoice2/3 model dir")
    ap.add_argument("--speaker", default="spk_f1")
    ap.add_argument("--chars", type=int, default=1500)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--speed", type=float, default=1.0, help="of the long requests")
    ap.add_argument("--clients", type=int, default=1, help="long requests at once")
    ap.add_argument("--sentence-words", type=int, default=0, help="a sentence end every W words")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as speakers:
        # Every client here is one address: no per-address share of the slots.
        srv = ServerProcess(
            "--model", args.model, "--speaker-dir", speakers,
            "--max-streams", str(max(4, args.clients + 2)), "--max-queue", "8",
            "--max-client-streams", "0",
        ).wait_ready(timeout=300)  # fmt: skip
        try:
            asyncio.run(run(args, srv.base_url))
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
