"""HTTP load test: time to first audio byte and real-time factor at several concurrencies.

    uv run --extra voice python bench/http_load.py [--model DIR] [--concurrency 1 4 8 16]

Starts its own server. Each of N concurrent clients sends requests back to back for a while;
per request we record TTFA (request sent -> first audio byte), delivery RTF (first byte ->
last byte, over the audio's duration) and underruns (moments when a listener who started
playing at the first byte would have run out of audio).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time

import av
import httpx
from report import delivery, git_rev, machine, pct, write_section
from serverproc import ServerProcess

SENTENCE = (
    "The quick brown fox jumps over the lazy dog, then runs into the forest to find its friends."
)


def mp3_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data), format="mp3") as c:
        return sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate


async def one(client: httpx.AsyncClient, path: str, spk: str, rate: int, **extra: object) -> dict:
    """One request; ``extra`` joins the JSON body (``stream``, ``seed``, ``tts_text``)."""
    body = {"tts_text": SENTENCE, "spk_id": spk, **extra}
    t0 = time.monotonic()
    arrivals: list[tuple[float, float]] = []
    data = b""
    async with client.stream("POST", path, json=body) as r:
        r.raise_for_status()
        async for piece in r.aiter_raw():
            arrivals.append((time.monotonic(), len(piece) / 2 / rate))
            data += piece
    if path.endswith("pcm"):
        return delivery(t0, arrivals)
    return delivery(t0, [(t, 0.0) for t, _ in arrivals], mp3_seconds(data))


async def level(base: str, path: str, spk: str, rate: int, n: int, seconds: float) -> list[dict]:
    results: list[dict] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def worker() -> None:
            while time.monotonic() < deadline:
                results.append(await one(client, path, spk, rate))

        await asyncio.gather(*(worker() for _ in range(n)))
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--seconds", type=float, default=12.0, help="per level")
    ap.add_argument("--section", default="http_load")
    args = ap.parse_args()
    server_args = ["--max-streams", "64", "--max-client-streams", "0", "--max-client-sockets", "0"]
    server_args += ["--model", args.model] if args.model else []
    srv = ServerProcess(*server_args).wait_ready(timeout=600)
    try:
        spk = httpx.get(f"{srv.base_url}/speakers").json()[0]
        rows = []
        for path in ("/tts/pcm", "/tts"):
            for n in args.concurrency:
                res = asyncio.run(
                    level(srv.base_url, path, spk["id"], spk["sample_rate"], n, args.seconds)
                )
                ttfa = [r["ttfa"] * 1000 for r in res]
                rtf = [r["rtf"] for r in res]
                rows.append(
                    f"| `{path}` | {n} | {len(res)} | {pct(ttfa, 50):.0f} | {pct(ttfa, 95):.0f} | "
                    f"{pct(rtf, 50):.3f} | {max(rtf):.3f} | {sum(r['underruns'] for r in res)} | "
                    f"{sum(r['audio'] for r in res) / args.seconds:.1f} |"
                )
                print(rows[-1], flush=True)
    finally:
        srv.stop()
    body = f"""## HTTP load ({spk["engine"]}, speaker `{spk["id"]}`)

Command: `uv run --extra voice python bench/http_load.py{" --model " + args.model if args.model else ""}`
(commit {git_rev()}). Machine: {machine()}.
Each of N clients sends one-sentence requests ({len(SENTENCE)} characters) back to back for
{args.seconds:.0f} s, `stream=false`. TTFA: request sent -> first audio byte. Delivery RTF:
first -> last byte over the audio's duration (< 1: the stream outruns playback). Underruns
(PCM only): arrivals later than a listener playing since the first byte would need them.

| route | N | requests | TTFA p50 ms | TTFA p95 ms | RTF p50 | RTF max | underruns | audio s per s |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
