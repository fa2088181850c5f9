"""One hostile WebSocket against everyone else: a client that sends text one character per
message, as fast as the server takes it, on two contexts at once, while a well-behaved client
asks for one sentence at a time and `/healthz` is polled.

    uv run python bench/ws_flood.py [--pattern "Mr. "] [--seconds 20]

"Mr. " is the costly case for the built-in voice's sentence splitting (no period ends a
sentence, so every word after one is a question to pysbd). The flooder runs in its own process
(niced, as a client elsewhere would not share this machine's cores). Prints /healthz latency
and the good client's time to its last audio byte, p50 and max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import httpx
import websockets
from report import pct
from serverproc import ServerProcess

SPEAKER = "joe"


async def flood(url: str, pattern: str, seconds: float) -> None:
    text = (pattern * 5000)[:5000]
    sent, t0, turn = 0, time.monotonic(), 0
    end = "time up"
    try:
        async with websockets.connect(url, max_size=None) as ws:
            await ws.recv()  # ready
            reader = asyncio.create_task(_drain(ws))
            while time.monotonic() - t0 < seconds:
                ids, turn = [f"t{turn}c{k}" for k in range(2)], turn + 1
                for cid in ids:
                    start = {"type": "start", "context_id": cid, "spk_id": SPEAKER}
                    await ws.send(json.dumps(start))
                for ch in text:
                    for cid in ids:
                        await ws.send(json.dumps({"type": "text", "context_id": cid, "text": ch}))
                        sent += 1
                    if time.monotonic() - t0 > seconds:
                        break
                for cid in ids:
                    await ws.send(json.dumps({"type": "cancel", "context_id": cid}))
            reader.cancel()
    except websockets.ConnectionClosed as e:  # its own keepalive pings wait behind its flood
        end = f"closed: {e}"
    print(f"flooder: {sent} messages in {time.monotonic() - t0:.1f} s ({end})", flush=True)


async def _drain(ws) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:
            pass


async def good_client(url: str) -> float:
    t0 = time.monotonic()
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        start = {"type": "start", "context_id": "g", "spk_id": SPEAKER, "text": "Hello there."}
        await ws.send(json.dumps(start))
        await ws.send(json.dumps({"type": "close", "context_id": "g"}))
        async for m in ws:
            if isinstance(m, str) and json.loads(m)["type"] in ("done", "error"):
                return time.monotonic() - t0
    return float("nan")


async def measure(base: str, url: str, seconds: float) -> tuple[list[float], list[float]]:
    health, good = [], []
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        while time.monotonic() - t0 < seconds:
            t = time.monotonic()
            await client.get("/healthz")
            health.append(time.monotonic() - t)
            good.append(await good_client(url))
    return health, good


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pattern", default="Mr. ")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--flood", nargs=3, help=argparse.SUPPRESS)  # url pattern seconds
    args = ap.parse_args()
    if args.flood:
        asyncio.run(flood(args.flood[0], args.flood[1], float(args.flood[2])))
        return
    srv = ServerProcess().wait_ready(timeout=120)
    url = f"{srv.ws_url}/ws/tts"
    try:
        quiet = asyncio.run(measure(srv.base_url, url, 5))
        cmd = ["nice", "-n", "15", sys.executable, __file__, "--flood", url, args.pattern,
               str(args.seconds)]  # fmt: skip
        flooder = subprocess.Popen(cmd, env=os.environ)
        time.sleep(2)
        loud = asyncio.run(measure(srv.base_url, url, args.seconds - 4))
        flooder.wait()
    finally:
        srv.stop()
    print(
        "| | /healthz p50 ms | max ms | good client p50 ms | max ms |\n| --- | --- | --- | --- | --- |"
    )
    for name, (health, good) in (("quiet", quiet), (f"flood of {args.pattern!r}", loud)):
        h, g = [x * 1000 for x in health], [x * 1000 for x in good]
        print(f"| {name} | {pct(h, 50):.0f} | {max(h):.0f} | {pct(g, 50):.0f} | {max(g):.0f} |")


if __name__ == "__main__":
    main()
