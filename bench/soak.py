"""Soak: mixed HTTP and WebSocket load with random disconnects and cancels, for a long time.

    uv run --extra voice python bench/soak.py [--minutes 30] [--clients 4] [--model DIR]

Starts its own server. Each client loops over randomly chosen sessions: a whole HTTP request
(PCM, MP3 or the OpenAI route), an HTTP stream abandoned after its first bytes, a WebSocket
context fed word by word and closed, one cancelled mid-way (barge-in), and a socket dropped
mid-context. Records the server's RSS over time, errors (anything but the expected outcome),
and the scheduler's counters once the load stops: active and queued must be back at zero.
RSS is sampled every 5 s. Under load it swings by tens of MB with what is in flight, so a
leak is told by a trend: a least-squares line through every sample after the first tenth
(warm-up), and the median of each tenth; RSS is read again once the server is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter

import httpx
import websockets
from report import git_rev, machine, write_section
from serverproc import ServerProcess, rss_mb

TEXTS = [
    "Hello there. This is a short test of the speech server.",
    "The weather today is sunny with a light breeze from the west, and clouds later on.",
    "Voice agents stream their replies a few words at a time, and the server speaks each "
    "sentence as soon as it is complete. When the user interrupts, the audio stops at once.",
]


async def http_whole(c: httpx.AsyncClient, spk: str, rng: random.Random) -> str:
    path, body = rng.choice(
        [
            ("/tts/pcm", {"tts_text": rng.choice(TEXTS), "spk_id": spk, "stream": True}),
            ("/tts", {"tts_text": rng.choice(TEXTS), "spk_id": spk}),
            ("/v1/audio/speech", {"input": rng.choice(TEXTS), "voice": spk,
                                  "response_format": "pcm"}),
        ]
    )  # fmt: skip
    r = await c.post(path, json=body)
    return "ok" if r.status_code == 200 and len(r.content) > 1000 else f"http {r.status_code}"


async def http_abandon(c: httpx.AsyncClient, spk: str, rng: random.Random) -> str:
    body = {"tts_text": " ".join(TEXTS), "spk_id": spk, "stream": True}
    async with c.stream("POST", "/tts/pcm", json=body) as r:
        if r.status_code != 200:
            return f"http {r.status_code}"
        async for _ in r.aiter_raw():
            if rng.random() < 0.5:
                break
    return "ok"


async def ws_session(base: str, spk: str, rng: random.Random) -> str:
    mode = rng.choice(["close", "cancel", "drop"])
    async with websockets.connect(f"{base}/ws/tts", compression=None) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "start", "context_id": "c", "spk_id": spk}))
        for word in rng.choice(TEXTS).split(" "):
            await ws.send(json.dumps({"type": "text", "context_id": "c", "text": word + " "}))
        if mode == "drop":
            await asyncio.sleep(rng.random())
            return "ok"  # leaving the block closes the socket mid-context
        await ws.send(json.dumps({"type": "close", "context_id": "c"}))
        if mode == "cancel":
            await asyncio.sleep(rng.random() * 0.5)
            await ws.send(json.dumps({"type": "cancel", "context_id": "c"}))
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                continue
            kind = json.loads(msg)["type"]
            if kind in ("done", "cancelled"):
                return "ok"
            if kind == "error":
                return f"ws error {msg}"


async def client(base: str, spk: str, seed: int, deadline: float, tally: Counter) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=120) as c:
        while time.monotonic() < deadline:
            kind = rng.choice(["http_whole", "http_abandon", "ws"])
            try:
                if kind == "ws":
                    outcome = await asyncio.wait_for(
                        ws_session(base.replace("http", "ws"), spk, rng), 120
                    )
                elif kind == "http_whole":
                    outcome = await http_whole(c, spk, rng)
                else:
                    outcome = await http_abandon(c, spk, rng)
            except Exception as exc:  # a soak counts failures; it does not stop at the first
                outcome = f"{type(exc).__name__}: {exc}"[:120]
            tally[(kind, outcome)] += 1


async def sample_rss(pid: int, deadline: float, out: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        out.append((time.monotonic() - t0, rss_mb(pid)))
        await asyncio.sleep(5)


async def soak(srv: ServerProcess, spk: str, minutes: float, clients: int) -> tuple:
    deadline = time.monotonic() + minutes * 60
    tally: Counter = Counter()
    rss: list[tuple[float, float]] = []
    await asyncio.gather(
        sample_rss(srv.proc.pid, deadline, rss),
        *(client(srv.base_url, spk, k, deadline, tally) for k in range(clients)),
    )
    return tally, rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--section", default="soak")
    args = ap.parse_args()
    server_args = ["--max-client-streams", "0"] + (["--model", args.model] if args.model else [])
    srv = ServerProcess(*server_args).wait_ready(timeout=600)
    started = machine()
    try:
        spk = httpx.get(f"{srv.base_url}/speakers").json()[0]["id"]
        tally, rss = asyncio.run(soak(srv, spk, args.minutes, args.clients))
        health = srv.wait_idle(timeout=30)
        time.sleep(2)  # the scheduler hands memory back once idle
        idle_rss = rss_mb(srv.proc.pid)
    finally:
        srv.stop()
    tenth = max(1, len(rss) // 10)
    medians = [
        statistics.median(mb for _, mb in rss[i : i + tenth]) for i in range(0, len(rss), tenth)
    ]
    warm, last = medians[1 if len(medians) > 1 else 0], medians[-1]
    growth = (last - warm) / warm * 100
    t, mb = zip(*rss[tenth:], strict=True) if len(rss) > tenth + 1 else zip(*rss, strict=True)
    fit = statistics.linear_regression(t, mb)
    fitted = fit.intercept + fit.slope * t[0]
    trend = fit.slope * (t[-1] - t[0]) / fitted * 100
    series = ", ".join(f"{m:.0f}" for m in medians)
    errors = {k: n for k, n in tally.items() if k[1] != "ok"}
    sessions = sum(tally.values())
    rows = "\n".join(
        f"| {kind} | {outcome} | {n} |" for (kind, outcome), n in sorted(tally.items())
    )
    body = f"""## Soak ({args.minutes:g} min, {args.clients} clients)

Command: `uv run --extra voice python bench/soak.py --minutes {args.minutes:g} --clients {args.clients}`
(commit {git_rev()}). Machine: {started}.
Mixed sessions, chosen at random by each client back to back: whole HTTP requests (PCM stream,
MP3, OpenAI pcm), HTTP streams abandoned after their first bytes, WebSocket contexts fed word
by word then closed, cancelled mid-way, or dropped with the socket.

- sessions: {sessions}; errors: {sum(errors.values())}
- after the load: active {health["active"]}, queued {health["queued"]} (leaked jobs: {health["active"] + health["queued"]});
  completed {health["completed"]}, cancelled {health["cancelled"]}, failed {health["failed"]},
  dropped {health["dropped"]}, rejected {health["rejected"]}, {health["audio_s"]:.0f} s of audio
- RSS under load: a line fitted through every sample after warm-up (the first tenth)
  climbs {fit.slope * 3600:+.1f} MB an hour, {trend:+.1f}% of its {fitted:.0f} MB over the run.
  Medians of a tenth of the run: {warm:.0f} MB after warm-up, {last:.0f} MB at the end
  ({growth:+.1f}%), peak {max(m for _, m in rss):.0f} MB; every tenth, MB: {series}.
  At start (idle) {rss[0][1]:.0f} MB; once idle again after the load {idle_rss:.0f} MB.

| session | outcome | count |
| --- | --- | --- |
{rows}
"""
    write_section(args.section, body)


if __name__ == "__main__":
    main()
