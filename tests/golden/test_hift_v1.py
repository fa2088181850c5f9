"""CosyVoice-300M-SFT (v1) HiFT (22.05 kHz, SineGen, ups [8, 8]) against the golden fixtures
(zero noise, zero initial phase)."""

from __future__ import annotations

import pytest
import torch
from _fixtures import family_dir, load_tensors, needs

from cosyvoice.hift import load_hift

WAVE_TOL = 1e-3
F0_TOL = 2e-3  # see test_hift_v2: the classifier amplifies float32 reassociation noise


D = family_dir("cosyvoice1")
pytestmark = needs(D / "hift.npz")


@pytest.fixture(scope="module")
def fx():
    return load_tensors(D / "hift.npz")


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
