"""One long whole (non-stream) utterance against everyone else's short requests.

    uv run python bench/long_whole.py --model DIR [--chars 1500] [--every 0.5] [--count 60]
        [--speed 1.0]

A text with no punctuation (`--chars` characters of one sentence's words) is one segment;
spoken whole (`stream` false) it is vocoded in hops once it is longer than 30 s, each later
hop costlier than the last (`--speed` below 1 makes each token's audio, and the vocoder's work
for it, longer: hops and the whole-utterance threshold shrink with it). Meanwhile another
client sends a one-sentence `/tts/pcm` request every `--every` seconds. Prints how long the
long request took (and its audio), and the short requests' time to their last byte.
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


async def run(base: str, speaker: str, chars: int, every: float, count: int, speed: float) -> None:
    words = WORDS.split()
    text = " ".join(words[i % len(words)] for i in range(chars))[:chars]
    short = {"tts_text": "Hello there, this is short.", "spk_id": speaker}
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        await timed(client, short)  # warm
        long = asyncio.create_task(
            timed(client, {"tts_text": text, "spk_id": speaker, "stream": False, "speed": speed})
        )
        shorts = []
        for _ in range(count):
            shorts.append(asyncio.create_task(timed(client, short)))
            await asyncio.sleep(every)
        done = await asyncio.gather(*shorts)
        long_s, long_audio = await long
    took = [t for t, audio in done if audio is not None] or [float("nan")]
    print(f"long request: {long_audio} s of audio in {long_s:.1f} s (None: refused)")
    print("| short requests | refused (429; not in the times) | p50 s | p95 s | max s |\n"
          "| --- | --- | --- | --- | --- |")  # fmt: skip
    print(f"| {count} | {sum(a is None for _, a in done)} | {pct(took, 50):.2f} | "
          f"{pct(took, 95):.2f} | {max(took):.2f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a CosyVoice2/3 model dir")
    ap.add_argument("--speaker", default="spk_f1")
    ap.add_argument("--chars", type=int, default=1500)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--speed", type=float, default=1.0, help="of the long request")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as speakers:
        srv = ServerProcess(
            "--model", args.model, "--speaker-dir", speakers, "--max-streams", "4",
            "--max-queue", "8",
        ).wait_ready(timeout=300)  # fmt: skip
        try:
            asyncio.run(
                run(srv.base_url, args.speaker, args.chars, args.every, args.count, args.speed)
            )
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
