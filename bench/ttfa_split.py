"""Where first audio goes: N streams of the full-size model started at once, their time to first
audio with the vocoder thread on and off, then split by stage (each stage timed between device
synchronizations, so the stages add up on one thread), and the bare replay time of the decode
and flow graphs. For a GPU: `bench_gpu.py` measures, this says what to make faster.

    python bench/ttfa_split.py [--model DIR] [--dtype bfloat16] [--streams 1 16]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cosyvoice
from cosyvoice.utterance import Status

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Hello there, this is a benchmark sentence for the graphics card."
TOKENS = 150


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_audio(model, n: int, seed: int = 1) -> tuple[list[float], int]:
    """Milliseconds from start to each of ``n`` utterances' first audio, and the steps run."""
    spk = model.speakers.list()[0]
    utts = [model.start(spk, seed=seed + k, fixed_tokens=TOKENS) for k in range(n)]
    for u in utts:
        model.add_text(u, TEXT)
        model.close_text(u)
    t0, got, steps = time.perf_counter(), {}, 0
    while len(got) < n and steps < 4 * TOKENS:
        for o in model.step([u for u in utts if u.status is not Status.FINISHED]):
            if o.audio.numel():
                got.setdefault(id(o.utterance), 1000 * (time.perf_counter() - t0))
        steps += 1
    for u in utts:
        model.cancel(u)
    model.step([])  # collects what the vocoder thread still had
    while model.let_go():  # idle, as the server's scheduler tells it, a tick per graph
        pass
    return sorted(got.values()), steps


def graphs_now(model) -> str:
    flow = model.token2wav.flow
    if getattr(flow, "graphs", None) is None:
        return "no flow graphs"
    return f"flow graphs: {flow.graphs.captures} captured, {flow.calls.static_runs} runs"


def timing(table: dict[str, list[float]], obj, attr: str, label: str) -> None:
    """Wrap ``obj.attr`` to record its wall time between synchronizations under ``label``."""
    fn: Callable = getattr(obj, attr)

    @functools.wraps(fn)
    def timed(*a, **k):
        sync()
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sync()
            table.setdefault(label, []).append(1000 * (time.perf_counter() - t))

    setattr(obj, attr, timed)


def replay_ms(graph, reps: int = 50) -> float:
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    sync()
    return 1000 * (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    t = time.perf_counter()
    m = cosyvoice.load(args.model, dtype=args.dtype, use_wetext=False)
    print(f"loaded in {time.perf_counter() - t:.1f} s on {m.device}, {m.dtype}", flush=True)
    t = time.perf_counter()
    m.warmup()  # as the server does before it serves
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    print(graphs_now(m), "after warm-up", flush=True)
    first_audio(m, 1)  # the first of all pays for what warm-up left out
    for thread in (True, False):
        if not thread:
            m.close()  # the vocoder thread stops; the model goes on inline
        for n in args.streams:
            runs = [first_audio(m, n, seed=10 * r + 1) for r in range(args.rounds)]
            p50 = sorted(ms[len(ms) // 2] for ms, _ in runs)
            print(f"thread {'on' if thread else 'off'}, {n} streams: TTFA median per run "
                  f"{[round(x) for x in p50]} ms, {runs[0][1]} steps; {graphs_now(m)}",
                  flush=True)  # fmt: skip
    table: dict[str, list[float]] = {}
    llm, t2w = m.llm, m.token2wav
    flow = getattr(t2w.flow, "_flow", t2w.flow)
    for obj, attr, label in (
        (m, "step", "model.step"),
        (m, "_start", "start/text"),
        (llm, "step", "llm.step"),
        (llm.net, "forward_packed", "llm eager forward"),
        (llm, "_plan", "llm draw plan"),  # (the draw itself runs in the graph run's replay)
        (t2w, "step", "token2wav.step"),
        (flow, "_mel", "flow mel"),  # v2: encoder and Euler loop in one graph where it fits
        (flow, "encoded", "flow encoder eager"),  # (inside "flow mel" when it runs)
        (t2w.hift, "inference", "hift"),
    ):
        timing(table, obj, attr, label)
    if llm.graphs is not None:
        timing(table, llm.graphs, "run", "llm graph run")
        timing(table, llm.graphs, "run_prefill", "llm prefill graph")
    for n in args.streams:
        for r in range(args.rounds):
            table.clear()
            ms, steps = first_audio(m, n, seed=100 + r)
            print(f"split, {n} streams (synchronized): TTFA p50 {ms[len(ms) // 2]:.0f} ms, "
                  f"{steps} steps", flush=True)  # fmt: skip
        for label, v in table.items():
            s = sorted(v)
            print(f"  {label:18} {len(v):4} calls {sum(v):8.1f} ms  p50 {s[len(s) // 2]:6.2f}  "
                  f"max {s[-1]:7.2f}", flush=True)  # fmt: skip
    if llm.graphs is not None and llm.graphs.capture:
        for key in ((1, 8), (16, 8), (64, 8)):
            g = llm.graphs._graphs.get(key)
            if g is not None:
                print(f"decode graph {key} bare replay {replay_ms(g[0]):.3f} ms", flush=True)
    fg = getattr(flow, "graphs", None)
    for key, val in list(getattr(fg, "_graphs", {}).items())[:6]:
        graph = val[0] if isinstance(val, tuple) else val
        if isinstance(graph, torch.cuda.CUDAGraph):
            print(f"flow graph {key} bare replay {replay_ms(graph, 10):.3f} ms", flush=True)


def attention_us(b: int, t: int, kernel: str, reps: int = 24) -> float:
    """Microseconds per decode-step attention call (batch b, t keys, bf16, Qwen2-0.5B's 14 query
    and 2 KV heads), ``reps`` calls (a step's layers) replayed as one graph: SDPA's
    memory-efficient kernel, as the decode step runs it, or the CPU's two matmuls and float32
    softmax (whether one kernel with little parallelism at batch 1 beats five small ones)."""
    from cosyvoice.llm import qwen2
    from cosyvoice.llm.kv import additive_bias

    dev, g = "cuda", torch.Generator("cuda").manual_seed(0)
    q = torch.randn(b, 1, 14, 64, device=dev, generator=g).bfloat16()
    k, v = (torch.randn(b, t, 2, 64, device=dev, generator=g).bfloat16() for _ in range(2))
    ctx = torch.randint(t // 2, t + 1, (b,), device=dev, generator=g)
    bias = additive_bias((torch.arange(t, device=dev) < ctx[:, None, None])[:, None],
                         torch.bfloat16, 7)  # fmt: skip
    sdpa = qwen2._sdpa
    if kernel == "matmuls":
        qwen2._sdpa = qwen2._matmuls  # the GPU branch of attention() takes the CPU's kernel
    try:
        for _ in range(3):
            qwen2.attention(q, k, v, bias)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                qwen2.attention(q, k, v, bias)
    finally:
        qwen2._sdpa = sdpa
    return 1000 * replay_ms(graph, 20) / reps


def attention_ab() -> None:
    for b, t in ((1, 256), (16, 256), (64, 256), (16, 1024)):
        us = {kern: attention_us(b, t, kern) for kern in ("sdpa", "matmuls")}
        print(f"decode attention, batch {b}, {t} keys: " +
              ", ".join(f"{kern} {x:.1f} us" for kern, x in us.items()), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
    if torch.cuda.is_available():
        attention_ab()
