"""CosyVoice-300M-SFT (v1) end to end, text -> audio through cosyvoice.tts (greedy LLM, zero
vocoder noise, recorded flow noise replayed). The v1 LLM / text tokenizer belong to part 1: while
``cosyvoice.load`` refuses v1, each run is an explicit xfail (never a silent pass)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures import assert_chunks_match, e2e_runs, family_dir, needs

from cosyvoice.tts import synthesize

WAVE_TOL = 1e-3


D = family_dir("cosyvoice1")
pytestmark = needs(D / "e2e_sft.npz")
RUNS = e2e_runs(D, "v1")


@pytest.fixture(scope="module")
def tts():
    import cosyvoice

    try:
        return cosyvoice.load(D / "model", device="cpu", dtype="float32")
    except NotImplementedError as e:
        pytest.xfail(f"v1 front half not implemented: {e}")


@pytest.mark.parametrize("run", RUNS, ids=[r["key"] for r in RUNS])
def test_v1_e2e(tts, run):
    fx = np.load(D / "e2e_sft.npz")
    key = run["key"]

    def replay_noise(st, seg):  # v1 draws flow noise per call: replay the recorded z
        n = len(run["flow_calls"])
        st.flow_noise = [torch.from_numpy(fx[f"{key}_flowcall{k}_noise_z"]) for k in range(n)]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chunks = list(synthesize(tts, run["text"], run["spk"], stream=run["stream"], greedy=True,
                                 noise=False, on_segment=replay_noise))  # fmt: skip
    finally:
        torch.set_num_threads(n)
    assert_chunks_match(chunks, fx, key, run["n_chunks"], WAVE_TOL)
