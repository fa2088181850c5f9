"""CosyVoice2 streams through the server, side by side for several checkouts.

    git worktree add /tmp/base COMMIT
    uv run python bench/checkout_load.py /tmp/base . --concurrency 8 --tokens 150 --dtype bfloat16

For each round, each checkout in turn starts a server (with this virtualenv) on the full-size
random-weight dir, serves N `/tts/pcm` streams at once (the LLM forced to the same tokens), and
stops: prints wall time, audio seconds per wall second, TTFA p50/p95, and the server's peak
and its RSS once idle for IDLE_S. Rounds alternate the checkouts, so a change in the machine's speed hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
from report import ROOT, machine, pct
from scheduler_load import level
from serverproc import ServerProcess

IDLE_S = 3.0  # after the streams, for the server's idle hand-back (a second after it idles)


def memory_gb(pid: int) -> tuple[float, float]:
    """The process's peak and current resident memory (VmHWM, VmRSS)."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 2**20 for k in ("VmHWM", "VmRSS"))  # type: ignore[return-value]


def one_run(root: str, args: argparse.Namespace) -> str:
    srv = ServerProcess(
        "--model", args.model, "--llm-fixed-tokens", str(args.tokens), "--max-streams", "64",
        "--max-client-streams", "0", "--dtype", args.dtype,
        "--speaker-dir", str(ROOT / "bench" / "out" / "speakers"), cwd=root,
    ).wait_ready(timeout=900)  # fmt: skip
    try:
        spk = httpx.get(f"{srv.base_url}/speakers").json()[0]["id"]
        ttfa, audio, wall = asyncio.run(level(srv.base_url, spk, args.concurrency, 1))
        time.sleep(IDLE_S)
        peak, now = memory_gb(srv.proc.pid)
    finally:
        srv.stop()
    return (
        f"| {root} | {wall:.1f} | {audio / wall:.3f} | {pct(ttfa, 50):.2f} | {pct(ttfa, 95):.2f} "
        f"| {peak:.2f} | {now:.2f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="checkouts to compare (each serves from its folder)")
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    print(f"{machine()}; {args.concurrency} streams of {args.tokens} tokens, {args.dtype}")
    print("| checkout | wall s | audio s/s | TTFA p50 s | p95 s | peak RSS GB | idle RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for _ in range(args.rounds):
        for root in args.roots:
            print(one_run(root, args), flush=True)


if __name__ == "__main__":
    main()
