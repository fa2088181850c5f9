"""CosyVoice-300M-SFT (v1) flow (MaskedDiffWithXvec) against the golden fixtures: mel and
returned flow cache with the recorded noise, with and without prompt; strict loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _fixtures import ONE_THREAD, family_dir, load_tensors, needs

from cosyvoice.flow import load_flow
from cosyvoice.flow.v1 import FlowV1

MEL_TOL = 1e-4


D = family_dir("cosyvoice1")
HAVE = (D / "flow.npz").is_file()
KEYS = sorted(k for k in np.load(D / "flow.npz") if re.fullmatch(r"[A-Z]_mel", k)) if HAVE else []
pytestmark = [needs(D / "flow.npz"), ONE_THREAD]


@pytest.fixture(scope="module")
def flow():
    m = load_flow(D / "model")
    assert isinstance(m, FlowV1)
    return m


@pytest.fixture(scope="module")
def fx():
    return load_tensors(D / "flow.npz")


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
