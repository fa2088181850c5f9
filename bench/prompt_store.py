"""First audio of a zero-shot speaker's stream with the flow's prompt store and without.

    uv run python bench/make_full_model.py              # once: bench/out/CosyVoice2-0.5B
    uv run python bench/prompt_store.py [--prompts 3,10] [--rounds 3]

In-process (the model's step loop, stream, LLM forced to ``--tokens``): for a speaker
made from a synthetic recording of each length, the time from the request to its first audio,
with the store warm (streams of that speaker ran before: the prompt's flow state is copied
in) and with it off (every stream computes the whole prompt's state, in pieces before its
tokens). Rounds alternate the two so drift in the machine's load hits both. The first two
streams of a speaker are reported apart: the first runs as with the store off, the second
(the prompt seen before) also keeps the prompt's state in the store once computed. Then, as registering a
speaker does, ``keep_prompt`` fills the store before any stream: its time (what a registration
adds) and the first audio of the stream after it.
"""

from __future__ import annotations

import argparse
import io
import time
import wave

import numpy as np
from report import ROOT, first_audio, git_rev, machine, pct

TEXT = "Hello there, this is a benchmark sentence."


def recording(seconds: float, sr: int = 24000) -> bytes:
    """A WAV of a voiced sweep with a little noise: what the stand-in ONNX models make a
    prompt of."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.5 * t)
    noise = 0.01 * np.random.default_rng(int(seconds)).standard_normal(len(t))
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / sr) + noise
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def main() -> None:
    import cosyvoice

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "bench" / "out" / "CosyVoice2-0.5B"))
    ap.add_argument("--prompts", default="3,10", help="prompt lengths, seconds")
    ap.add_argument("--tokens", type=int, default=60, help="LLM tokens (past the first hop)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = cosyvoice.load(args.model, device="cpu", dtype="float32", use_wetext=False)
    model.warmup()
    store = model.token2wav.flow.prompts
    budget = store.budget
    print(f"{machine()}, commit {git_rev()}, store budget {budget / 2**20:.0f} MB")
    print("| prompt | tokens | 1st / 2nd stream s | kept ahead: keep_prompt / 1st stream s "
          "| store s (p50) | off s (p50) | off / store |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for secs in (float(s) for s in args.prompts.split(",")):
        voice = model.speakers.from_prompt(recording(secs), "A synthetic prompt.")
        store.clear()
        cold = [first_audio(model, voice, TEXT, args.tokens, 1) for _ in range(2)]
        store.clear()  # as a registration does: the prompt kept before its first stream
        t0 = time.perf_counter()
        model.keep_prompt(voice)
        keep = time.perf_counter() - t0
        registered = first_audio(model, voice, TEXT, args.tokens, 1)
        on, off = [], []
        for r in range(args.rounds):
            store.budget = 0
            off.append(first_audio(model, voice, TEXT, args.tokens, r + 2))
            store.budget = budget
            if not len(store):
                first_audio(model, voice, TEXT, args.tokens, 1)  # the store is warm again
            on.append(first_audio(model, voice, TEXT, args.tokens, r + 2))
        a, b = pct(on, 50), pct(off, 50)
        on_s, off_s = (", ".join(f"{x:.2f}" for x in xs) for xs in (on, off))
        runs = f"store {on_s}; off {off_s}"
        print(f"| {secs:g} s | {len(voice.prompt_speech_tokens)} | {cold[0]:.2f} / {cold[1]:.2f} "
              f"| {keep:.2f} / {registered:.2f} | {a:.2f} | {b:.2f} | {b / a:.2f}x |  ({runs})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
