"""What the server path costs over the same model in-process, one stream, side by side.

    uv run python bench/make_full_model.py              # once: bench/out/CosyVoice2-0.5B
    uv run --extra voice python bench/server_overhead.py [--tokens 150] [--rounds 3] [--dtype bfloat16]

In-process: ``cosyvoice.tts.synthesize`` (stream, LLM forced to ``--tokens`` tokens). Server:
one streaming ``POST /tts/pcm`` with the same text, seed and token count. Both report first
audio, whole-request RTF (wall / audio) and cores busy (process CPU time / wall; the server's
from /proc). Rounds alternate between the two so drift in the machine's load hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import httpx
from http_load import one
from report import ROOT, command, cpu_name, git_rev, machine, pct, write_section
from serverproc import ServerProcess, cpu_s, faults_sys, kernel_since

TEXT = "Hello there, this is a benchmark sentence."


def in_process(model, spk: str, tokens: int, seed: int) -> dict:
    from cosyvoice.tts import synthesize

    t0, c0, start = time.monotonic(), time.process_time(), faults_sys(os.getpid())
    first, samples = None, 0
    for chunk in synthesize(model, TEXT, spk, stream=True, seed=seed, fixed_tokens=tokens):
        first = first or time.monotonic()
        samples += chunk.numel()
    wall = time.monotonic() - t0
    cores = (time.process_time() - c0) / wall
    return row(first - t0, wall / (samples / model.sample_rate), cores, os.getpid(), start)


def through_server(srv: ServerProcess, spk: str, rate: int, seed: int) -> dict:
    async def go() -> dict:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=3600) as client:
            return await one(client, "/tts/pcm", spk, rate, tts_text=TEXT, stream=True, seed=seed)

    pid = srv.proc.pid
    t0, c0, start = time.monotonic(), cpu_s(pid), faults_sys(pid)
    r = asyncio.run(go())
    cores = (cpu_s(pid) - c0) / (time.monotonic() - t0)
    return row(r["ttfa"], r["wall_rtf"], cores, pid, start)


def row(ttfa: float, rtf: float, cores: float, pid: int, start: tuple[int, float]) -> dict:
    """One round of a path; the kernel's part read from ``pid`` since ``start``."""
    sys_s, mflt = kernel_since(pid, start)
    return {"ttfa": ttfa, "rtf": rtf, "cores": cores, "sys": sys_s, "mflt": mflt}


def main() -> None:
    import cosyvoice

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--section", default="server_overhead")
    args = ap.parse_args()
    spk_dir = ROOT / "bench" / "out" / "speakers"
    model = cosyvoice.load(args.model, device="cpu", dtype=args.dtype, speaker_dir=spk_dir)
    model.warmup()
    srv = ServerProcess(
        "--model", args.model, "--device", "cpu", "--dtype", args.dtype, "--llm-fixed-tokens",
        str(args.tokens), "--speaker-dir", str(spk_dir),
    ).wait_ready(timeout=900)  # fmt: skip
    res: dict[str, list[dict]] = {"in-process": [], "server": []}
    try:
        spk = httpx.get(f"{srv.base_url}/speakers").json()[0]
        for r in range(args.rounds):
            res["in-process"].append(in_process(model, spk["id"], args.tokens, r + 1))
            res["server"].append(through_server(srv, spk["id"], spk["sample_rate"], r + 1))
            print({k: v[-1] for k, v in res.items()}, flush=True)
    finally:
        srv.stop()
    rows = []
    for name, rs in res.items():
        med = {k: pct([r[k] for r in rs], 50) for k in ("ttfa", "rtf", "cores", "sys", "mflt")}
        rows.append(
            f"| {name} | {med['ttfa']:.2f} | {med['rtf']:.2f} | {med['cores']:.2f} "
            f"| {med['sys']:.1f} / {med['mflt']:.2f} |"
        )
    ratio = pct([r["rtf"] for r in res["server"]], 50) / pct(
        [r["rtf"] for r in res["in-process"]], 50
    )
    cpu = cpu_name()
    body = f"""## Server path vs in-process, one stream (CosyVoice2 full size, random weights, CPU {str(model.dtype).removeprefix("torch.")}; {cpu})

Command: `{command("uv run --extra voice python")}`
(commit {git_rev()}). Machine: {machine()}. LLM forced to {args.tokens} tokens
({args.tokens / 25:.0f} s of audio), `stream=true`; medians of {args.rounds} alternating rounds.
Server RTF / in-process RTF: **{ratio:.2f}**.

Kernel: the process's system CPU seconds and millions of minor page faults per request.

| path | first audio s | whole-request RTF | cores busy | kernel s / M faults |
| --- | --- | --- | --- | --- |
""" + "\n".join(rows)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
