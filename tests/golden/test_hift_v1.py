"""CosyVoice-300M-SFT (v1) HiFT (22.05 kHz, SineGen, ups [8, 8]) against the golden fixtures
(zero noise, zero initial phase)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice.hift import load_hift

WAVE_TOL = 1e-3
F0_TOL = 2e-3  # see test_hift_v2: the classifier amplifies float32 reassociation noise


def golden_dir() -> Path:
    env = os.environ.get("COSYVOICE_GOLDEN")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "golden"


D = golden_dir() / "cosyvoice1"
pytestmark = pytest.mark.skipif(not (D / "hift.npz").is_file(), reason=f"no golden fixtures at {D}")


@pytest.fixture(scope="module")
def fx():
    return {k: torch.from_numpy(v) for k, v in np.load(D / "hift.npz").items()}


def test_v1_hift(fx):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = load_hift(D / "model")
        assert m.cfg.sampling_rate == 22050 and m.cfg.samples_per_frame == 256
        mel = fx["mel"]
        with torch.inference_mode():
            f0 = m.f0_predictor(mel, torch.ones(1, 1, mel.shape[-1]))
            s, _, _ = m.source(fx["f0"], None, [None])
            y = m.decode(mel, fx["source"], torch.tensor([mel.shape[-1]]))
        assert (f0 - fx["f0"]).abs().max() <= F0_TOL
        assert (s - fx["source"]).abs().max() <= 1e-4
        assert (y - fx["speech"]).abs().max() <= WAVE_TOL
        ((y, s),) = m.inference([mel[0]])
        assert (y - fx["speech"][0]).abs().max() <= WAVE_TOL
        assert (s - fx["source"][0, 0]).abs().max() <= WAVE_TOL
    finally:
        torch.set_num_threads(n)
