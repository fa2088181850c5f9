"""Streaming token2wav (CosyVoice2) against the golden end-to-end fixtures fed with the recorded
LLM tokens: every flow call, HiFT call and emitted chunk; batched step() invariance; per-request
state; seams; speed."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _fixtures import ONE_THREAD, assert_chunks_match, drive_ragged, family_dir, load_arrays, needs

from cosyvoice.flow import FlowInput, load_flow
from cosyvoice.hift import load_hift
from cosyvoice.token2wav import Token2Wav

WAVE_TOL = 1e-3  # golden README: waveforms
MEL_TOL = 1e-4
# batched vs alone: the flow's mel agrees to ~3e-6 (float32 reassociation in padded GEMMs and
# masked attention); HiFT's sine phase and f0 classifier amplify that to ~6e-5 in the waveform
BATCH_WAVE_TOL = 2e-4


D = family_dir("cosyvoice2")
pytestmark = [needs(D / "e2e_sft.npz"), ONE_THREAD]


@pytest.fixture(scope="module")
def t2w():
    return Token2Wav(load_flow(D / "model"), load_hift(D / "model"))


@pytest.fixture(scope="module")
def fx():
    return load_arrays(D / "e2e_sft.npz")


@pytest.fixture(scope="module")
def spk():
    return torch.load(D / "model" / "spk2info.pt", map_location="cpu", weights_only=True)


def _runs():
    """Run keys (t{i}_{mode}) present in e2e_sft.npz, with their json metadata."""
    meta = {
        r["key"]: r for r in json.loads((D / "fixtures_v2.json").read_text())["e2e_sft"]["runs"]
    }
    keys = sorted(
        {m.group(1) for k in np.load(D / "e2e_sft.npz") if (m := re.match(r"(t\d+_\w+?)_chunk", k))}
    )
    return [meta[k] for k in keys]


def _count(fx, key, what):
    return len(
        [
            k
            for k in fx
            if re.fullmatch(rf"{key}_{what}\d+_\w+", k) and k.endswith(("_speech", "_mel"))
        ]
    )


def _tokens(fx, key):
    segs = sorted(k for k in fx if re.fullmatch(rf"{key}_seg\d+_tokens", k))
    assert len(segs) == 1, "multi-segment runs are covered by the e2e test"
    return torch.from_numpy(fx[segs[0]][0]).long()


RUNS = _runs() if (D / "e2e_sft.npz").is_file() else []


# every run with all tokens at once; streaming runs also token by token (as the LLM emits them)
CASES = [(r, "all_at_once") for r in RUNS] + [(r, "token_by_token") for r in RUNS if r["stream"]]


@pytest.mark.parametrize(("run", "feed"), CASES, ids=[f"{r['key']}-{f}" for r, f in CASES])
def test_chunks_match_fixture(t2w, fx, spk, run, feed):
    key = run["key"]
    toks = _tokens(fx, key)
    st = t2w.new_state(spk[run["spk"]]["embedding"], stream=run["stream"])
    pieces = [toks.tolist()] if feed == "all_at_once" else [[t] for t in toks.tolist()]
    chunks = list(t2w.stream(st, pieces))
    assert_chunks_match(chunks, fx, key, run["n_chunks"], WAVE_TOL)
    assert st.done and st.n_samples == sum(c.numel() for c in chunks)


@pytest.mark.parametrize("run", [r for r in RUNS if r["stream"]], ids=lambda r: r["key"])
def test_flow_and_hift_calls_match_fixture(t2w, fx, spk, run):
    """Each recorded flow call (from the schedule in the json) and each HiFT call on the recorded
    HiFT input with the previous call's source cache."""
    key = run["key"]
    toks = _tokens(fx, key)
    emb = spk[run["spk"]]["embedding"]
    calls = run["flow_calls"]
    inps = [FlowInput(toks[: c["n_tok"]], torch.zeros(0, dtype=torch.long), torch.zeros(0, 80), emb,
                      c["streaming"], c["finalize"]) for c in calls]  # fmt: skip
    for k, mel in enumerate(t2w.flow.inference(inps)):
        ref = fx[f"{key}_flowcall{k}_mel"][0]
        assert mel.shape == ref.shape
        assert np.abs(mel.numpy() - ref).max() <= MEL_TOL
    cache = None
    for k, hc in enumerate(run["hift_calls"]):
        mel = torch.from_numpy(fx[f"{key}_hiftcall{k}_mel_in"][0])
        assert (0 if cache is None else cache.numel()) == hc["cache_source_len"]
        ((y, s),) = t2w.hift.inference([mel], [cache])
        assert np.abs(s.numpy() - fx[f"{key}_hiftcall{k}_source"][0, 0]).max() <= WAVE_TOL
        if f"{key}_hiftcall{k}_speech" in fx:
            assert np.abs(y.numpy() - fx[f"{key}_hiftcall{k}_speech"][0]).max() <= WAVE_TOL
        cache = torch.from_numpy(fx[f"{key}_hiftcall{k}_source"][0, 0, -3840:])


def _long_tokens(n=260, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g)


def _zs(spk):
    z = spk["zs_spk1"]
    return z["flow_embedding"], z["flow_prompt_speech_token"][0], z["prompt_speech_feat"][0]


def test_batched_step_equals_alone(t2w, spk):
    """Three requests (SFT stream, zero-shot stream with prompt padding, non-stream) driven
    together with ragged token arrival: each request's chunks equal those it produces alone."""
    toks = _long_tokens(90)
    emb_z, pt, pf = _zs(spk)

    def states():
        return [t2w.new_state(spk["spk_f1"]["embedding"]),
                t2w.new_state(emb_z, pt, pf),
                t2w.new_state(spk["spk_m1"]["embedding"], stream=False)]  # fmt: skip

    alone = [torch.cat(list(t2w.stream(s, [toks.tolist()]))) for s in states()]
    sts = states()
    # tokens per step: requests 0 and 1 get their first chunk in the same step
    got, n_batched_steps = drive_ragged(t2w, sts, toks.tolist(), [7, 11, 5])
    assert n_batched_steps > 0, "the schedule never produced two chunks in one step"
    for i in range(3):
        y = torch.cat(got[i])
        assert y.shape == alone[i].shape
        assert (y - alone[i]).abs().max() <= BATCH_WAVE_TOL
    # the zero-shot request's first hop was extended to the 25-token grid: P=60 -> 15 extra tokens
    assert sts[1].prompt_pad == 15


def test_hop_schedule_is_per_request(t2w, spk):
    """A second request starts again at hop 25 (upstream mutates a shared hop and does not)."""
    emb = spk["spk_f1"]["embedding"]
    toks = _long_tokens(185).tolist()
    st = t2w.new_state(emb)
    sizes = [c.numel() for c in t2w.stream(st, [toks])]
    # hops 25, 50, 100 tokens -> (50-8)*480, 100*480, 200*480 samples, then the rest
    assert sizes[:3] == [42 * 480, 100 * 480, 200 * 480] and len(sizes) == 4
    assert sum(sizes) == 2 * 185 * 480
    st2 = t2w.new_state(emb)
    assert t2w.step([(st2, toks[:28], False)])[0].numel() == 42 * 480


def test_seams_and_length(t2w, spk):
    """Streaming a long utterance: no discontinuity at chunk joins, total length equal to the
    non-streaming output (within one chunk), and the same audio away from the chunk tails."""
    emb = spk["spk_m1"]["embedding"]
    toks = _long_tokens(190, seed=11).tolist()
    chunks = list(t2w.stream(t2w.new_state(emb), [toks]))
    full = torch.cat(list(t2w.stream(t2w.new_state(emb, stream=False), [toks])))
    assert len(chunks) >= 4
    y = torch.cat(chunks)
    assert abs(y.numel() - full.numel()) <= max(c.numel() for c in chunks)
    inner = max(c.diff().abs().max().item() for c in chunks)
    pos = np.cumsum([c.numel() for c in chunks])[:-1]
    for p in pos:
        jump = abs(y[p].item() - y[p - 1].item())
        assert jump <= inner, f"seam at {p}: jump {jump:.4f} > largest in-chunk jump {inner:.4f}"
    # away from the final chunk, streaming equals the full-attention result only loosely (chunk
    # masks), but it must stay the same signal: compare energies of the first 2 s
    e_s, e_f = y[:48000].pow(2).mean(), full[:48000].pow(2).mean()
    assert 0.5 < (e_s / e_f).item() < 2.0


def test_speed(t2w, spk):
    emb = spk["spk_f1"]["embedding"]
    toks = _long_tokens(60).tolist()
    n1 = t2w.synthesize(t2w.new_state(emb, stream=False), toks).numel()
    n2 = t2w.synthesize(t2w.new_state(emb, stream=False, speed=2.0), toks).numel()
    assert n1 == 120 * 480 and n2 == int(120 / 2.0) * 480
    ns = t2w.synthesize(t2w.new_state(emb, stream=True, speed=2.0), toks).numel()
    assert abs(ns - n2) <= 2 * 480


def test_empty_and_misuse(t2w, spk):
    st = t2w.new_state(spk["spk_f1"]["embedding"])
    (c,) = t2w.step([(st, [], True)])
    assert st.done and c.numel() == 0
    with pytest.raises(ValueError):
        t2w.step([(st, [1], True)])
    st = t2w.new_state(spk["spk_f1"]["embedding"])
    other = t2w.new_state(spk["spk_m1"]["embedding"])
    with pytest.raises(ValueError, match="item 1"):  # out of vocab: refused before any change
        t2w.step([(other, [1, 2], False), (st, [3, 512], False)])
    assert other.tokens == [] and st.tokens == []
    assert t2w.step([(st, list(range(27)), False)]) == [None]  # 25 + 3 look-ahead needed
    assert t2w.step([(st, [5], False)])[0].numel() == 42 * 480
