"""Benchmark the CosyVoice2 token2wav half (flow + HiFT) on this machine.

Measures, with random speech tokens (all available at once, so only token2wav is timed):
* single request, non-stream and stream: time to first chunk (TTFC), total wall time, RTF
  (wall / audio duration);
* flow+HiFT throughput of ``Token2Wav.step`` for batch 1/4/8, where every item produces one
  streaming chunk (first hop: 25+3 tokens -> 0.84 s of audio; second hop: 50 tokens -> 2 s).

    uv run python bench/bench_token2wav.py [--model bench/out/CosyVoice2-0.5B] [--tokens 100]
        [--batches 1,4,8] [--threads 2] [--repeat 2] [--device cpu] [--json out.json]

Long-utterance mode (``--long SECONDS``): one stream of SECONDS of audio, the wall time of every
chunk in order, streaming over the flow cache vs recomputing every chunk (upstream's way, also
its full-attention final chunk) vs non-stream, side by side; ``--long-concurrency N`` adds N such
streams stepped together (one batched flow call per step) in each mode:

    uv run python bench/bench_token2wav.py --long 30 --long-concurrency 8 --long-concurrency-seconds 8

``--count-ops``: instead of timing, the torch ops one batched step dispatches (on a GPU about
its kernel launches), per batch size and hop.

``--pack-ab``: instead, each batched step with the flow's linears as loaded (torch's kernels) and
packed for oneDNN (what ``cosyvoice.load`` does on a CPU in float32), in one process, alternating;
medians of ``--repeat`` rounds:

    uv run python bench/bench_token2wav.py --pack-ab --batches 1,4 --repeat 5

Each number is the best of ``--repeat`` runs (the dev box is shared; see docs/benchmarks.md).

``--model`` is a full-size random-weight dir from ``bench/make_full_model.py``; without one the
full-size modules are built in memory with random weights (same shapes, same compute).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cosyvoice.devices import can_pack_linears, pack_linears  # noqa: E402
from cosyvoice.flow import FlowConfig, build_flow, load_flow  # noqa: E402
from cosyvoice.hift import HiFTConfig, build_hift, load_hift  # noqa: E402
from cosyvoice.token2wav import Token2Wav  # noqa: E402


def load(model: Path | None, device: str) -> Token2Wav:
    if model is not None and (model / "flow.pt").is_file():
        return Token2Wav(load_flow(model, device=device), load_hift(model, device=device))
    torch.manual_seed(0)
    flow = build_flow(FlowConfig()).to(device)
    hift = build_hift(HiFTConfig()).fold_weight_norm().to(device)
    return Token2Wav(flow, hift)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def single(t2w: Token2Wav, toks: list[int], emb, stream: bool, device: str) -> dict:
    st = t2w.new_state(emb, stream=stream, seed=1)
    t0 = time.perf_counter()
    ttfc, n, chunks = None, 0, 0
    while not st.done:
        (c,) = t2w.step([(st, toks if n == 0 and chunks == 0 else [], True)])
        sync(device)
        if c is not None:
            if ttfc is None:
                ttfc = time.perf_counter() - t0
            n += c.numel()
            chunks += 1
    wall = time.perf_counter() - t0
    audio = n / t2w.sample_rate
    return {"stream": stream, "tokens": len(toks), "audio_s": round(audio, 3), "chunks": chunks,
            "ttfc_s": round(ttfc, 3), "wall_s": round(wall, 3), "rtf": round(wall / audio, 3)}  # fmt: skip


def _items(t2w: Token2Wav, b: int, hop: str, emb, vocab: int) -> list:
    """``b`` streams' items for one step of the given hop (an earlier hop runs here, untimed)."""
    g = torch.Generator().manual_seed(b)
    sts = [t2w.new_state(emb, stream=True, seed=i + 1) for i in range(b)]
    toks = [torch.randint(0, vocab, (80,), generator=g).tolist() for _ in range(b)]
    if hop == "second":  # consume the first hop outside the timing
        t2w.step([(s, t[:28], False) for s, t in zip(sts, toks, strict=True)])
        return [(s, t[28:78], False) for s, t in zip(sts, toks, strict=True)]
    return [(s, t[:28], False) for s, t in zip(sts, toks, strict=True)]


def batch_step(t2w: Token2Wav, b: int, hop: str, emb, device: str, vocab: int) -> dict:
    items = _items(t2w, b, hop, emb, vocab)
    sync(device)
    t0 = time.perf_counter()
    out = t2w.step(items)
    sync(device)
    wall = time.perf_counter() - t0
    audio = sum(c.numel() for c in out) / t2w.sample_rate
    return {"batch": b, "hop": hop, "wall_s": round(wall, 3), "audio_s": round(audio, 3),
            "audio_s_per_s": round(audio / wall, 3)}  # fmt: skip


def pack_ab(a, plain: Token2Wav, emb, vocab: int) -> list[dict]:
    """Batched steps over the flow's torch linears and over a second copy packed for oneDNN,
    alternating per round; the medians of ``--repeat`` rounds."""
    if not can_pack_linears(torch.device(a.device), torch.float32):
        raise SystemExit("--pack-ab: packed linears need an x86 CPU with oneDNN")
    flow = load(a.model, a.device).flow
    pack_linears(flow)
    packed, rows = Token2Wav(flow, plain.hift), []
    batch_step(packed, 1, "first", emb, a.device, vocab)  # warm-up, as the plain one had
    for hop in a.hops.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            walls: dict[str, list[float]] = {"torch": [], "packed": []}
            for _ in range(a.repeat):
                for name, t2w in (("torch", plain), ("packed", packed)):
                    walls[name].append(batch_step(t2w, b, hop, emb, a.device, vocab)["wall_s"])
            med = {k: statistics.median(v) for k, v in walls.items()}
            rows.append({"batch": b, "hop": hop, "torch_s": med["torch"],
                         "packed_s": med["packed"], "ratio": round(med["torch"] / med["packed"], 3),
                         "rounds": walls})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = self.in_loop = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def step_ops(t2w: Token2Wav, b: int, hop: str, emb, vocab: int) -> dict:
    """Torch ops dispatched by one step of ``b`` streams (on a GPU, roughly its kernel launches:
    what a step costs before any arithmetic). Untimed: counting slows every op."""
    items = _items(t2w, b, hop, emb, vocab)
    graphs = t2w.flow.graphs
    with _CountOps() as c:
        if graphs is None:
            t2w.step(items)
        else:  # what a captured graph replays in one launch: the static Euler loop
            loop = graphs._forward

            def counted(*key):
                n = c.n
                out = loop(*key)
                c.in_loop += c.n - n
                return out

            graphs._forward = counted
            try:
                t2w.step(items)
            finally:
                del graphs._forward
    res = {"batch": b, "hop": hop, "ops": c.n}
    if graphs is not None:
        res["in_graph"] = c.in_loop
    return res


LONG_MODES = {  # name -> (Token2Wav options, stream)
    "cached": ({"flow_cache_mb": 1e9}, True),
    "recompute": ({"flow_cache_mb": 0, "exact_final": True}, True),
    "non-stream": ({}, False),
}


def long_run(t2w: Token2Wav, toks: list[int], embs: list, stream: bool, device: str) -> dict:
    """All tokens at once for len(embs) streams stepped together; per step: wall time and new
    tokens of stream 0 (its chunk schedule)."""
    sts = [t2w.new_state(e, stream=stream, seed=i + 1) for i, e in enumerate(embs)]
    items = [(s, toks, True) for s in sts]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # first touches of fresh memory
    chunks, n, t0 = [], 0, time.perf_counter()
    while not all(s.done for s in sts):
        off, t1 = sts[0].token_offset, time.perf_counter()
        out = t2w.step([it for it in items if not it[0].done])
        sync(device)
        items = [(s, [], True) for s in sts]
        n += sum(c.numel() for c in out if c is not None)
        new = (sts[0].token_offset if not sts[0].done else len(toks)) - off
        chunks.append({"tokens": new, "ms": round(1000 * (time.perf_counter() - t1))})
    wall = time.perf_counter() - t0
    audio = n / t2w.sample_rate
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"streams": len(embs), "audio_s": round(audio, 2), "wall_s": round(wall, 2),
            "rtf": round(wall / audio, 3), "minor_faults": faults, "chunks": chunks}  # fmt: skip


def long_mode(t2w: Token2Wav, a, device: str) -> dict:
    """``--long``: one long stream per mode; ``--long-concurrency``: N shorter ones together."""
    vocab, g = t2w.flow.cfg.vocab_size, torch.Generator().manual_seed(2)
    out = {}
    runs = ((1, a.long, a.long_modes), (a.long_concurrency, a.long_concurrency_seconds, a.modes))
    for c, seconds, modes in runs:
        if c < 1 or seconds <= 0:
            continue
        toks = torch.randint(0, vocab, (int(seconds * 25),), generator=g).tolist()
        embs = [torch.randn(192, generator=g) for _ in range(c)]
        for name in modes.split(","):
            opts, stream = LONG_MODES[name]
            t = Token2Wav(t2w.flow, t2w.hift, **opts)
            r = long_run(t, toks, embs, stream, device)
            r["mode"] = name
            print(json.dumps(r), flush=True)
            out[f"c{c}_{name}"] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=REPO / "bench/out/CosyVoice2-0.5B")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--hops", default="first,second")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--long", type=float, default=0, help="seconds of one long stream (mode)")
    ap.add_argument("--long-concurrency", type=int, default=0)
    ap.add_argument("--long-concurrency-seconds", type=float, default=8)
    ap.add_argument("--long-modes", default=",".join(LONG_MODES), help="modes of the long stream")
    ap.add_argument("--modes", default=",".join(LONG_MODES), help="modes of the concurrent run")
    ap.add_argument("--count-ops", action="store_true", help="ops per batched step, no timing")
    ap.add_argument("--graphs", action="store_true", help="flow graphs on (eager on a CPU)")
    ap.add_argument("--pack-ab", action="store_true", help="flow linears: torch's vs packed")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    t2w = load(a.model, a.device)
    if a.graphs:
        t2w.flow.enable_graphs(max_batch=64)
    load_s = time.perf_counter() - t0
    vocab = t2w.flow.cfg.vocab_size
    emb = torch.randn(192, generator=torch.Generator().manual_seed(0))
    toks = torch.randint(0, vocab, (a.tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    # warm-up (allocator, kernels)
    t2w.step([(t2w.new_state(emb, stream=True), toks[:28], False)])
    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": a.threads,
            "device": a.device,
            "torch": torch.__version__,
            "load_avg_start": os.getloadavg(),
        },  # fmt: skip
        "model": str(a.model) if (a.model / "flow.pt").is_file() else "in-memory random full size",
        "load_s": round(load_s, 2),
        "single": [],
        "batch": [],
    }
    if a.device.startswith("cuda"):
        res["machine"]["gpu"] = torch.cuda.get_device_name()
    if a.long or a.long_concurrency:
        res["long"] = long_mode(t2w, a, a.device)
        return report(res, a.json)

    if a.count_ops:
        # steady state: grow the flow pool for twice the streams, then keep it from shrinking
        warm = _items(t2w, 2 * max(int(x) for x in a.batches.split(",")), "second", emb, vocab)
        t2w.step(warm)
        del warm[1:]
        res["ops"] = [step_ops(t2w, int(b), h, emb, vocab)
                      for h in a.hops.split(",") for b in a.batches.split(",")]  # fmt: skip
        print(json.dumps(res["ops"]))
        return

    if a.pack_ab:
        res["pack_ab"] = pack_ab(a, t2w, emb, vocab)
        return report(res, a.json)

    def best(fn, key):  # best of --repeat windows: the box may be shared (see docs)
        runs = [fn() for _ in range(a.repeat)]
        return min(runs, key=lambda r: r[key])

    for stream in (False, True):
        r = best(lambda s=stream: single(t2w, toks, emb, s, a.device), "wall_s")
        print(json.dumps(r), flush=True)
        res["single"].append(r)
    for hop in a.hops.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            r = best(lambda b=b, h=hop: batch_step(t2w, b, h, emb, a.device, vocab), "wall_s")
            print(json.dumps(r), flush=True)
            res["batch"].append(r)
    report(res, a.json)


def report(res: dict, path: Path | None) -> None:
    """The run's end: the load then, the machine line printed, everything to ``path`` if given."""
    res["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(res["machine"]))
    if path:
        path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
