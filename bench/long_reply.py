"""A long reply streamed as one text-streaming piece (an agent that never flushes), word by
word, into a CosyVoice2/3 model in this process: with the model's runs (a run ends at its first
sentence end past `run_tokens` text tokens) and as one run (`run_tokens` past the whole reply,
as before runs were cut), side by side in one process.

    uv run python bench/long_reply.py [--model DIR] [--sentences 40] [--rounds 1]

Prints, for each way: the LLM runs, the text tokens each was given, the most positions of
context any run held (a stream's share of a GPU's fixed KV pool is 4096), the audio and the
wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import cosyvoice
from cosyvoice.utterance import Status


def speak(model, text: str) -> dict:
    """Stream ``text`` word by word as one piece, then close it; what the runs took."""
    runs, peak = [], {}
    new_stream_request = model.new_stream_request

    def recorded(*args, **kw):
        req = new_stream_request(*args, **kw)
        runs.append(req)
        return req

    model.new_stream_request = recorded

    def step() -> int:
        got = sum(o.audio.numel() for o in model.step([u]))
        for r in runs:
            if r.cache is not None:
                peak[id(r)] = max(peak.get(id(r), 0), r.cache.length)
        return got

    try:
        u = model.start(model.speakers.list()[0], seed=3, text_stream=True)
        began, samples = time.perf_counter(), 0
        for word in text.split(" "):  # a word a step, as an agent's LLM writes them
            model.add_text(u, word + " ", tag="reply")
            samples += step() if u.busy else 0
        model.close_text(u)
        while u.status is not Status.FINISHED:
            samples += step()
    finally:
        del model.new_stream_request
    return {
        "runs": len(runs),
        "text tokens": [r.bistream.n_text for r in runs],
        "most positions": max(peak.values()),
        "audio s": round(samples / model.sample_rate, 1),
        "wall s": round(time.perf_counter() - began, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path(".golden/cosyvoice2/model"))
    ap.add_argument("--sentences", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = cosyvoice.load(a.model, device="cpu", dtype="float32", use_wetext=False,
                           speaker_dir=tempfile.mkdtemp(), vocoder_thread=False)  # fmt: skip
    text = " ".join(
        f"Sentence number {i} is here, and it is long enough to count." for i in range(a.sentences)
    )
    whole = len(model.frontend.encode(text)) + 1
    print(f"{a.model}: a reply of {whole - 1} text tokens, word by word, 1 torch thread")
    default = model.run_tokens, model.run_cap
    for r in range(a.rounds):
        for name, limits in (("runs", default), ("one run", (whole, whole))):
            model.run_tokens, model.run_cap = limits
            print(f"round {r + 1}, {name}: {speak(model, text)}")


if __name__ == "__main__":
    main()
