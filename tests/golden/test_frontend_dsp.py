"""Prompt-audio DSP parity with <golden>/frontend/frontend_dsp.npz (README tolerance 1e-4).

The kaldi log-fbank gets 1e-4 + 5e-5 * |value| per element: its lowest-energy bins (log ~ -13) amplify
float32 FFT reassociation noise to ~4e-4 absolute (same torchaudio call as upstream)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchaudio
from conftest import assert_close

from cosyvoice.frontend.audio import kaldi_fbank_cmn, matcha_mel, resample, whisper_log_mel

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ATOL = 1e-4


@pytest.fixture(scope="module")
def dsp(golden_dir):
    p = golden_dir / "frontend" / "frontend_dsp.npz"
    if not p.is_file():
        pytest.skip("no frontend_dsp.npz")
    meta = json.loads((golden_dir / "frontend" / "frontend.json").read_text())
    return np.load(p), meta


def test_resample(dsp):
    z, _ = dsp
    w = torch.from_numpy(z["wav_24k"])
    assert_close(resample(w, 24000, 16000), z["wav_16k"], 1e-6, what="16k")
    assert_close(resample(w, 24000, 22050), z["wav_22050"], 1e-6, what="22050")


def test_kaldi_fbank(dsp):
    z, _ = dsp
    w = torch.from_numpy(z["wav_16k"])
    raw = torchaudio.compliance.kaldi.fbank(w, num_mel_bins=80, dither=0, sample_frequency=16000)
    # per element: 1e-4 + 5e-5 * |raw log energy| (the noise scales with how low the bin is)
    tol = ATOL + 5e-5 * np.abs(z["kaldi_fbank_raw"])
    assert raw.shape == z["kaldi_fbank_raw"].shape
    assert (np.abs(raw.numpy() - z["kaldi_fbank_raw"]) <= tol).all()
    cmn = kaldi_fbank_cmn(w).numpy()
    assert (np.abs(cmn - z["kaldi_fbank_cmn"]) <= tol).all()
    # the bulk is far tighter than that
    assert np.median(np.abs(cmn - z["kaldi_fbank_cmn"])) < 1e-5


def test_whisper_log_mel(dsp):
    z, _ = dsp
    got = whisper_log_mel(torch.from_numpy(z["wav_16k"]), n_mels=128)
    assert_close(got, z["whisper_logmel128"], ATOL, what="whisper log-mel")


@pytest.mark.parametrize(
    "name", ["mel_v2_24k_fmax8000", "mel_v3_24k_fmaxNone", "mel_v1_22050_fmax8000"]
)
def test_matcha_mel(dsp, name):
    z, meta = dsp
    params = dict(meta["dsp"]["mel_params"][name])
    wav = z["wav_22050"] if params["sampling_rate"] == 22050 else z["wav_24k"]
    got = matcha_mel(torch.from_numpy(wav), **params)
    assert_close(got, z[name], ATOL, what=name)


def test_v2_frontend_zero_shot(dsp, golden_dir):
    """Full zero-shot prompt extraction through the cosyvoice2 golden model dir."""
    import cosyvoice

    z, _ = dsp
    model_dir = golden_dir / "cosyvoice2" / "model"
    if not model_dir.is_dir() or "v2frontend_speech_feat" not in z:
        pytest.skip("no cosyvoice2 model dir / v2frontend arrays")
    m = cosyvoice.load(model_dir, speaker_dir=None)
    ex = m.speakers.extractor
    w = z["wav_24k"][0]
    w16 = resample(torch.from_numpy(z["wav_24k"]), 24000, 16000)
    assert_close(
        ex.prompt_mel(torch.from_numpy(z["wav_24k"])),
        z["v2frontend_speech_feat"],
        ATOL,
        what="speech_feat",
    )
    assert_close(ex.embedding(w16), z["v2frontend_spk_embedding_standin"], ATOL, what="embedding")
    assert ex.speech_tokens(w16) == z["v2frontend_speech_token_standin"][0].tolist()
    emb, tokens, feat = ex.extract(w, 24000)
    assert tokens == z["v2frontend_zero_shot_llm_prompt_speech_token"][0].tolist()
    assert tokens == z["v2frontend_zero_shot_flow_prompt_speech_token"][0].tolist()
    assert len(tokens) == int(z["v2frontend_zero_shot_llm_prompt_speech_token_len"][0])
    assert feat.shape[1] == int(z["v2frontend_zero_shot_prompt_speech_feat_len"][0])
    assert_close(feat, z["v2frontend_zero_shot_prompt_speech_feat"], ATOL, what="zs feat")
    assert_close(emb, z["v2frontend_zero_shot_llm_embedding"], ATOL, what="zs embedding")
    assert_close(emb, z["v2frontend_zero_shot_flow_embedding"], ATOL, what="zs embedding")
    # the texts are not stored (README: '提示文本。' / '目标文本。'); check that the stored ids
    # are what our tokenizer gives for the text they decode to
    tok = m.frontend.tokenizer
    for key in ("v2frontend_zero_shot_prompt_text", "v2frontend_zero_shot_text"):
        ids = z[key][0].tolist()
        text = tok.decode(ids, skip_special_tokens=False)
        assert text and m.frontend.encode(text) == ids
        assert int(z[key + "_len"][0]) == len(ids)
