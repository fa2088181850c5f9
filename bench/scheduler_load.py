"""Batched scheduler vs serial baseline on a full-size CosyVoice2 dir, in one run.

    uv run python bench/make_full_model.py            # once: bench/out/CosyVoice2-0.5B
    uv run python bench/scheduler_load.py [--model DIR] [--tokens 50] [--concurrency 1 2 4 8]

The LLM is forced to emit exactly `--tokens` speech tokens per request (random weights never
choose EOS sensibly), so every run does the same work. For each scheduler mode a server is
started; at each concurrency N, N clients send streaming /tts/pcm requests at the same moment
(`--rounds` times). Reported: time to first audio byte p50/p95 and aggregate audio seconds
produced per wall second, and the batched/serial ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from report import ROOT, command, cpu_name, git_rev, machine, pct, write_section
from serverproc import ServerProcess, faults_sys, kernel_since

TEXT = "Hello there, this is a benchmark sentence."


async def one(client: httpx.AsyncClient, spk: str, seed: int) -> tuple[float, float]:
    t0 = time.monotonic()
    first = None
    n = 0
    body = {"tts_text": TEXT, "spk_id": spk, "stream": True, "seed": seed}
    async with client.stream("POST", "/tts/pcm", json=body) as r:
        r.raise_for_status()
        async for piece in r.aiter_raw():
            first = first or time.monotonic()
            n += len(piece)
    return (first or time.monotonic()) - t0, n / 2 / 24000


async def level(base: str, spk: str, n: int, rounds: int) -> tuple[list[float], float, float]:
    ttfa: list[float] = []
    audio = 0.0
    async with httpx.AsyncClient(base_url=base, timeout=3600) as client:
        t0 = time.monotonic()
        for r in range(rounds):
            res = await asyncio.gather(*(one(client, spk, 1000 * r + k + 1) for k in range(n)))
            ttfa += [t for t, _ in res]
            audio += sum(a for _, a in res)
        wall = time.monotonic() - t0
    return ttfa, audio, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup-rounds", type=int, default=0,
                    help="unmeasured rounds before each level's (a server in steady use)")  # fmt: skip
    ap.add_argument("--section", default="scheduler_load")
    args = ap.parse_args()
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    kernel: dict[tuple[str, int], tuple[float, float]] = {}  # the server's sys s, M page faults
    for mode in ("batch", "serial"):
        srv = ServerProcess(
            "--model", args.model, "--scheduler", mode, "--llm-fixed-tokens", str(args.tokens),
            "--max-streams", "64", "--max-client-streams", "0", "--device", args.device,
            "--dtype", args.dtype,
            "--speaker-dir", str(ROOT / "bench" / "out" / "speakers"),
        ).wait_ready(timeout=900)  # fmt: skip
        try:
            spk = httpx.get(f"{srv.base_url}/speakers").json()[0]["id"]
            for n in args.concurrency:
                if args.warmup_rounds:
                    asyncio.run(level(srv.base_url, spk, n, args.warmup_rounds))
                start = faults_sys(srv.proc.pid)
                ttfa, audio, wall = asyncio.run(level(srv.base_url, spk, n, args.rounds))
                results[(mode, n)] = (pct(ttfa, 50) * 1000, pct(ttfa, 95) * 1000, audio / wall)
                kernel[(mode, n)] = kernel_since(srv.proc.pid, start)
                print(mode, n, results[(mode, n)], kernel[(mode, n)], flush=True)
        finally:
            srv.stop()

    def kernel_cell(mode: str, n: int) -> str:
        sys_s, faults = kernel[(mode, n)]
        return f"{sys_s:.1f} / {faults:.2f}"

    rows = []
    for n in args.concurrency:
        b, s = results[("batch", n)], results[("serial", n)]
        rows.append(
            f"| {n} | {b[0]:.0f} | {b[1]:.0f} | {b[2]:.3f} | {s[0]:.0f} | {s[1]:.0f} | {s[2]:.3f} | "
            f"{b[2] / s[2]:.2f}x | {b[1] / s[1]:.2f} | {kernel_cell('batch', n)} | "
            f"{kernel_cell('serial', n)} |"
        )
    cpu = cpu_name()
    body = f"""## CosyVoice2 scheduler: batched vs serial ({args.tokens} tokens per stream, full-size random weights, {args.device} {args.dtype}; {cpu})

Command: `{command()}`
(commit {git_rev()}). Machine: {machine()}.
Model: `bench/make_full_model.py` output (CosyVoice2-0.5B sizes, random weights), LLM forced to
{args.tokens} tokens per request ({args.tokens / 25:.1f} s of audio), `stream=true`, N clients at once
({args.warmup_rounds} unmeasured round{"" if args.warmup_rounds == 1 else "s"} of them first).
TTFA: request -> first audio byte. Throughput: audio seconds per wall second, all clients.
Kernel: the server's system CPU seconds and millions of minor page faults over the measured rounds.

| N | batched TTFA p50 ms | p95 ms | audio s/s | serial TTFA p50 ms | p95 ms | audio s/s | throughput ratio | p95 TTFA ratio | batched kernel s / M faults | serial |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
