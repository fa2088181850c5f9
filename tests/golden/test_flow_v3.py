"""CosyVoice3 flow (CausalMaskedDiffWithDiT) against the golden fixtures: DiT estimator calls,
pre-lookahead output, whole-utterance and streaming-chunk mels, strict loading, batching."""

from __future__ import annotations

import json
import re

import pytest
import torch
from _fixtures import ONE_THREAD, family_dir, flow_input, load_tensors, needs

from cosyvoice.flow import build_flow, fixed_noise, load_flow

MEL_TOL = 1e-4  # golden README: flow mel
BATCH_TOL = 1e-5


D = family_dir("cosyvoice3")
pytestmark = [needs(D / "flow.npz"), ONE_THREAD]


@pytest.fixture(scope="module")
def fx():
    return load_tensors(D / "flow.npz")


@pytest.fixture(scope="module")
def flow():
    return load_flow(D / "model")


def _est_calls(fx):
    """(call prefix, input prefix, streaming) for every recorded estimator output."""
    out = []
    for k in fx:
        m = re.fullmatch(r"(A2|[A-Z])_est_call(\d+)_dphi_dt", k)
        if m:
            case, n = m.groups()
            src = f"A_est_call{n}" if case == "A2" else f"{case}_est_call{n}"
            out.append((f"{case}_est_call{n}", src, case == "A2"))
    return out


def test_strict_load(flow):
    sd = torch.load(D / "model" / "flow.pt", map_location="cpu", weights_only=True)
    assert set(flow.state_dict()) == set(sd)  # incl. decoder.estimator.rotary_embed.inv_freq
    assert torch.equal(
        flow.decoder.estimator.rotary_embed.inv_freq, sd["decoder.estimator.rotary_embed.inv_freq"]
    )
    bad = dict(sd)
    bad.pop("decoder.estimator.rotary_embed.inv_freq")
    with pytest.raises(RuntimeError):
        build_flow(flow.cfg).load_state_dict(bad, strict=True)


def test_fixed_noise(fx):
    ref = fx["rand_noise_used"]
    assert torch.equal(fixed_noise()[:, :, : ref.shape[-1]], ref)


def test_estimator_calls(flow, fx):
    calls = _est_calls(fx)
    assert len(calls) >= 3
    for name, src, streaming in calls:
        x = fx[f"{name}_x"] if f"{name}_x" in fx else fx[f"{src}_x"]
        t = fx[f"{name}_t"] if f"{name}_t" in fx else fx[f"{src}_t"]
        inp = {
            k: fx[f"{src}_{k}"] if f"{src}_{k}" in fx else fx[f"A_est_call0_{k}"]
            for k in ("mask", "mu", "spks", "cond")
        }
        with torch.inference_mode():
            v = flow.decoder.estimator(x, inp["mask"], inp["mu"], t, inp["spks"], inp["cond"],
                                       torch.full((x.shape[0],), streaming))  # fmt: skip
        err = (v - fx[f"{name}_dphi_dt"]).abs().max().item()
        assert err <= MEL_TOL, f"{name}: {err:.3g}"


def test_pre_lookahead(flow, fx):
    with torch.inference_mode():
        mu, _ = flow.encode([flow_input(fx, "A")])
    assert (mu[:, ::2] - fx["A_h"]).abs().max() <= MEL_TOL
    assert torch.equal(mu[:, ::2], mu[:, 1::2])


def test_whole_and_chunks_batched(flow, fx):
    """All whole-utterance cases and all C/D chunk calls in ONE batched call, then each alone."""
    sched = json.loads((D / "fixtures_v3.json").read_text())["flow"]["cases"]
    cases, inps = [], []
    for k in fx:
        m = re.fullmatch(r"([A-Z])\d?_mel(_streaming_finalize)?", k)
        if m:
            cases.append((k, None))
            inps.append(flow_input(fx, m.group(1), streaming=m.group(2) is not None))
    for c, v in sched.items():
        if isinstance(v, dict):
            for i, s in enumerate(v["schedule"]):
                cases.append((f"{c}_chunk{i}_mel_raw", s["token_offset"] * 2))
                inps.append(flow_input(fx, c, s["n_tok"], s["streaming"], s["finalize"]))
    assert len(cases) >= 9
    outs = flow.inference(inps)
    for (key, off), o in zip(cases, outs, strict=True):
        ref = fx[key][0]
        assert o.shape == ref.shape, key
        assert (o - ref).abs().max() <= MEL_TOL, key
        if off is not None:
            assert (o[:, off:] - fx[key.replace("_raw", "")][0]).abs().max() <= MEL_TOL
    for i in (0, 3, len(inps) - 1):
        (alone,) = flow.inference([inps[i]])
        assert (alone - outs[i]).abs().max() <= BATCH_TOL


def test_full_size_builder_matches_spec_counts():
    """Full-size CosyVoice3 flow.pt layout: 330 tensors (incl. the inv_freq buffer), 332,257,120."""
    from cosyvoice.flow import FlowConfig

    with torch.device("meta"):
        sd = build_flow(FlowConfig(input_size=80, estimator="dit")).state_dict()
    assert len(sd) == 330
    assert sum(v.numel() for v in sd.values()) == 332_257_120
