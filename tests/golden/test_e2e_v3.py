"""End to end (text + speaker -> audio chunks) for CosyVoice3 through cosyvoice.tts against the
golden ``e2e_sft`` fixtures (SFT with the system prefix, and zero-shot), greedy LLM, zero noise."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

WAVE_TOL = 1e-3


def golden_dir() -> Path:
    env = os.environ.get("COSYVOICE_GOLDEN")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "golden"


D = golden_dir() / "cosyvoice3"
HAVE = (D / "e2e_sft.npz").is_file()
pytestmark = pytest.mark.skipif(not HAVE, reason=f"no golden fixtures at {D}")
RUNS = json.loads((D / "fixtures_v3.json").read_text())["e2e_sft"]["runs"] if HAVE else []


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a shared 2-core box
    two OpenMP threads collapse under contention (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tts():
    from cosyvoice.tts import TTS

    return TTS.load(D / "model")


@pytest.fixture(scope="module")
def fx():
    return dict(np.load(D / "e2e_sft.npz"))


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
