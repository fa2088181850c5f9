"""CosyVoice-300M-SFT (v1) streaming token2wav against the golden e2e fixtures, fed with the
recorded LLM tokens and the recorded flow noise of every flow call: every emitted chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures import assert_chunks_match, e2e_runs, family_dir, needs

from cosyvoice.flow import load_flow
from cosyvoice.hift import load_hift
from cosyvoice.token2wav import Token2WavV1, make_token2wav

WAVE_TOL = 1e-3


D = family_dir("cosyvoice1")
pytestmark = needs(D / "e2e_sft.npz")
RUNS = e2e_runs(D, "v1")


@pytest.fixture(scope="module")
def t2w():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    t = make_token2wav(load_flow(D / "model"), load_hift(D / "model"))
    assert isinstance(t, Token2WavV1)
    yield t
    torch.set_num_threads(n)


@pytest.mark.parametrize("run", RUNS, ids=[r["key"] for r in RUNS])
def test_v1_chunks(t2w, run):
    fx = np.load(D / "e2e_sft.npz")
    spk = torch.load(D / "model" / "spk2info.pt", map_location="cpu", weights_only=True)
    key = run["key"]
    toks = fx[f"{key}_seg0_tokens"][0].tolist()
    st = t2w.new_state(spk[run["spk"]]["embedding"], stream=run["stream"])
    st.flow_noise = [
        torch.from_numpy(fx[f"{key}_flowcall{k}_noise_z"]) for k in range(len(run["flow_calls"]))
    ]
    chunks = list(t2w.stream(st, [[t] for t in toks]))
    assert_chunks_match(chunks, fx, key, run["n_chunks"], WAVE_TOL)
