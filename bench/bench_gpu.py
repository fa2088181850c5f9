"""The GPU benchmark, one command (`just bench-gpu`), at most ~8 minutes on one GPU.

    uv run --extra voice python bench/bench_gpu.py [--model DIR] [--tokens 150]

1. builds (or reuses) the full-size random-weight CosyVoice2 dir (`bench/make_full_model.py`);
2. runs the golden parity tests on CUDA in float32 (`COSYVOICE_TEST_DEVICE=cuda`);
3. for float32 and bfloat16: starts a server on CUDA with the LLM forced to `--tokens` tokens per
   request, measures TTFA p50/p95 of streaming `/tts/pcm` requests sent at once at concurrency
   1, 16 and 64, then raises the concurrency until a stream underruns (a listener starting at
   its first byte would run out of audio): the largest level with none is the real-time
   capacity;
4. writes the `gpu` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import httpx
from http_load import one
from report import ROOT, git_rev, pct, write_section
from serverproc import ServerProcess

TEXT = "Hello there, this is a benchmark sentence for the graphics card."
LEVELS = (1, 16, 64)
CAPACITY = (32, 48, 64, 96, 128, 192, 256)


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


async def burst(base: str, spk: str, rate: int, n: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        return await asyncio.gather(
            *(
                one(client, "/tts/pcm", spk, rate, tts_text=TEXT, stream=True, seed=k + 1)
                for k in range(n)
            )
        )


def measure(model: str, dtype: str, tokens: int) -> tuple[list[str], int]:
    srv = ServerProcess(
        "--model", model, "--device", "cuda", "--dtype", dtype, "--llm-fixed-tokens",
        str(tokens), "--max-streams", str(max(CAPACITY)), "--max-queue", "0",
        "--max-client-streams", "0", "--speaker-dir", str(ROOT / "bench" / "out" / "speakers"),
    ).wait_ready(timeout=600)  # fmt: skip
    rows, capacity = [], 0
    try:
        spk = httpx.get(f"{srv.base_url}/speakers").json()[0]
        asyncio.run(burst(srv.base_url, spk["id"], spk["sample_rate"], 2))  # warm caches
        for n in sorted({*LEVELS, *CAPACITY}):
            if n not in LEVELS and capacity < n // 2:
                continue  # already past capacity: skip the larger capacity levels
            res = asyncio.run(burst(srv.base_url, spk["id"], spk["sample_rate"], n))
            ttfa = [r["ttfa"] * 1000 for r in res]
            under = sum(r["underruns"] > 0 for r in res)
            if under == 0:
                capacity = max(capacity, n)
            rows.append(
                f"| {dtype} | {n} | {pct(ttfa, 50):.0f} | {pct(ttfa, 95):.0f} | "
                f"{max(r['rtf'] for r in res):.2f} | {under} |"
            )
            print(rows[-1], flush=True)
    finally:
        srv.stop()
    return rows, capacity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--skip-parity", action="store_true")
    args = ap.parse_args()
    t0 = time.monotonic()
    if not os.path.isdir(args.model):
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_full_model.py"),
                        "--out", args.model], check=True)  # fmt: skip
    parity = "skipped"
    if not args.skip_parity:
        env = {**os.environ, "COSYVOICE_TEST_DEVICE": "cuda"}
        tests = ["tests/golden/test_e2e.py", "tests/golden/test_utterance.py"]
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests], cwd=ROOT, env=env,
                           capture_output=True, text=True)  # fmt: skip
        parity = (r.stdout.strip().splitlines() or ["no output"])[-1]
        print("parity:", parity, flush=True)
    rows, caps = [], {}
    for dtype in ("float32", "bfloat16"):
        r, caps[dtype] = measure(args.model, dtype, args.tokens)
        rows += r
    body = f"""## GPU: CosyVoice2 full size on {gpu_name()}

Command: `just bench-gpu` (`uv run --extra voice python bench/bench_gpu.py --tokens {args.tokens}`),
commit {git_rev()}, {time.monotonic() - t0:.0f} s in all. Model: `bench/make_full_model.py` output
(random weights), LLM forced to {args.tokens} tokens ({args.tokens / 25:.0f} s of audio) per
request, streaming `/tts/pcm`, N requests sent at once. Golden parity on CUDA, float32: {parity}.
Real-time capacity (largest N with no stream underrunning): float32 {caps["float32"]},
bfloat16 {caps["bfloat16"]}.

| dtype | N | TTFA p50 ms | TTFA p95 ms | slowest delivery RTF | streams that underran |
| --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows)
    write_section("gpu", body)


if __name__ == "__main__":
    main()
