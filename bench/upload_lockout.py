"""Upload places under addresses that refill the line: does another client still get in?

    git worktree add /tmp/base COMMIT
    uv run --extra voice python bench/upload_lockout.py /tmp/base . [--addresses 4 16]

For each checkout, a server (the built-in voice, this virtualenv) is started from it; attackers
on loopback addresses 127.0.0.2... open registrations that send their headers and no body,
each sent again the moment it is answered (503 at a full line, 408 when cut as too slow);
meanwhile another client, in a process of its own (127.0.0.200), registers a 3 s WAV once a
second. The built-in voice reads the upload, then refuses the registration (400): a 400 is
an upload that got its place. Prints, per checkout and attacker count, how many of the
client's uploads were read and how long they waited.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import time
import wave

import httpx
import report  # noqa: F401  (puts tests/ on the path)
from serverproc import ServerProcess

LEGIT = "127.0.0.200"
QUIET = {"RTSERVER_LOG_LEVEL": "warning"}  # the log's cost is no part of what is measured
HEAD = (
    b"POST /speakers HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n"
    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
)


async def attacker(port: int, source: str, stop: asyncio.Event) -> None:
    """One connection at a time from `source`: headers only, again as soon as answered."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.write(HEAD)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(reader.read(256), 0.2)
                    break  # answered (or closed): send another
                except TimeoutError:
                    continue
        finally:
            writer.close()
        await asyncio.sleep(0.005)


async def attack(port: int, addresses: int, per: int, seconds: float) -> None:
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(attacker(port, f"127.0.0.{2 + a}", stop))
        for a in range(addresses)
        for _ in range(per)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)


def wav_3s() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(bytes(2 * 16000 * 3))
    return out.getvalue()


def legit(port: int, seconds: float) -> list[tuple[int, float]]:
    """The other client: (status, seconds waited) of each registration."""
    files = {"prompt_wav": ("p.wav", wav_3s(), "audio/wav")}
    transport = httpx.HTTPTransport(local_address=LEGIT)
    time.sleep(3)  # the attackers fill the places and the line first
    got, end = [], time.monotonic() + seconds
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", transport=transport, timeout=30) as c:
        while time.monotonic() < end:
            began = time.monotonic()
            r = c.post("/speakers", data={"spk_id": "x", "prompt_text": "Hi."}, files=files,
                       headers={"connection": "close"})  # fmt: skip
            got.append((r.status_code, time.monotonic() - began))
            time.sleep(1)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="checkouts to compare (each serves from its folder)")
    ap.add_argument("--addresses", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--per-address", type=int, default=2, help="attacker connections each")
    ap.add_argument("--seconds", type=float, default=40)
    args = ap.parse_args()
    for n in args.addresses:
        for root in args.roots:
            srv = ServerProcess("--no-warmup", cwd=root, env=QUIET).wait_ready()
            port = srv.port
            try:
                child = subprocess.Popen(
                    [sys.executable, __file__, "--legit", str(port), str(args.seconds - 5)],
                    stdout=subprocess.PIPE, text=True,
                )  # fmt: skip
                asyncio.run(attack(port, n, args.per_address, args.seconds))
                got = [line.split() for line in child.communicate()[0].splitlines()]
            finally:
                srv.stop()
            read = [float(w) for s, w in got if s == "400"]
            waits = f"median {statistics.median(read):.1f} s, max {max(read):.1f} s" if read else ""
            print(f"{root}: {n} addresses x {args.per_address}: {len(read)} of {len(got)} "
                  f"uploads read {waits}", flush=True)  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--legit"]:  # the other client's process
        for status, waited in legit(int(sys.argv[2]), float(sys.argv[3])):
            print(status, f"{waited:.2f}")
    else:
        main()
