"""CosyVoice-300M-SFT (v1) flow (MaskedDiffWithXvec) against the golden fixtures: mel and
returned flow cache with the recorded noise, with and without prompt; strict loading."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice.flow import load_flow
from cosyvoice.flow.v1 import FlowV1

MEL_TOL = 1e-4


def golden_dir() -> Path:
    env = os.environ.get("COSYVOICE_GOLDEN")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "golden"


D = golden_dir() / "cosyvoice1"
HAVE = (D / "flow.npz").is_file()
KEYS = sorted(k for k in np.load(D / "flow.npz") if re.fullmatch(r"[A-Z]_mel", k)) if HAVE else []
pytestmark = pytest.mark.skipif(not HAVE, reason=f"no golden fixtures at {D}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flow():
    m = load_flow(D / "model")
    assert isinstance(m, FlowV1)
    return m


@pytest.fixture(scope="module")
def fx():
    return {k: torch.from_numpy(v) for k, v in np.load(D / "flow.npz").items()}


def test_strict_keys(flow):
    sd = torch.load(D / "model" / "flow.pt", map_location="cpu", weights_only=True)
    assert set(flow.state_dict()) == set(sd)


@pytest.mark.parametrize("key", KEYS)
def test_v1_flow_mel_and_cache(flow, fx, key):
    case = key[0]
    if case == "B":  # prompt = another speaker's speech_token/speech_feat/embedding (README)
        args = (fx["prompt_token"][0], fx["prompt_feat"][0], fx["prompt_embedding"][0])
    else:
        args = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 80), fx["embedding"][0])
    mel, cache = flow.inference(fx["token"][0], *args, z=fx[f"{case}_noise_z"])
    ref = fx[key][0]
    assert mel.shape == ref.shape
    assert (mel - ref).abs().max() <= MEL_TOL
    cref = fx[f"{case}_flow_cache_out"][0]
    assert cache.shape == cref.shape and (cache - cref).abs().max() <= MEL_TOL
