"""CosyVoice2 flow (CausalMaskedDiffWithXvec) against the golden fixtures: estimator, encoder,
whole-utterance and streaming-chunk mels, strict loading, batch invariance."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _fixtures import ONE_THREAD, family_dir, flow_input, load_arrays, needs

from cosyvoice.flow import FlowConfig, build_flow, fixed_noise, load_flow

MEL_TOL = 1e-4  # golden README: flow mel after 10 Euler steps with CFG
BATCH_TOL = 1e-5  # same request alone vs in a padded batch (float32 reassociation only)


D = family_dir("cosyvoice2")
pytestmark = [needs(D / "flow.npz"), ONE_THREAD]


@pytest.fixture(scope="module")
def fx():
    return load_arrays(D / "flow.npz")


@pytest.fixture(scope="module")
def flow():
    return load_flow(D / "model")


def _schedules() -> dict:
    return json.loads((D / "fixtures_v2.json").read_text())["flow"]["cases"]


def _whole_cases(fx):
    """(key, case, streaming) for every whole-utterance mel in the fixture."""
    out = []
    for k in fx:
        m = re.fullmatch(r"([A-Z]\d?)_mel(_streaming_finalize)?", k)
        if m:
            out.append((k, m.group(1)[0], m.group(2) is not None))
    return out


def _chunk_cases():
    sched = _schedules()
    return [
        (c, i, s)
        for c, v in sched.items()
        if isinstance(v, dict)
        for i, s in enumerate(v["schedule"])
    ]


def test_strict_load_and_key_layout(flow):
    sd = torch.load(D / "model" / "flow.pt", map_location="cpu", weights_only=True)
    assert set(flow.state_dict()) == set(sd)
    bad = dict(sd)
    bad["decoder.estimator.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        build_flow(flow.cfg).load_state_dict(bad, strict=True)
    bad = dict(sd)
    bad.pop("encoder.pre_lookahead_layer.conv1.weight")
    with pytest.raises(RuntimeError):
        build_flow(flow.cfg).load_state_dict(bad, strict=True)


def test_fixed_noise(fx):
    ref = fx["rand_noise_used"]
    assert np.array_equal(fixed_noise()[:, :, : ref.shape[-1]].numpy(), ref)
    # drawing the buffer must not disturb the global RNG
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    fixed_noise.cache_clear()
    fixed_noise()
    assert torch.equal(torch.rand(3), a)


def test_estimator_call(flow, fx):
    a = {
        k: torch.from_numpy(fx[f"A_est_call0_{k}"])
        for k in ("x", "mask", "mu", "t", "spks", "cond")
    }
    with torch.inference_mode():
        v = flow.decoder.estimator(a["x"], a["mask"], a["mu"], a["t"], a["spks"], a["cond"],
                                   torch.zeros(2, dtype=torch.bool))  # fmt: skip
    np.testing.assert_allclose(v.numpy(), fx["A_est_call0_dphi_dt"], atol=MEL_TOL, rtol=0)


def test_encoder_mu(flow, fx):
    with torch.inference_mode():
        mu, lens = flow.encode([flow_input(fx, "A")])
    assert int(lens[0]) == fx["A_mu"].shape[1]
    np.testing.assert_allclose(mu.numpy(), fx["A_mu"], atol=MEL_TOL, rtol=0)


def test_whole_utterance_batched_and_alone(flow, fx):
    cases = _whole_cases(fx)
    assert len(cases) >= 3, "expected A, B and A2 mels in flow.npz"
    inps = [flow_input(fx, c, streaming=s) for _, c, s in cases]
    batched = flow.inference(inps)
    for (key, _, _), inp, mb in zip(cases, inps, batched, strict=True):
        ref = fx[key][0]
        assert mb.shape == ref.shape, key
        np.testing.assert_allclose(mb.numpy(), ref, atol=MEL_TOL, rtol=0, err_msg=key)
        (alone,) = flow.inference([inp])
        np.testing.assert_allclose(mb.numpy(), alone.numpy(), atol=BATCH_TOL, rtol=0, err_msg=key)


def test_streaming_chunks(flow, fx):
    """Every chunk call of the C/D schedules, all in one batched call (mixed streaming flags,
    prompt / no prompt, different lengths), raw and offset-sliced."""
    cases = _chunk_cases()
    assert cases
    inps = [flow_input(fx, c, s["n_tok"], s["streaming"], s["finalize"]) for c, _, s in cases]
    outs = flow.inference(inps)
    for (c, i, s), o in zip(cases, outs, strict=True):
        raw = fx[f"{c}_chunk{i}_mel_raw"][0]
        assert o.shape == raw.shape
        np.testing.assert_allclose(o.numpy(), raw, atol=MEL_TOL, rtol=0, err_msg=f"{c}{i}")
        sliced = o[:, s["token_offset"] * 2 :]
        np.testing.assert_allclose(sliced.numpy(), fx[f"{c}_chunk{i}_mel"][0], atol=MEL_TOL, rtol=0)


def test_chunk_prefix_consistency(flow, fx):
    """Chunk-aligned streaming calls leave earlier frames unchanged (fixed noise + chunk masks +
    causal convs + real look-ahead)."""
    a, b = flow.inference(
        [flow_input(fx, "A", 28, True, False), flow_input(fx, "A", 53, True, False)]
    )
    assert a.shape[-1] == 50 and b.shape[-1] == 100
    np.testing.assert_allclose(b[:, :50].numpy(), a.numpy(), atol=1e-5, rtol=0)


def test_config_from_yaml():
    from cosyvoice.config import read_yaml

    cfg = FlowConfig.from_yaml(read_yaml(D / "model" / "cosyvoice2.yaml"))
    assert (cfg.vocab_size, cfg.est_channels, cfg.est_chunk, cfg.chunk_size) == (512, 64, 50, 25)


def test_full_size_builder_matches_spec_counts():
    """The builder used by bench/make_full_model.py: full-size CosyVoice2 flow.pt layout with the
    tensor / parameter counts the spec derives (1121 tensors, 112,549,360 values)."""
    with torch.device("meta"):
        sd = build_flow(FlowConfig()).state_dict()
    assert len(sd) == 1121
    assert sum(v.numel() for v in sd.values()) == 112_549_360
    assert sd["decoder.estimator.down_blocks.0.1.0.attn1.to_q.weight"].shape == (512, 256)
