"""CosyVoice3 streaming token2wav against the golden e2e fixtures fed with the recorded LLM
tokens (accumulated mel re-vocoded by the causal HiFT): every chunk, every flow and HiFT call,
and batched step() invariance."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _fixtures import (
    ONE_THREAD,
    assert_chunks_match,
    drive_ragged,
    e2e_runs,
    family_dir,
    load_arrays,
    needs,
)

from cosyvoice.flow import FlowInput, load_flow
from cosyvoice.hift import load_hift
from cosyvoice.token2wav import Token2Wav

WAVE_TOL = 1e-3
MEL_TOL = 1e-4
BATCH_WAVE_TOL = 2e-4  # see test_token2wav_v2


D = family_dir("cosyvoice3")
pytestmark = [needs(D / "e2e_sft.npz"), ONE_THREAD]
RUNS = e2e_runs(D, "v3")


@pytest.fixture(scope="module")
def t2w():
    return Token2Wav(load_flow(D / "model"), load_hift(D / "model"))


@pytest.fixture(scope="module")
def fx():
    return load_arrays(D / "e2e_sft.npz")


@pytest.fixture(scope="module")
def spk():
    return torch.load(D / "model" / "spk2info.pt", map_location="cpu", weights_only=True)


def _speaker(spk, name):
    """(embedding, prompt tokens, prompt mel): SFT entries have only an embedding."""
    s = spk[name]
    if "embedding" in s:
        return s["embedding"], None, None
    return s["flow_embedding"], s["flow_prompt_speech_token"][0], s["prompt_speech_feat"][0]


def _tokens(fx, key):
    (seg,) = [k for k in fx if re.fullmatch(rf"{key}_seg\d+_tokens", k)]
    return torch.from_numpy(fx[seg][0]).long()


@pytest.mark.parametrize("run", RUNS, ids=[r["key"] for r in RUNS])
def test_chunks_match_fixture(t2w, fx, spk, run):
    key = run["key"]
    emb, pt, pf = _speaker(spk, run["spk"])
    st = t2w.new_state(emb, pt, pf, stream=run["stream"])
    chunks = list(t2w.stream(st, [[t] for t in _tokens(fx, key).tolist()]))
    assert_chunks_match(chunks, fx, key, run["n_chunks"], WAVE_TOL)


@pytest.mark.parametrize("run", [r for r in RUNS if r["stream"]], ids=lambda r: r["key"])
def test_flow_and_hift_calls(t2w, fx, spk, run):
    key = run["key"]
    toks = _tokens(fx, key)
    emb, pt, pf = _speaker(spk, run["spk"])
    pt = torch.zeros(0, dtype=torch.long) if pt is None else pt
    pf = torch.zeros(0, 80) if pf is None else pf
    calls = run["flow_calls"]
    inps = [
        FlowInput(toks[: c["n_tok"]], pt, pf, emb, c["streaming"], c["finalize"]) for c in calls
    ]
    for k, mel in enumerate(t2w.flow.inference(inps)):
        ref = fx[f"{key}_flowcall{k}_mel"][0]
        assert mel.shape == ref.shape and np.abs(mel.numpy() - ref).max() <= MEL_TOL
    for k, c in enumerate(calls):
        mel = torch.from_numpy(fx[f"{key}_hiftcall{k}_mel_in"][0])
        ((y, s),) = t2w.hift.inference_causal([mel], [c["finalize"]])
        assert np.abs(s.numpy() - fx[f"{key}_hiftcall{k}_source"][0, 0]).max() <= WAVE_TOL
        assert np.abs(y.numpy() - fx[f"{key}_hiftcall{k}_speech"][0]).max() <= WAVE_TOL


def test_batched_step_equals_alone(t2w, spk):
    g = torch.Generator().manual_seed(5)
    toks = torch.randint(0, 512, (90,), generator=g).tolist()
    emb_z, pt, pf = _speaker(spk, "zs_spk1")

    def states():
        return [t2w.new_state(spk["spk_f1"]["embedding"], seed=7),
                t2w.new_state(emb_z, pt, pf),
                t2w.new_state(spk["spk_m1"]["embedding"], stream=False)]  # fmt: skip

    alone = [torch.cat(list(t2w.stream(s, [toks]))) for s in states()]
    sts = states()
    got, both = drive_ragged(t2w, sts, toks, [7, 11, 5])
    assert both > 0
    for i in range(3):
        y = torch.cat(got[i])
        assert y.shape == alone[i].shape and (y - alone[i]).abs().max() <= BATCH_WAVE_TOL
