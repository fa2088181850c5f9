"""LLM decode throughput: decode steps/second at batch 1, 4, 16 on the full-size model.

    uv run python bench/make_full_model.py        # once: writes bench/out/CosyVoice2-0.5B
    uv run python bench/bench_llm.py [--model-dir DIR] [--batches 1 4 16] [--steps 20]
    uv run python bench/bench_llm.py --sampling [--bf16-logits] [--batches 1 16 64] [--against F]
    uv run python bench/bench_llm.py --pack-ab [--pack-rows 1 64] [--batches 1 4 16 64] [--repeat 3]

``--sampling``: only the draw of a decode step (RAS over the model's speech vocabulary, each
request's own seed), from logits on the model's device to tokens on the host; ``--against
FILE`` times another version's ``sampling.py`` alongside (``git show
REV:cosyvoice/llm/sampling.py > FILE``). On a GPU the draw runs inside a replayed decode step;
what is timed here is the same ops launched eagerly.

``--static``: decode steps through ``enable_graphs`` (replayed CUDA graphs on a GPU; on a CPU
the same static steps run eagerly), what the server runs on a GPU; the last column is a step's
time outside the static forward and draw: on a CPU the host's part of a replayed step (packing,
the draw's rows, the copies, the tokens' bookkeeping), which a GPU's replays wait on.

``--pack-ab``: the same decode steps with torch's linears (MKL) and with the weights packed once
for oneDNN (``cosyvoice.load(packed=...)``, the CPU default), each layout of ``--pack-rows`` (the
row count oneDNN lays the weight out for; ``devices.PACK_ROWS`` by default) a model of its own, in
one process, alternating per window; medians of ``--repeat`` windows of ``--steps`` steps each.

Each batch holds requests of different text lengths (ragged prefill), all prefilled in one
step; then ``--steps`` timed decode steps after ``--warmup`` untimed ones. Stop tokens are
disabled (min_len = max_len) so every request decodes every step. Reports steps/s (one new
token for every request per step; best of ``--repeat`` windows, the machine may be shared),
tokens/s, the median window and the prefill time.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import cpu_name  # noqa: E402

import cosyvoice  # noqa: E402
from cosyvoice.devices import PACK_ROWS, can_pack_linears, pack_linears  # noqa: E402
from cosyvoice.llm.engine import LLMRequest  # noqa: E402


def run_batch(
    m, batch: int, steps: int, warmup: int, seed: int, repeat: int, context: int = 20
) -> dict:
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(batch):
        n_text = context + 7 * i % 40  # different lengths
        ids = torch.randint(0, 1000, (n_text,), generator=g).tolist()
        n = (steps * repeat) + warmup + 1
        reqs.append(LLMRequest(text_ids=ids, seed=seed + i, min_len=n, max_len=n + 1))
    t0 = time.perf_counter()
    m.llm.prefill(reqs)
    t_prefill = time.perf_counter() - t0
    for _ in range(warmup):
        m.llm.decode(reqs)
    times, replayed = [], _ReplayClock.on(m.llm.graphs)
    for _ in range(repeat):  # the machine is shared: keep the best of several windows
        t0, r0 = time.perf_counter(), replayed.s
        for _ in range(steps):
            m.llm.decode(reqs)
        times.append((time.perf_counter() - t0, replayed.s - r0))
    assert all(not r.done for r in reqs)
    dt, in_static = min(times)
    return {
        "host_ms_per_step": 1000 * (dt - in_static) / steps,
        "batch": batch,
        "steps_per_s": steps / dt,
        "tokens_per_s": steps * batch / dt,
        "ms_per_step": 1000 * dt / steps,
        "ms_per_step_median": 1000 * sorted(times)[len(times) // 2][0] / steps,
        "prefill_s": t_prefill,
        "prefill_tokens": sum(len(r.text_ids) + 2 for r in reqs),
    }


class _ReplayClock:
    """Seconds spent in the static steps' replays (``DecodeGraphs._static``: on a CPU the static
    forward and draw run eagerly there), so a step's time outside them is the host's part."""

    def __init__(self) -> None:
        self.s = 0.0

    @classmethod
    def on(cls, graphs) -> _ReplayClock:
        clock = cls()
        if graphs is not None and not hasattr(graphs, "_clock"):
            static = graphs._static

            def timed(key, forward):
                t0 = time.perf_counter()
                try:
                    return static(key, forward)
                finally:
                    clock.s += time.perf_counter() - t0

            graphs._static, graphs._clock = timed, clock
        return getattr(graphs, "_clock", clock)


def time_sampling(
    m, batch: int, repeat: int, bf16: bool = False, against: Path | None = None
) -> tuple[float, float | None]:
    """ms per decode step's draw (rows built on the host, the draw on the logits' device, the
    tokens back), median of ``repeat``; with ``against`` (another version's sampling.py, e.g.
    ``git show REV:cosyvoice/llm/sampling.py``), its ``sample_rows`` too, alternating."""
    from cosyvoice.llm.sampling import Draw, sample_rows

    s, cfg = m.llm.speech_token_size, m.llm.sampling
    vocab = m.llm.net.llm_decoder.out_features
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(batch)) * 4
    if bf16:  # as a bf16 model's: runs of equal values, at the k-th one too
        logits = logits.bfloat16().float()
    logits = logits.to(m.llm.device)
    decoded = [list(range(i, i + 10)) for i in range(batch)]
    runs = {"now": lambda: sample_rows(logits, [Draw(d, False, i) for i, d in enumerate(decoded)],
                                       s, cfg)}  # fmt: skip
    if against is not None:
        old = _load_module("cosyvoice.llm._against", against)
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        runs["against"] = lambda: old.sample_rows(
            logits, [old.Draw(d, False, g) for d, g in zip(decoded, gens, strict=True)], s, cfg
        )
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    now, *rest = (1000 * sorted(t)[repeat // 2] for t in times.values())
    return now, (rest[0] if rest else None)


def _load_module(name: str, path: Path):
    """The module in file ``path`` as ``name`` (inside this package: its relative imports work)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # (dataclasses look there)
    spec.loader.exec_module(mod)
    return mod


def pack_ab(args) -> None:
    """torch's linears against packed ones laid out for each of ``--pack-rows``, alternating."""
    kw = dict(dtype=args.dtype, speaker_dir=None, token2wav=False, packed=False)
    models = {"torch": cosyvoice.load(args.model_dir, **kw)}
    if not can_pack_linears(models["torch"].llm.device, models["torch"].dtype):
        raise SystemExit(f"no packed linears for {models['torch'].dtype} on this machine")
    for rows in args.pack_rows:
        m = models[f"packed {rows}"] = cosyvoice.load(args.model_dir, **kw)
        pack_linears(m.llm.net, rows)
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{models['torch'].dtype}; ms per step, medians (prefill s)")  # fmt: skip
    print("| batch | " + " | ".join(models) + " |\n|---:|" + "---:|" * len(models))
    for b in args.batches:
        ms: dict[str, list[float]] = {k: [] for k in models}
        prefill: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.repeat):
            for k, m in models.items():
                r = run_batch(m, b, args.steps, args.warmup, args.seed, 1, args.context)
                ms[k].append(r["ms_per_step"])
                prefill[k].append(r["prefill_s"])
        cells = [f"{statistics.median(ms[k]):.1f} ({statistics.median(prefill[k]):.2f})"
                 for k in models]  # fmt: skip
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=REPO / "bench" / "out" / "CosyVoice2-0.5B")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--context", type=int, default=20, help="shortest prompt (positions already in the cache)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed windows per batch (best reported; --pack-ab: median)",
    )
    ap.add_argument("--sampling", action="store_true", help="time only the draw")
    ap.add_argument(
        "--static", action="store_true", help="decode through the CUDA graphs' static steps"
    )
    ap.add_argument("--bf16-logits", action="store_true", help="--sampling: logits rounded to bf16")
    ap.add_argument(
        "--against", type=Path, help="--sampling: another version's sampling.py, timed alongside"
    )
    ap.add_argument("--pack-ab", action="store_true", help="torch vs packed linears, side by side")
    ap.add_argument(
        "--pack-rows", type=int, nargs="+", default=[PACK_ROWS],
        help="--pack-ab: the row counts packed layouts are made for",
    )  # fmt: skip
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pack_ab:
        return pack_ab(args)
    t0 = time.perf_counter()
    m = cosyvoice.load(args.model_dir, dtype=args.dtype, speaker_dir=None, token2wav=False)
    print(
        f"load {time.perf_counter() - t0:.1f}s; {cpu_name()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, dtype {m.dtype}"
    )
    if args.static:  # (after load: the pool becomes fixed-size)
        m.llm.enable_graphs(max(args.batches))
    if args.sampling:
        print(f"| batch | draw ms ({m.llm.device}) | --against ms | ratio |\n|---:|---:|---:|---:|")
        for b in args.batches:
            now, old = time_sampling(m, b, max(args.repeat, 21), args.bf16_logits, args.against)
            vs = "| - | -" if old is None else f"| {old:.2f} | {old / now:.2f}x"
            print(f"| {b} | {now:.2f} {vs} |", flush=True)
        return
    print(
        "| batch | decode steps/s | tokens/s | ms/step (best) | ms/step (median) | prefill (tokens, s) "
        "| host ms/step (--static) |\n|---:|---:|---:|---:|---:|---:|---:|"
    )
    for b in args.batches:
        r = run_batch(m, b, args.steps, args.warmup, args.seed, args.repeat, args.context)
        host = f"{r['host_ms_per_step']:.3f}" if args.static else "-"
        print(
            f"| {b} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.0f} "
            f"| {r['ms_per_step_median']:.0f} | {r['prefill_tokens']}, {r['prefill_s']:.2f} "
            f"| {host} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
