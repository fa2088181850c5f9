"""End to end (text + speaker -> audio chunks) through cosyvoice.tts against the golden
``e2e_sft`` fixtures of CosyVoice2 and CosyVoice3 (SFT, CosyVoice3's with the system prefix, and
zero-shot): greedy LLM (the fixtures' argmax patch) and zero vocoder noise. CosyVoice-300M (v1)
replays recorded flow noise: see test_e2e_v1."""

from __future__ import annotations

import pytest
import torch
from _fixtures import (
    ONE_THREAD,
    TEST_DEVICE,
    WETEXT,
    assert_chunks_match,
    family_dir,
    load_arrays,
    needs,
    run_params,
)

from cosyvoice.tts import synthesize

WAVE_TOL = 1e-3  # golden README: waveforms

FAMILIES = {"v2": family_dir("cosyvoice2"), "v3": family_dir("cosyvoice3")}
# bench/bench_gpu.py runs these on CUDA: the model loads on TEST_DEVICE
pytestmark = ONE_THREAD


@pytest.fixture(scope="module")
def tts(family):
    import cosyvoice

    # exact_final: upstream's full-attention last chunk, which the fixtures recorded
    return cosyvoice.load(
        FAMILIES[family] / "model",
        device=TEST_DEVICE,
        dtype="float32",
        use_wetext=WETEXT,
        exact_final=True,
    )


@pytest.fixture(scope="module")
def fx(family):
    return load_arrays(FAMILIES[family] / "e2e_sft.npz")


@pytest.mark.parametrize(
    ("family", "run"), run_params(FAMILIES), indirect=["family"], scope="module"
)
def test_tts_matches_fixture(tts, fx, run):
    if not WETEXT and any(c.isdigit() for c in run["text"]):
        pytest.skip("no wetext (a bare GPU box): the fixture's numbers were normalized by it")
    key = run["key"]
    chunks = list(
        synthesize(tts, run["text"], run["spk"], stream=run["stream"], greedy=True, noise=False)
    )
    assert_chunks_match(chunks, fx, key, run["n_chunks"], WAVE_TOL)


@pytest.mark.parametrize(
    "family",
    [pytest.param("v2", marks=needs(FAMILIES["v2"] / "e2e_sft.npz"))],
    indirect=True,
    scope="module",
)
def test_tts_zero_shot_speaker_runs(tts):
    """The zero-shot speaker (prompt tokens + prompt mel) goes through the same path."""
    chunks = list(synthesize(tts, "Hello there.", "zs_spk1", stream=True, greedy=True, noise=False))
    y = torch.cat(chunks)
    assert y.numel() > 0 and y.numel() % 480 == 0 and torch.isfinite(y).all()
