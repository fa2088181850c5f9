"""How far the flow's bf16 mel (autocast, as on a GPU) is from float32's, per family, with the
Euler schedule in float32 (as the flow makes it) and in bf16 (as it did before): the relative
mean error over the golden flow.npz cases A and B. Runs on the CPU in seconds.

    uv run python bench/flow_bf16_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS / "golden"), str(TESTS)]
from _fixtures import FAMILIES, flow_input, load_tensors  # noqa: E402

import cosyvoice.flow.decoder as dec  # noqa: E402
from cosyvoice.flow import load_flow  # noqa: E402


def relative_errors(flow, inps, ref, schedule_dtype: torch.dtype) -> list[float]:
    made = dec.cosine_t_span
    dec.cosine_t_span = lambda n, dtype=None: made(n, schedule_dtype)
    dec.euler_times.cache_clear()  # (it keeps the times it made from the schedule)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = flow.inference(inps)
    finally:
        dec.cosine_t_span = made
        dec.euler_times.cache_clear()
    return [
        float((o.float() - r).abs().mean() / r.abs().mean()) for o, r in zip(out, ref, strict=True)
    ]


def main() -> None:
    print("| family | schedule float32 | schedule bf16 |")
    print("| --- | --- | --- |")
    for fam in ("v2", "v3"):
        flow = load_flow(FAMILIES[fam] / "model")
        fx = load_tensors(FAMILIES[fam] / "flow.npz")
        inps = [flow_input(fx, c) for c in ("A", "B")]
        ref = flow.inference(inps)
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            errs = relative_errors(flow, inps, ref, dtype)
            cells.append(" / ".join(f"{100 * e:.2f}%" for e in errs))
        print(f"| {fam} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
