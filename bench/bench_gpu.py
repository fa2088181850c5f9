"""The GPU benchmark, one command (`just bench-gpu`), at most ~8 minutes on one GPU.

    uv run --extra voice python bench/bench_gpu.py [--model DIR] [--tokens 150] [--engine]

1. builds (or reuses) the full-size random-weight CosyVoice2 dir (`bench/make_full_model.py`);
2. runs the golden parity tests on CUDA in float32 (`COSYVOICE_TEST_DEVICE=cuda`);
3. for float32 and bfloat16: sends N streaming requests at once, the LLM forced to `--tokens`
   tokens each, and measures TTFA p50/p95 at N = 1, 16 and 64, then raises N until a stream
   underruns (a listener starting at its first audio would run out): the largest N with none is
   the real-time capacity. Requests go to a server on CUDA (`/tts/pcm`, stream=true), or with
   `--engine` straight to the model's step loop in this process (what the server's scheduler
   runs, without HTTP: for a GPU box that has torch but not the server's packages, see
   `bench/gpu_device.sh`);
4. writes the `gpu` section of docs/benchmarks.md (and `--body-out FILE`, if given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from report import COMPLETE, ROOT, delivery, first_audio, git_rev, machine, pct, write_section

TEXT = "Hello there, this is a benchmark sentence for the graphics card."
LEVELS = (1, 16, 64)
CAPACITY = (32, 48, 64, 96, 128, 192, 256)
PROFILE_STREAMS = 16
PROFILE_MARGIN_S = 60  # a profile starts only this long before --budget-s ends
# pytest's last line: "37 passed, 1 skipped in 128.00s", "no tests ran in 0.01s"
SUMMARY = re.compile(r"(\d+ (passed|failed|skipped|errors?)|no tests ran)\b.* in [\d.]+s")
TEST_RESULT = re.compile(r"::\S+ (PASSED|FAILED|ERROR|SKIPPED)\b")
PARITY_TESTS = [
    "tests/golden/test_e2e.py",
    "tests/golden/test_utterance.py",
    "tests/golden/test_llm_graphs.py",
    "tests/golden/test_llm_sampling.py",
    "tests/golden/test_flow_graphs.py",
    "tests/golden/test_gpu_kernels.py",
    "tests/golden/test_hift.py::test_static_filter_equals_eager",
]


@dataclass
class Results:
    rows: list[str] = field(default_factory=list)  # the table's, every dtype's
    caps: dict[str, int] = field(default_factory=dict)  # real-time capacity per dtype
    notes: dict[str, str] = field(default_factory=dict)
    # engine mode, per dtype: (what was profiled, the table): where TTFA goes
    profiles: dict[str, tuple[str, str]] = field(default_factory=dict)


def gpu_name() -> str:
    """From nvidia-smi: this process (the dtypes' parent) makes no CUDA context of its own,
    which would hold device memory the measured processes' flow caches are sized by."""
    try:
        smi = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"]
        return subprocess.run(smi, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no CUDA device"


class ServerTarget:
    """N streaming `/tts/pcm` requests at once to a server on CUDA."""

    def __init__(self, model: str, device: str, dtype: str, tokens: int, streams: int,
                 vocoder_thread: str) -> None:  # fmt: skip
        import httpx
        from serverproc import ServerProcess

        self.srv = ServerProcess(
            "--model", model, "--device", device, "--dtype", dtype, "--llm-fixed-tokens",
            str(tokens), "--max-streams", str(streams), "--max-queue", "0",
            "--vocoder-thread", vocoder_thread,
            "--max-client-streams", "0", "--speaker-dir", str(ROOT / "bench" / "out" / "speakers"),
        ).wait_ready(timeout=600)  # fmt: skip
        spk = httpx.get(f"{self.srv.base_url}/speakers").json()[0]
        self.spk, self.rate = spk["id"], spk["sample_rate"]

    def burst(self, n: int) -> list[dict]:
        import httpx
        from http_load import one

        async def run() -> list[dict]:
            async with httpx.AsyncClient(base_url=self.srv.base_url, timeout=600) as client:
                return await asyncio.gather(
                    *(one(client, "/tts/pcm", self.spk, self.rate, tts_text=TEXT, stream=True,
                          seed=k + 1) for k in range(n))
                )  # fmt: skip

        return asyncio.run(run())

    def close(self) -> None:
        self.srv.stop()


class EngineTarget:
    """N utterances started at once and stepped together in this process, at most
    ``max_batch`` per step in turn, as the server's scheduler does."""

    def __init__(self, model: str, device: str, dtype: str, tokens: int, streams: int,
                 vocoder_thread: str) -> None:  # fmt: skip
        import cosyvoice

        thread = {"auto": None, "on": True, "off": False}[vocoder_thread]
        self.model = cosyvoice.load(model, device=device, dtype=dtype, use_wetext=False,
                                    vocoder_thread=thread)  # fmt: skip
        self.model.warmup()
        self.tokens, self.max_batch = tokens, 64
        # (batch size, seconds) of every LLM step and vocoder call: where a burst's time went
        self.llm_calls: list[tuple[int, float]] = []
        self.voc_calls: list[tuple[int, float]] = []
        for part, calls in (
            (self.model.llm, self.llm_calls),
            (self.model.token2wav, self.voc_calls),
        ):
            part.step = _timed(part.step, calls)

    def start(self, n: int) -> list:
        m, spk = self.model, self.model.speakers.list()[0]
        utts = [m.start(spk, seed=k + 1, fixed_tokens=self.tokens) for k in range(n)]
        for u in utts:
            m.add_text(u, TEXT)
            m.close_text(u)
        return utts

    def burst(self, n: int) -> list[dict]:
        from cosyvoice.utterance import Status

        m = self.model
        self.llm_calls.clear()
        self.voc_calls.clear()
        t0 = time.monotonic()
        utts = self.start(n)
        arrivals: dict[int, list[tuple[float, float]]] = {id(u): [] for u in utts}

        def slack(u) -> float | None:  # as the server: a listener playing since its first audio
            got = arrivals[id(u)]
            return got[0][0] + sum(s for _, s in got) - time.monotonic() if got else None

        busy = list(utts)
        while busy:
            batch, rest = busy[: self.max_batch], busy[self.max_batch :]
            for o in m.step(batch, slack=slack):
                if o.error:
                    raise RuntimeError(o.error)
                if o.audio.numel():
                    arrivals[id(o.utterance)].append(
                        (time.monotonic(), o.audio.numel() / m.sample_rate)
                    )
            # audio vocoded on the thread may finish an utterance a step was not given
            busy = [u for u in rest + batch if u.status is not Status.FINISHED]
        while m.let_go():  # idle, as the server's scheduler tells it: graphs for new shapes
            pass
        return [delivery(t0, arrivals[id(u)]) for u in utts]

    def split(self) -> str:
        """The last burst's LLM steps and vocoder calls: count, mean batch, p50 and max ms."""
        cols = []
        for calls in (self.llm_calls, self.voc_calls):
            ms = [s * 1000 for _, s in calls]
            mean = sum(b for b, _ in calls) / len(calls) if calls else 0
            cols.append(f"{len(calls)} | {mean:.1f} | {pct(ms, 50):.1f} | {max(ms, default=0):.1f}")
        return " | ".join(cols)

    def profile(self, n: int, rows: int = 15) -> tuple[str, str]:
        """torch.profiler over N utterances from their start to the first audio out (prefill,
        decode steps, the first flow and HiFT call: what TTFA is made of); the top ops and
        kernels by self device time (CPU time without CUDA). The utterances are then cancelled."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = self.model.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        m, utts, steps = self.model, self.start(n), 0
        with profile(activities=acts) as prof:
            while not any(o.audio.numel() for o in m.step(utts)) and steps < 4 * self.tokens:
                steps += 1
            if cuda:
                torch.cuda.synchronize()
        for u in utts:
            m.cancel(u)
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
        return f"{n} streams, {steps + 1} steps to the first audio", table

    def zero_shot_note(self, rounds: int = 3) -> str:
        """First audio of one stream of a zero-shot speaker (`bench_zs`, a 3 s prompt; the
        bursts use the SFT-format one): its second stream computes the prompt's flow state
        for the flow's prompt store, later ones copy it from there."""
        m = self.model
        voices = [m.speakers.get(n) for n in m.speakers.list()]
        spk = next((v for v in voices if v.zero_shot), None)
        if spk is None:
            return "no zero-shot speaker in the model dir"
        clear = m.token2wav.flow.prompts.clear
        m._where_flow_runs(clear)  # on the vocoder thread, which may be using the store
        ms = [1000 * first_audio(m, spk, TEXT, 60, k + 1) for k in range(rounds + 2)]
        m._where_flow_runs(clear)  # as a registration does: kept before any stream
        t0 = time.perf_counter()
        if not m.keep_prompt(spk):
            return f"first audio {ms[0]:.0f} ms; keep_prompt found no room in the flow's store"
        keep = 1000 * (time.perf_counter() - t0)
        kept = 1000 * first_audio(m, spk, TEXT, 60, 1)
        secs = len(spk.prompt_speech_tokens) / 25
        return (f"one stream of a {secs:.1f} s zero-shot speaker, first audio: {ms[0]:.0f} ms "
                f"the first time, {ms[1]:.0f} ms the second (its prompt kept), then p50 "
                f"{pct(ms[2:], 50):.0f} ms; kept at registration (`keep_prompt`, {keep:.0f} ms), "
                f"its first stream {kept:.0f} ms")  # fmt: skip

    def graphs_note(self) -> str:
        g = self.model.token2wav.flow.graphs
        if g is None:
            return "flow graphs off"
        how = "replayed" if g.capture else "run eagerly at static shapes (no capture)"
        # the flow-cache bound: streams past it drop their caches and recompute each chunk
        # eagerly (float32's bound is about a seventh of bf16's on the same memory)
        bound = self.model.token2wav.cfg.flow_cache_mb
        calls = "; ".join(  # every call that did not replay launched its kernels one by one
            f"{stage} {', '.join(f'{n} {mode}' for mode, n in s['calls'].items())}"
            for stage, s in self.model.graph_stats().items()
        )
        runs = self.model.token2wav.flow.calls.static_runs
        return (f"{runs} flow calls {how}, {g.captures} graphs captured, flow cache bound "
                f"{bound:.0f} MB; calls by way: {calls}")  # fmt: skip

    def close(self) -> None:
        self.model.close()
        del self.model
        free_device()


def free_device() -> None:
    """What a dtype's model held goes back (also one that failed to load): the next dtype's
    flow-cache bound is taken from the free memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _timed(fn, calls: list[tuple[int, float]]):
    def timed(batch, *args, **kwargs):
        began = time.perf_counter()
        try:  # the LLM step syncs (host-side sampling), a vocoder call returns CPU audio
            return fn(batch, *args, **kwargs)
        finally:
            calls.append((len(batch), time.perf_counter() - began))

    return timed


def measure(target, dtype: str, levels, capacity, deadline: float, rows: list[str], saved) -> int:
    """Appends a row per level to `rows` as it goes, calling `saved(capacity so far)` after
    each (kept if a later level fails); the capacity."""
    cap = 0
    target.burst(2)  # warm caches
    for n in sorted({*levels, *capacity}):
        if n not in levels and cap < n // 2:
            continue  # already past capacity: skip the larger capacity levels
        if time.monotonic() > deadline:
            rows.append(f"| {dtype} | {n} | (not run: past --budget-s) | | | |")
            saved(cap)
            break
        res = target.burst(n)
        ttfa = [r["ttfa"] * 1000 for r in res]
        under = sum(r["underruns"] > 0 for r in res)
        if under == 0:
            cap = max(cap, n)
        split = f" {target.split()} |" if hasattr(target, "split") else ""
        rows.append(
            f"| {dtype} | {n} | {pct(ttfa, 50):.0f} | {pct(ttfa, 95):.0f} | "
            f"{max(r['rtf'] for r in res):.2f} | {under} |{split}"
        )
        print(rows[-1], flush=True)
        saved(cap)
    return cap


def profile(target: EngineTarget, dtype: str, res: Results, deadline: float) -> None:
    """The profile of where TTFA goes, if the time is there; its failure costs nothing else
    (the profiler and CUDA graphs are the least tried pair in this run)."""
    if deadline - time.monotonic() < PROFILE_MARGIN_S:
        res.notes[dtype] += "; no profile: past --budget-s"
        return
    try:
        res.profiles[dtype] = target.profile(PROFILE_STREAMS)
    except Exception as e:
        traceback.print_exc()
        res.notes[dtype] += f"; the profile failed: {type(e).__name__}: {e}"[:300]
        return
    print(*res.profiles[dtype], sep="\n", flush=True)


def parity(device: str, limit_s: float) -> str:
    env = {**os.environ, "COSYVOICE_TEST_DEVICE": device}
    # -v: a line per test, so a run cut at the limit still says what passed and failed
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-o", "timeout=120",
           "-o", "timeout_method=thread", *PARITY_TESTS]  # fmt: skip
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=limit_s)  # fmt: skip
    except subprocess.TimeoutExpired as e:  # a hang must not take the measurements' time
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        print(out[-6000:], flush=True)
        seen = Counter(m.group(1) for m in TEST_RESULT.finditer(out))
        so_far = ", ".join(f"{n} {k.lower()}" for k, n in sorted(seen.items())) or "none done"
        return f"not finished in {limit_s:.0f} s ({so_far} by then)"
    print(r.stdout[-3000:], r.stderr[-2000:], flush=True)
    summary = [line.strip("= ") for line in r.stdout.splitlines() if SUMMARY.search(line)]
    if summary and r.returncode in (0, 1, 5):  # 5: no test collected
        return summary[-1]
    why = summary or r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or [""]
    return f"pytest exited {r.returncode}: {why[-1]}"[:300]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--engine", action="store_true", help="the model's step loop, no server")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    ap.add_argument("--capacity", type=int, nargs="+", default=list(CAPACITY))
    ap.add_argument("--vocoder-thread", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450,
                    help="no new burst starts after this long (the whole run)")  # fmt: skip
    ap.add_argument(
        "--grace-s",
        type=float,
        default=60,
        help="a dtype's process still running this long past --budget-s is killed",
    )
    ap.add_argument("--body-out", type=Path, help="also write the section's text here")
    ap.add_argument("--one-dtype", help=argparse.SUPPRESS)  # a child: measure this one
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)  # ... writing its results here
    ap.add_argument("--deadline-in", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_dtype:
        return measure_one(args)
    # a SIGTERM (gpu_device.sh's last-resort timeout) ends the parent through its finally
    # blocks, which kill a running dtype's process group: it would run on, on the GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    res = Results()
    if not complete_model(Path(args.model)):
        built = subprocess.run([sys.executable, str(ROOT / "bench" / "make_full_model.py"),
                                "--out", args.model])  # fmt: skip
        if built.returncode:  # (no golden cosyvoice2/ to seed it, a full disk): said in gpu.md
            res.notes["all"] = f"not run: make_full_model.py exited {built.returncode} (see log)"
            report(args, "not run", res, time.monotonic() - t0)
            sys.exit(1)
    deadline = t0 + args.budget_s
    par = "skipped" if args.skip_parity else parity(args.device, min(180, args.budget_s / 2.5))
    print("parity:", par, flush=True)
    for dtype in args.dtypes:
        if time.monotonic() > deadline - 60:  # no time to load a model and measure anything
            res.notes[dtype] = "not run: past --budget-s"
        else:
            run_child(args, dtype, deadline, res)
        report(args, par, res, time.monotonic() - t0)  # after each dtype: a run cut short by a
        # time limit still leaves what it measured


def complete_model(model: Path) -> bool:
    """Whether ``model`` holds a whole dir: make_full_model.py writes its marker last (a build
    cut short left a part of one)."""
    return (model / COMPLETE).is_file()


def run_child(args, dtype: str, deadline: float, res: Results) -> None:
    """Measure ``dtype`` in a process of its own, killed past the deadline's grace: a CUDA
    error that poisons the context, a crash or a hung burst costs that dtype's remaining
    rows only. Its results (rows as measured) come back through a JSON file."""
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    state = Path(name)
    cmd = [sys.executable, __file__, *sys.argv[1:], "--one-dtype", dtype, "--state", str(state),
           "--deadline-in", str(deadline - time.monotonic())]  # fmt: skip
    # its own process group: a kill takes the server it may have started too
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=deadline + args.grace_s - time.monotonic())
        why = None if rc == 0 else f"its process exited {rc}"
    except subprocess.TimeoutExpired:
        why = f"its process was killed {args.grace_s:.0f} s past --budget-s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        got = Results(**json.loads(state.read_text() or "{}"))
    except ValueError:  # (written atomically: only a child that never wrote it)
        got = Results()
    finally:
        state.unlink(missing_ok=True)
        state.with_suffix(".part").unlink(missing_ok=True)  # a child killed while writing
    res.rows += got.rows
    res.caps.update(got.caps)
    res.profiles.update({d: (w, t) for d, (w, t) in got.profiles.items()})
    note = got.notes.get(dtype, "")
    if why:
        note = f"{note}; {why}" if note else why
    if note:
        res.notes[dtype] = note


def measure_one(args) -> None:
    """A child's work (:func:`run_child`): one dtype's rows, capacity, notes and profile,
    saved to ``--state`` after each."""
    deadline = time.monotonic() + args.deadline_in
    dtype, res = args.one_dtype, Results()

    def save(cap: int | None = None) -> None:
        if cap is not None:  # as it goes: a child killed later keeps what it found
            res.caps[dtype] = cap
        part = args.state.with_suffix(".part")
        part.write_text(json.dumps(dataclasses.asdict(res)))
        part.replace(args.state)  # whole, even if the child is killed while writing

    target_cls = EngineTarget if args.engine else ServerTarget
    try:
        target = target_cls(args.model, args.device, dtype, args.tokens, max(args.capacity),
                            args.vocoder_thread)  # fmt: skip
        try:
            res.caps[dtype] = measure(
                target, dtype, args.levels, args.capacity, deadline, res.rows, save
            )
            if args.engine:
                res.notes[dtype] = f"{target.graphs_note()}; {target.zero_shot_note()}"
                print(dtype, res.notes[dtype], flush=True)
                save()  # kept if the profile hangs
                if dtype == args.dtypes[-1]:  # a crash in it (CUPTI) costs nothing measured
                    profile(target, dtype, res, deadline)
        finally:
            target.close()
    except Exception as e:
        traceback.print_exc()
        res.notes[dtype] = f"failed: {type(e).__name__}: {e}"[:300]
    save()


def report(args, parity_result: str, res: Results, seconds: float) -> None:
    how = (
        "the model's step loop in one process (`--engine`: no HTTP; N utterances started at once, "
        "stepped together up to 64 per step)"
        if args.engine
        else "streaming `/tts/pcm` requests to a server, N sent at once"
    )
    flags = f"--tokens {args.tokens} --vocoder-thread {args.vocoder_thread}"
    head = (
        "| dtype | N | TTFA p50 ms | TTFA p95 ms | slowest delivery RTF | streams that underran |"
    )
    rule = "| --- " * 6
    if args.engine:
        head += (
            " LLM steps | mean batch | p50 ms | max ms |"
            " vocoder calls | mean chunks | p50 ms | max ms |"
        )
        rule += "| --- " * 8
    split = (
        "\nLLM steps and vocoder calls (flow and HiFT of a batch of chunks): how many the "
        "burst made, their mean batch, and their p50 and max wall time.\n"
        if args.engine
        else ""
    )
    profiles = "".join(
        f"\n\n{dtype}, `torch.profiler`, {what}:\n\n```\n{table.rstrip()}\n```"
        for dtype, (what, table) in res.profiles.items()
    )
    body = (
        f"""## GPU: CosyVoice2 full size on {gpu_name()}

Command: `bench/bench_gpu.py {flags}{" --engine" if args.engine else ""}`, commit
{git_rev()}, {seconds:.0f} s in all, {machine()}. Model: `bench/make_full_model.py`
output (random weights), LLM forced to {args.tokens} tokens ({args.tokens / 25:.0f} s of audio)
per request; {how}; float32 rows with torch's defaults (TF32 convolutions, float32 matmuls).
Golden parity on {args.device}, float32 (no TF32): {parity_result}. Real-time capacity
(largest N with no stream underrunning): {", ".join(f"{d} {c}" for d, c in res.caps.items())}.
{"".join(f"{d}: {n}. " for d, n in res.notes.items())}
{split}
{head}
{rule}|
"""
        + "\n".join(res.rows)
        + profiles
    )
    if args.body_out:
        args.body_out.write_text(body + "\n")
    if args.device.startswith("cuda"):  # a CPU dry run of the kit must not replace the section
        write_section("gpu", body)


if __name__ == "__main__":
    main()
