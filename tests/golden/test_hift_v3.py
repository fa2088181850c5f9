"""CosyVoice3 CausalHiFT against the golden fixtures: float64 f0, staircase sine source, filter
network, final and non-final (streaming) calls, seeded-noise variant, chunk-prefix property."""

from __future__ import annotations

import pytest
import torch
from _fixtures import ONE_THREAD, family_dir, load_tensors, needs

from cosyvoice.hift import CausalHiFT, NoiseBuffer, load_hift

WAVE_TOL = 1e-3  # golden README: waveforms
F0_TOL = 1e-4  # f0 computed in float64 as upstream
SRC_TOL = 1e-4


D = family_dir("cosyvoice3")
pytestmark = [needs(D / "hift.npz"), ONE_THREAD]


@pytest.fixture(scope="module")
def fx():
    return load_tensors(D / "hift.npz")


@pytest.fixture(scope="module")
def hift():
    m = load_hift(D / "model")
    assert isinstance(m, CausalHiFT)
    return m


def err(a, b):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


class Recorded:
    """Stands in for a NoiseBuffer: the recorded noise values by sample position."""

    def __init__(self, t):
        self.t = t

    def take(self, n):
        return self.t[:n]


def test_f0_source_decode(hift, fx):
    mel = fx["mel"]
    assert err(hift.f0(mel, True), fx["f0"]) <= F0_TOL
    with torch.inference_mode():
        s, sines, uv = hift.source_causal(fx["f0"], None)
        assert err(uv, fx["uv"]) == 0
        n = fx["sine_waves_first4800"].shape[1]
        assert err(sines[:, :n], fx["sine_waves_first4800"]) <= SRC_TOL
        assert err(s, fx["source"]) <= SRC_TOL
        assert (
            err(hift.decode_causal(mel, fx["source"], True), fx["speech_from_decode"]) <= WAVE_TOL
        )


def test_inference_final_and_nonfinal(hift, fx):
    ((y, s),) = hift.inference_causal([fx["mel"][0]], [True])
    assert err(y, fx["speech"][0]) <= WAVE_TOL and err(s, fx["source"][0, 0]) <= WAVE_TOL
    k = 0
    while f"nonfinal{k}_speech" in fx:
        n_f0 = fx[f"nonfinal{k}_f0"].shape[-1]
        t = n_f0 + 3
        assert err(hift.f0(fx["mel"][:, :, :t], False), fx[f"nonfinal{k}_f0"]) <= F0_TOL
        ((yk, sk),) = hift.inference_causal([fx["mel"][0, :, :t]], [False])
        assert yk.numel() == (t - 8) * 480
        assert err(yk, fx[f"nonfinal{k}_speech"][0]) <= WAVE_TOL
        assert err(sk, fx[f"nonfinal{k}_source"][0, 0]) <= WAVE_TOL
        assert err(yk, y[: yk.numel()]) <= 1e-5  # prefix of the full call
        k += 1
    assert k >= 1


def test_seeded_noise(hift, fx):
    mel = fx["seeded_mel"][0]
    nb = Recorded(fx["seeded_noise_sine_waves"][0])
    ((y, s),) = hift.inference_causal([mel], [True], [nb])
    e_noisy = err(y, fx["seeded_speech"][0])
    assert e_noisy <= WAVE_TOL and err(s, fx["seeded_source"][0, 0]) <= WAVE_TOL
    ((y, s),) = hift.inference_causal([mel], [False], [nb])
    assert err(y, fx["seeded_nonfinal_speech"][0]) <= WAVE_TOL
    assert err(s, fx["seeded_nonfinal_source"][0, 0]) <= WAVE_TOL
    ((y0, _),) = hift.inference_causal([mel], [True])
    assert err(y0, fx["seeded_speech"][0]) > 10 * e_noisy  # the noise is really applied


def test_noise_buffer_is_chunking_independent():
    a = NoiseBuffer(torch.Generator().manual_seed(3))
    b = NoiseBuffer(torch.Generator().manual_seed(3))
    a.take(100)
    a.take(30000)
    assert torch.equal(a.take(50000), b.take(50000))


def test_full_size_builder_matches_spec_counts():
    """Full-size CosyVoice3 CausalHiFT hift.pt layout: 328 tensors, 20,779,887 values."""
    from cosyvoice.hift import HiFTConfig, build_hift

    with torch.device("meta"):
        sd = build_hift(HiFTConfig(causal=True, conv_pre_look_right=4)).state_dict()
    assert len(sd) == 328
    assert sum(v.numel() for v in sd.values()) == 20_779_887
