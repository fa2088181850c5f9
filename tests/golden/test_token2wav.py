"""Streaming token2wav of every family against <golden>/<family>/e2e_sft.npz, fed with the
recorded LLM tokens: every emitted chunk (tokens all at once and one by one) and, for the v2/v3
streaming runs, every flow and HiFT call. v2/v3 also: batched step() with ragged token arrival
equals each request alone, the per-request hop schedule, seams, speed and misuse.

v1 draws new flow noise on every flow call: its runs replay the recorded z of each call. v2
cross-fades HiFT output with source caches; v3 (causal HiFT) emits what re-vocoding the accumulated
mel would, from a sliding window of it (the recorded HiFT calls are the whole-mel ones)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from _fixtures import (
    FAMILIES,
    ONE_THREAD,
    CountOps,
    assert_chunks_match,
    drive_ragged,
    family_params,
    load_arrays,
    run_params,
)
from conftest import assert_close

from cosyvoice.flow import FlowInput, load_flow
from cosyvoice.hift import load_hift
from cosyvoice.token2wav import Token2Wav, Token2WavV1, make_token2wav

WAVE_TOL = 1e-3  # golden README: waveforms
MEL_TOL = 1e-4
# batched vs alone: the flow's mel agrees to ~3e-6 (float32 reassociation in padded GEMMs and
# masked attention); HiFT's sine phase and f0 classifier amplify that to ~6e-5 in the waveform
BATCH_WAVE_TOL = 2e-4

# Streaming format of upstream CosyVoice2Model (inherited by v3): the first hop is 25 tokens
# (the flow's attention chunk), 480 samples per mel frame, a source cache of 8 frames.
HOP = 25
SAMPLES_PER_FRAME = 480
SOURCE_CACHE = 8 * SAMPLES_PER_FRAME

V2_V3 = family_params("e2e_sft.npz", "v2", "v3")

pytestmark = ONE_THREAD


def _one_segment(family: str, run: dict, stream_only: bool = False) -> bool:
    """token2wav gets one segment's tokens: runs with several segments are covered by the e2e
    tests."""
    return len(run["segments"]) == 1 and (run["stream"] or not stream_only)


@pytest.fixture(scope="module")
def t2w(family):
    d = FAMILIES[family] / "model"
    # upstream's final chunk (full-attention recompute), so every chunk can match the fixtures;
    # the non-final chunks run over the flow cache
    t = make_token2wav(load_flow(d), load_hift(d), exact_final=True)
    assert isinstance(t, Token2WavV1 if family == "v1" else Token2Wav)
    return t


@pytest.fixture(scope="module")
def fx(family) -> dict[str, np.ndarray]:
    return load_arrays(FAMILIES[family] / "e2e_sft.npz")


@pytest.fixture(scope="module")
def spk(family) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(
        FAMILIES[family] / "model" / "spk2info.pt", map_location="cpu", weights_only=True
    )


@pytest.fixture(scope="module")
def vocab(family) -> int:
    """The speech-token vocabulary, read off flow.pt's embedding (not from the parsed yaml)."""
    sd = torch.load(FAMILIES[family] / "model" / "flow.pt", map_location="cpu", weights_only=True)
    return sd["input_embedding.weight"].shape[0]


def _speaker(spk, name: str):
    """(embedding, prompt tokens, prompt mel): SFT entries have only an embedding."""
    s = spk[name]
    if "embedding" in s:
        return s["embedding"], None, None
    return s["flow_embedding"], s["flow_prompt_speech_token"][0], s["prompt_speech_feat"][0]


def _sft(spk) -> list[str]:
    """The SFT speakers of spk2info.pt, in file order."""
    return [n for n, s in spk.items() if "embedding" in s]


def _zero_shot(spk) -> str:
    """The first zero-shot speaker of spk2info.pt (prompt tokens + prompt mel)."""
    return next(n for n, s in spk.items() if "flow_prompt_speech_token" in s)


def _tokens(fx, key: str) -> torch.Tensor:
    (seg,) = [k for k in fx if re.fullmatch(rf"{key}_seg\d+_tokens", k)]
    return torch.from_numpy(fx[seg][0]).long()


def _random_tokens(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("feed", ["all_at_once", "token_by_token"])
@pytest.mark.parametrize(
    ("family", "run"), run_params(FAMILIES, _one_segment), indirect=["family"], scope="module"
)
def test_chunks_match_fixture(family, t2w, fx, spk, run, feed):
    key = run["key"]
    toks = _tokens(fx, key).tolist()
    st = t2w.new_state(*_speaker(spk, run["spk"]), stream=run["stream"])
    if family == "v1":  # replay the flow noise of every recorded call
        n = len(run["flow_calls"])
        st.flow_noise = [torch.from_numpy(fx[f"{key}_flowcall{k}_noise_z"]) for k in range(n)]
    pieces = [toks] if feed == "all_at_once" else [[t] for t in toks]
    chunks = list(t2w.stream(st, pieces))
    assert_chunks_match(chunks, fx, key, run["n_chunks"], WAVE_TOL)
    assert st.done and st.n_samples == sum(c.numel() for c in chunks)


@pytest.mark.parametrize(
    ("family", "run"),
    run_params({f: FAMILIES[f] for f in ("v2", "v3")}, lambda f, r: _one_segment(f, r, True)),
    indirect=["family"],
    scope="module",
)
def test_flow_and_hift_calls(t2w, fx, spk, run):
    """Each recorded flow call (schedule from the json) and each HiFT call on the recorded HiFT
    input: v2 with the previous call's source cache, v3 re-vocoding the accumulated mel."""
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
        assert_close(mel, fx[f"{key}_flowcall{k}_mel"][0], MEL_TOL, what=f"flow call {k}")
    cache = None
    for k, hc in enumerate(run["hift_calls"]):
        mel = torch.from_numpy(fx[f"{key}_hiftcall{k}_mel_in"][0])
        if t2w.causal:
            ((y, s),) = t2w.hift.inference_causal([mel], [hc["finalize"]])
        else:
            assert (0 if cache is None else cache.numel()) == hc["cache_source_len"]
            ((y, s),) = t2w.hift.inference([mel], [cache])
            cache = torch.from_numpy(fx[f"{key}_hiftcall{k}_source"][0, 0, -SOURCE_CACHE:])
        assert_close(s, fx[f"{key}_hiftcall{k}_source"][0, 0], WAVE_TOL, what=f"source {k}")
        assert_close(y, fx[f"{key}_hiftcall{k}_speech"][0], WAVE_TOL, what=f"speech {k}")


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_batched_step_equals_alone(t2w, spk, vocab):
    """Three requests (seeded-noise SFT stream, zero-shot stream with prompt padding, non-stream)
    driven together with ragged token arrival: each request's chunks equal those it produces
    alone."""
    toks = _random_tokens(90, 5, vocab)
    sft = _sft(spk)
    emb_z, pt, pf = _speaker(spk, _zero_shot(spk))

    def states():
        return [t2w.new_state(spk[sft[0]]["embedding"], seed=7),
                t2w.new_state(emb_z, pt, pf),
                t2w.new_state(spk[sft[-1]]["embedding"], stream=False)]  # fmt: skip

    alone = [torch.cat(list(t2w.stream(s, [toks]))) for s in states()]
    sts = states()
    # tokens per step: requests 0 and 1 get their first chunk in the same step
    got, n_batched_steps = drive_ragged(t2w, sts, toks, [7, 11, 5])
    assert n_batched_steps > 0, "the schedule never produced two chunks in one step"
    for i in range(3):
        y = torch.cat(got[i])
        assert y.shape == alone[i].shape
        assert (y - alone[i]).abs().max() <= BATCH_WAVE_TOL
    # the zero-shot request's first hop is extended to the next multiple of the hop after the
    # prompt: P prompt tokens -> (-P) mod 25 extra tokens
    assert sts[1].prompt_pad == -pt.numel() % HOP


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_step_never_waits_for_the_device(t2w, spk, vocab):
    """A step queues the flow and vocoder work of its whole batch without reading a device value
    back (lengths are host ints, caches and cross-fades stay on the device), then copies all its
    audio back at once: on a GPU, any such read would stall the host once per item. Covers
    streaming (cached chunks, the final piece), speed != 1, seeded noise and a non-stream item."""
    streaming = Token2Wav(t2w.flow, t2w.hift)  # the default schedule: a cached final chunk
    sft, toks = _sft(spk), _random_tokens(140, 9, vocab)
    for t in (t2w, streaming):
        sts = [t.new_state(spk[sft[0]]["embedding"], seed=3),
               t.new_state(spk[sft[-1]]["embedding"], speed=1.5),
               t.new_state(spk[sft[0]]["embedding"], stream=False, seed=4)]  # fmt: skip
        counter, fed, n_chunks = CountOps(), 0, 0
        with counter:
            while not all(st.done for st in sts):
                new, fed = toks[fed : fed + 40], min(fed + 40, len(toks))
                out = t.step([(st, [] if st.done else new, fed == len(toks)) for st in sts])
                n_chunks += sum(c is not None for c in out)
        assert n_chunks >= 6 and counter.ops["aten.conv1d"] > 0  # the counter saw the work
        assert counter.host_waits() == {}


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_hop_schedule_is_per_request(t2w, spk, vocab):
    """A second request starts again at hop 25 (upstream mutates a shared hop and does not)."""
    emb = spk[_sft(spk)[0]]["embedding"]
    toks = _random_tokens(185, 3, vocab)
    st = t2w.new_state(emb)
    sizes = [c.numel() for c in t2w.stream(st, [toks])]
    # hops 25, 50, 100 tokens -> (50-8)*480, 100*480, 200*480 samples, then the rest
    assert sizes[:3] == [42 * 480, 100 * 480, 200 * 480] and len(sizes) == 4
    assert sum(sizes) == 2 * 185 * 480
    st2 = t2w.new_state(emb)
    assert t2w.step([(st2, toks[:28], False)])[0].numel() == 42 * 480


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_seams_and_length(t2w, spk, vocab):
    """Streaming a long utterance: no discontinuity at chunk joins, total length equal to the
    non-streaming output (within one chunk), and the same audio away from the chunk tails."""
    emb = spk[_sft(spk)[-1]]["embedding"]
    toks = _random_tokens(190, 11, vocab)
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
    n = 2 * 24000
    e_s, e_f = y[:n].pow(2).mean(), full[:n].pow(2).mean()
    assert 0.5 < (e_s / e_f).item() < 2.0


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_a_long_whole_utterance_goes_in_hops(t2w, spk, vocab):
    """A non-stream utterance longer than max_whole_tokens is vocoded a hop per step, so no
    step holds the others up for one huge flow call; a shorter one stays one chunk."""
    emb = spk[_sft(spk)[0]]["embedding"]
    n = t2w.cfg.max_whole_tokens
    for length, one_chunk in ((n, True), (n + 60, False)):
        toks = _random_tokens(length, 5, vocab)
        st = t2w.new_state(emb, stream=False)
        chunks = [t2w.step([(st, toks, True)])[0]]
        while not st.done:
            chunks.append(t2w.step([(st, [], True)])[0])
        assert (len(chunks) == 1) == one_chunk
        assert max(c.numel() for c in chunks) <= (n if one_chunk else 206) * 2 * 480
        assert abs(sum(c.numel() for c in chunks) - 2 * length * 480) <= 2 * 480


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_a_whole_utterance_after_a_long_prompt_goes_in_hops(t2w, spk, vocab):
    """A short non-stream reply after a long recording (its one flow call past max_whole_tokens
    with the prompt's positions) goes in hops too: the prompt in pieces first, no flow call
    over more than a hop's new frames, all the audio. Under the bound it stays one call."""
    t2w = make_token2wav(t2w.flow, t2w.hift)  # the final chunk over the cache, as served
    emb, pt, pf = _speaker(spk, _zero_shot(spk))
    reps = -(-t2w.cfg.max_whole_tokens // pt.numel())
    toks = _random_tokens(40, 6, vocab)
    frames: list[int] = []
    hook = t2w.flow.decoder.estimator.register_forward_hook(
        lambda m, a, out: frames.append(out.shape[-1])
    )
    try:
        for times, one_call in ((1, True), (reps, False)):
            frames.clear()
            st = t2w.new_state(emb, pt.repeat(times), pf.repeat(times, 1), stream=False)
            chunks = [c for c in t2w.stream(st, [toks])]  # the input ends with the tokens
            calls = frames[:: t2w.flow.cfg.n_timesteps]
            assert (len(calls) == 1) == one_call and len(chunks) == 1, calls
            if not one_call:
                assert max(calls) <= 2 * t2w.cfg.token_max_hop_len and st.in_hops
            assert abs(sum(c.numel() for c in chunks) - 2 * len(toks) * 480) <= 2 * 480
    finally:
        hook.remove()
    assert t2w.flow.pool.held == 0


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_a_long_whole_utterance_without_room_for_its_cache_ends_in_one_call(family, spk, vocab):
    """Once the flow caches' memory bound takes a whole utterance's cache, its hops would each
    recompute all before them (the cost growing with every hop): the rest goes in one call.
    With no room for a cache at all it is never cut into hops."""
    d = FAMILIES[family] / "model"
    emb = spk[_sft(spk)[0]]["embedding"]
    for mb, n_chunks in ((1e-6, 2), (0, 1)):
        t = make_token2wav(load_flow(d), load_hift(d), flow_cache_mb=mb)
        length = t.cfg.max_whole_tokens + 260
        st = t.new_state(emb, stream=False)
        chunks = [t.step([(st, _random_tokens(length, 5, vocab), True)])[0]]
        while not st.done:
            chunks.append(t.step([(st, [], True)])[0])
        assert len(chunks) == n_chunks, [c.numel() for c in chunks]
        assert abs(sum(c.numel() for c in chunks) - 2 * length * 480) <= 2 * 480


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_speed(t2w, spk, vocab):
    emb = spk[_sft(spk)[0]]["embedding"]
    toks = _random_tokens(60, 3, vocab)
    n1 = t2w.synthesize(t2w.new_state(emb, stream=False), toks).numel()
    n2 = t2w.synthesize(t2w.new_state(emb, stream=False, speed=2.0), toks).numel()
    assert n1 == 120 * 480 and n2 == int(120 / 2.0) * 480
    ns = t2w.synthesize(t2w.new_state(emb, stream=True, speed=2.0), toks).numel()
    assert abs(ns - n2) <= 2 * 480


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_empty_and_misuse(t2w, spk, vocab):
    sft = _sft(spk)
    st = t2w.new_state(spk[sft[0]]["embedding"])
    (c,) = t2w.step([(st, [], True)])
    assert st.done and c.numel() == 0
    with pytest.raises(ValueError):
        t2w.step([(st, [1], True)])
    st = t2w.new_state(spk[sft[0]]["embedding"])
    other = t2w.new_state(spk[sft[-1]]["embedding"])
    with pytest.raises(ValueError, match="item 1"):  # out of vocab: refused before any change
        t2w.step([(other, [1, 2], False), (st, [3, vocab], False)])
    assert other.tokens == [] and st.tokens == []
    assert t2w.step([(st, list(range(27)), False)]) == [None]  # 25 + 3 look-ahead needed
    assert t2w.step([(st, [5], False)])[0].numel() == 42 * 480


@pytest.mark.parametrize(
    "family", family_params("e2e_sft.npz", "v3"), indirect=True, scope="module"
)
def test_v3_keeps_a_window_of_mel(t2w, spk, vocab):
    """A v3 request keeps the vocoder's window, not the utterance's mel: after every chunk at most
    R + f0 context + held-back frames, however many chunks came before."""
    h = t2w.hift
    bound = h.receptive_field() + h.f0_context() + h.held_back()
    st = t2w.new_state(spk[_sft(spk)[0]]["embedding"], seed=1)
    n = 0
    for _ in t2w.stream(st, [_random_tokens(290, 9, vocab)]):
        n += 1
        assert st.done or st.vocoder.mel.shape[-1] <= bound
    assert n == 5 and st.n_samples == 2 * 290 * 480


@pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")
def test_slow_speech_comes_in_chunks_no_longer_than_at_speed_one(t2w, spk, vocab):
    """Speed 0.25 makes each token's audio (and the vocoder's work) four times longer: hops
    shrink with the speed, so one request's chunk costs a step no more than at speed 1 (before,
    a stream's 100-token hops were 16 s of audio each, and a whole utterance of 30 s of speech
    two minutes in one call), and a whole utterance goes in hops past a quarter of the usual
    length."""
    emb = spk[_sft(spk)[0]]["embedding"]
    toks = _random_tokens(400, 5, vocab)

    def chunks(**kw) -> list[int]:
        st = t2w.new_state(emb, **kw)
        out = [t2w.step([(st, toks, True)])[0]]
        while not st.done:
            out.append(t2w.step([(st, [], True)])[0])
        return [c.numel() for c in out]

    longest = max(chunks(stream=True))  # at speed 1: a 100-token hop (4 s)
    for kw in (dict(stream=True), dict(stream=False)):
        slow = chunks(speed=0.25, **kw)
        assert max(slow) <= 1.2 * longest, (kw, slow)  # a final chunk has the lookahead too
        assert abs(sum(slow) - 4 * 2 * 400 * 480) <= 4 * 2 * 480 * 2, (kw, sum(slow))
