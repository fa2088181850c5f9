"""Shared by the benchmarks: percentiles, machine facts, and writing a section of
docs/benchmarks.md between `<!-- NAME:start -->` and `<!-- NAME:end -->` markers."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
COMPLETE = ".complete"  # make_full_model.py writes it last: its model dir is whole
BUILDING = ".building"  # ... and this first: a dir holding either marker is its own to rewrite
sys.path.insert(0, str(ROOT / "tests"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def delivery(t0: float, arrivals: list[tuple[float, float]], seconds: float | None = None) -> dict:
    """One streamed response: ``arrivals`` (time, seconds of audio in the piece) from a request
    sent at ``t0``. TTFA (t0 -> first piece), delivery RTF (first -> last piece over the audio's
    duration), wall RTF and underruns: pieces that came after a listener playing since the first
    piece ran out of audio (50 ms slack). ``seconds``: the audio's length when the pieces' are
    unknown (MP3; given as 0): then no underruns are counted."""
    first, last = arrivals[0][0], arrivals[-1][0]
    underruns, received = 0, 0.0
    for t, n in arrivals:
        underruns += seconds is None and received < t - first - 0.05
        received += n
    total = received if seconds is None else seconds
    return {"ttfa": first - t0, "rtf": (last - first) / total if total else 0.0,
            "wall_rtf": (last - t0) / total if total else 0.0, "audio": total,
            "underruns": int(underruns)}  # fmt: skip


def first_audio(model, voice, text: str, tokens: int, seed: int) -> float:
    """Seconds from the start of one streaming utterance of a loaded ``cosyvoice`` model
    (the LLM forced to ``tokens`` tokens) to its first audio; then it is cancelled."""
    import time

    from cosyvoice.tts import synthesize

    t0 = time.monotonic()
    chunks = synthesize(model, text, voice, stream=True, seed=seed, fixed_tokens=tokens)
    try:
        next(chunks)
        return time.monotonic() - t0
    finally:
        chunks.close()  # cancels the utterance


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    cpu = cpu_name()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average {load:.1f} at start, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")  # fmt: skip


def git_rev() -> str:
    """HEAD's short hash; ``BENCH_COMMIT`` where the tree was copied without its history (a
    GPU box that got the files alone, or a stale .git with them)."""
    if rev := os.environ.get("BENCH_COMMIT"):
        return rev
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command(prefix: str = "uv run python") -> str:
    """This run's command line as a reader would type it (every argument given, as given)."""
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    return shlex.join([*prefix.split(), str(script), *sys.argv[1:]])


def write_section(name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(body)
