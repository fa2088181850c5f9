"""Voice-agent load on /ws/tts: N sockets, each streaming an LLM-like reply token by token.

    uv run --extra voice python bench/ws_agents.py [--model DIR] [--agents 1 4 16 32]

Each agent, in a loop for the run's duration: opens a context, sends the reply word by word
at `--words-per-s` (an LLM's pace), sends `flush` after the first sentence (as agent
frameworks do once they have a sentence) and `close` at the end, and plays the audio in real
time from its first frame. Measured per turn: flush -> first audio, underruns (the player ran
dry), and the turn's RTF; aggregate: audio seconds delivered per wall second.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import httpx
from report import git_rev, machine, pct, write_section
from serverproc import ServerProcess

from rtserver.client import TTSClient

REPLY = (
    "Sure, I can help with that. Your order shipped this morning and should arrive on Thursday. "
    "If you are not home, the driver will leave it with a neighbour. Is there anything else?"
)


async def turn(client: TTSClient, spk: str, wps: float, text_streaming: bool = False) -> dict:
    async with client.connect() as conn:
        ctx = await conn.start(spk_id=spk, format="pcm", text_streaming=text_streaming)
        rate = ctx.sample_rate
        words = REPLY.split(" ")
        first_end = next(i for i, w in enumerate(words) if w.endswith("."))
        marks: dict[str, float] = {}
        arrivals: list[tuple[float, int]] = []

        async def reader() -> None:
            async for item in ctx.events():
                if isinstance(item, bytes):
                    arrivals.append((time.monotonic(), len(item)))

        task = asyncio.create_task(reader())
        marks["text"] = time.monotonic()
        for i, word in enumerate(words):
            await ctx.send(word + " ")
            if i == first_end:
                await ctx.flush()
                marks["flush"] = time.monotonic()
            await asyncio.sleep(1 / wps)
        await ctx.close()
        await task
    first = arrivals[0][0]
    play_end = first  # when a real-time player that started at the first frame runs dry
    underruns = 0
    for t, n in arrivals:
        if t > play_end + 0.02:
            underruns += 1
            play_end = t
        play_end += n / 2 / rate
    audio = sum(n for _, n in arrivals) / 2 / rate
    return {"flush_to_audio": first - marks["flush"], "text_to_audio": first - marks["text"],
            "underruns": underruns, "audio": audio, "end": arrivals[-1][0]}  # fmt: skip


async def level(
    base: str, spk: str, n: int, seconds: float, wps: float, text_streaming: bool = False
) -> tuple[list[dict], float]:
    results: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    async with TTSClient(base) as client:

        async def agent(k: int) -> None:
            await asyncio.sleep(k * 0.1)  # agents do not all start in the same millisecond
            while time.monotonic() < deadline:
                results.append(await turn(client, spk, wps, text_streaming))

        await asyncio.gather(*(agent(k) for k in range(n)))
    return results, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--agents", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--words-per-s", type=float, default=15.0)
    ap.add_argument("--section", default="ws_agents")
    ap.add_argument(
        "--modes", nargs="+", default=["sentence"], choices=["sentence", "text-streaming"],
        help="text-streaming: fragments feed a running CosyVoice2/3 LLM (start.text_streaming)",
    )  # fmt: skip
    ap.add_argument("--llm-fixed-tokens", type=int, default=0, help="CosyVoice benchmarks")
    args = ap.parse_args()
    server_args = ["--max-streams", "64", "--max-client-streams", "0", "--max-client-sockets", "0"]
    server_args += ["--model", args.model] if args.model else []
    server_args += ["--llm-fixed-tokens", str(args.llm_fixed_tokens)]
    srv = ServerProcess(*server_args).wait_ready(timeout=600)
    try:
        spk = httpx.get(f"{srv.base_url}/speakers").json()[0]
        rows = []
        for mode, n in ((m, n) for m in args.modes for n in args.agents):
            res, wall = asyncio.run(
                level(
                    srv.base_url,
                    spk["id"],
                    n,
                    args.seconds,
                    args.words_per_s,
                    mode == "text-streaming",
                )  # fmt: skip
            )
            lat = [r["flush_to_audio"] * 1000 for r in res]
            first = [r["text_to_audio"] * 1000 for r in res]
            rows.append(
                f"| {mode} | {n} | {len(res)} | {pct(first, 50):.0f} | "
                f"{pct(lat, 50):.0f} | {pct(lat, 95):.0f} | "
                f"{sum(r['underruns'] for r in res)} | "
                f"{sum(1 for r in res if r['underruns']) / len(res):.0%} | "
                f"{sum(r['audio'] for r in res) / wall:.1f} |"
            )
            print(rows[-1], flush=True)
    finally:
        srv.stop()
    cmd = " ".join(sys.argv[1:])
    body = f"""## WebSocket voice agents ({spk["engine"]}, speaker `{spk["id"]}`)

Command: `uv run --extra voice python bench/ws_agents.py {cmd}`
(commit {git_rev()}). Machine: {machine()}.
N sockets, each looping for {args.seconds:.0f} s over turns: a {len(REPLY)}-character reply sent
word by word at {args.words_per_s:.0f} words/s, `flush` after the first sentence, `close` at the end;
audio played in real time from its first frame. Latency: first text fragment -> first audio
frame, and flush -> first audio frame. An underrun is a frame that arrived after the player
had run dry. Modes: `sentence` (text waits for sentence ends, one LLM run each) and
`text-streaming` (`start.text_streaming`: fragments feed a running LLM as they arrive).

| mode | agents | turns | first text->audio p50 ms | flush->audio p50 ms | p95 ms | underruns | turns with underrun | audio s per wall s |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
