"""End to end (text + speaker -> audio chunks) for CosyVoice3 through cosyvoice.tts against the
golden ``e2e_sft`` fixtures (SFT with the system prefix, and zero-shot), greedy LLM, zero noise."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _fixtures import ONE_THREAD, e2e_runs, family_dir, load_arrays, needs

WAVE_TOL = 1e-3


D = family_dir("cosyvoice3")
pytestmark = [needs(D / "e2e_sft.npz"), ONE_THREAD]
RUNS = e2e_runs(D, "v3")


@pytest.fixture(scope="module")
def tts():
    from cosyvoice.tts import TTS

    return TTS.load(D / "model")


@pytest.fixture(scope="module")
def fx():
    return load_arrays(D / "e2e_sft.npz")


@pytest.mark.parametrize("run", RUNS, ids=[r["key"] for r in RUNS])
def test_tts_matches_fixture(tts, fx, run):
    key = run["key"]
    chunks = list(tts.tts(run["text"], run["spk"], stream=run["stream"], greedy=True, noise=False))
    refs = sorted((k for k in fx if re.fullmatch(rf"{key}_chunk\d+_speech", k)),
                  key=lambda k: int(re.search(r"chunk(\d+)", k).group(1)))  # fmt: skip
    assert len(chunks) == len(refs) == run["n_chunks"]
    for c, k in zip(chunks, refs, strict=True):
        ref = fx[k][0]
        assert c.shape == ref.shape, k
        assert float(np.abs(c.numpy() - ref).max()) <= WAVE_TOL, k
