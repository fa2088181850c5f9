"""Flow (speech tokens -> mel) of every family against <golden>/<family>/flow.npz: strict loading
and the config read from the yaml for all; then what the golden README records per family:

* v1 ``MaskedDiffWithXvec``: mel and returned flow cache with the recorded per-call noise;
* v2 ``CausalMaskedDiffWithXvec`` and v3 ``CausalMaskedDiffWithDiT``: the fixed CFM noise,
  estimator calls, the encoder (v2) / pre-lookahead (v3) output, whole-utterance mels and the
  streaming chunk calls (batched and alone), chunk-prefix consistency.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
import torch
from _fixtures import (
    FAMILIES,
    FAMILY_YAML,
    ONE_THREAD,
    family_params,
    flow_input,
    load_tensors,
    needs,
    raw_yaml,
    yaml_value,
)
from conftest import assert_close

from cosyvoice.config import read_yaml
from cosyvoice.flow import FlowConfig, FlowModel, build_flow, fixed_noise, load_flow
from cosyvoice.flow.v1 import FlowV1, FlowV1Config

MEL_TOL = 1e-4  # golden README: flow mel after 10 Euler steps with CFG
BATCH_TOL = 1e-5  # same request alone vs in a padded batch (float32 reassociation only)
PREFIX_TOL = 1e-5  # a chunk-aligned streaming call vs the same frames of a longer one

# Streaming format of upstream CosyVoice2Model (inherited by v3): 25-token attention chunks,
# 3 look-ahead tokens, 2 mel frames per token.
CHUNK_TOKENS = 25
LOOKAHEAD = 3
MEL_PER_TOKEN = 2

ALL = family_params("flow.npz", "v1", "v2", "v3")
CAUSAL = family_params("flow.npz", "v2", "v3")
# a key whose absence a strict load must refuse (v3: a persistent buffer, not a parameter)
REQUIRED_KEY = {
    "v1": "encoder_proj.weight",
    "v2": "encoder.pre_lookahead_layer.conv1.weight",
    "v3": "decoder.estimator.rotary_embed.inv_freq",
}
# estimator probes each family's flow.npz records (golden README): v3 adds a later Euler step,
# the prompt case and the streaming (chunk-masked) variant
EST_PROBES = {
    "v2": {"A_est_call0"},
    "v3": {"A_est_call0", "A_est_call5", "B_est_call0", "A2_est_call0"},
}

pytestmark = ONE_THREAD


@pytest.fixture(scope="module")
def flow(family):
    m = load_flow(FAMILIES[family] / "model")
    assert isinstance(m, FlowV1 if family == "v1" else FlowModel)
    return m


@pytest.fixture(scope="module")
def fx(family) -> dict[str, torch.Tensor]:
    return load_tensors(FAMILIES[family] / "flow.npz")


def _checkpoint(family: str) -> dict[str, torch.Tensor]:
    return torch.load(FAMILIES[family] / "model" / "flow.pt", map_location="cpu", weights_only=True)


def _whole_cases(fx) -> list[tuple[str, str, bool]]:
    """(key, case, streaming) for every whole-utterance mel in flow.npz (A, B, A2)."""
    out = []
    for k in fx:
        m = re.fullmatch(r"([A-Z])\d?_mel(_streaming_finalize)?", k)
        if m:
            out.append((k, m.group(1), m.group(2) is not None))
    return out


def _chunk_cases(family: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(case, index, schedule entry) for every streaming-chunk call (C, D) in the json."""
    js = json.loads((FAMILIES[family] / f"fixtures_{family}.json").read_text(encoding="utf-8"))
    return [
        (c, i, s)
        for c, v in js["flow"]["cases"].items()
        if isinstance(v, dict)
        for i, s in enumerate(v["schedule"])
    ]


def _est_calls(fx) -> list[tuple[str, str, bool]]:
    """(probe, input probe, streaming) for every recorded estimator output. A2 probes reuse A's
    inputs with streaming=True; later Euler steps record only x and t (the rest as call 0)."""
    out = []
    for k in fx:
        m = re.fullmatch(r"(A2|[A-Z])_est_call(\d+)_dphi_dt", k)
        if m:
            case, n = m.groups()
            src = f"A_est_call{n}" if case == "A2" else f"{case}_est_call{n}"
            out.append((f"{case}_est_call{n}", src, case == "A2"))
    return out


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """How many numbered blocks ``pattern`` (with one ``(\\d+)`` group) finds in the keys."""
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


# ------------------------------------------------------------------------------ all families


@pytest.mark.parametrize("family", ALL, indirect=True, scope="module")
def test_strict_load(family, flow):
    sd = _checkpoint(family)
    got = flow.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():  # incl. buffers such as v3's decoder.estimator.rotary_embed.inv_freq
        assert torch.equal(got[k], v), k

    def fresh():
        return FlowV1(flow.cfg) if family == "v1" else build_flow(flow.cfg)

    bad = dict(sd)
    bad["decoder.estimator.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        fresh().load_state_dict(bad, strict=True)
    bad = dict(sd)
    bad.pop(REQUIRED_KEY[family])
    with pytest.raises(RuntimeError):
        fresh().load_state_dict(bad, strict=True)


# config field -> yaml path, for the fields the checkpoint shapes do not show
YAML_FIELDS = {
    "v1": {
        "heads": "flow.encoder.attention_heads",
        "linear_units": "flow.encoder.linear_units",
        "est_head_dim": "flow.decoder.estimator.attention_head_dim",
        "est_num_heads": "flow.decoder.estimator.num_heads",
        "est_n_blocks": "flow.decoder.estimator.n_blocks",
        "est_num_mid_blocks": "flow.decoder.estimator.num_mid_blocks",
        "cfg_rate": "flow.decoder.cfm_params.content.inference_cfg_rate",
        "input_frame_rate": "flow.input_frame_rate",
        "sample_rate": "sample_rate",
    },
    "v2": {
        "heads": "flow.encoder.attention_heads",
        "linear_units": "flow.encoder.linear_units",
        "chunk_size": "flow.encoder.static_chunk_size",
        "est_chunk": "flow.decoder.estimator.static_chunk_size",
        "est_head_dim": "flow.decoder.estimator.attention_head_dim",
        "est_num_heads": "flow.decoder.estimator.num_heads",
        "est_n_blocks": "flow.decoder.estimator.n_blocks",
        "est_num_mid_blocks": "flow.decoder.estimator.num_mid_blocks",
        "cfg_rate": "flow.decoder.cfm_params.content.inference_cfg_rate",
        "token_mel_ratio": "flow.token_mel_ratio",
        "pre_lookahead_len": "flow.pre_lookahead_len",
    },
    "v3": {
        "chunk_size": "chunk_size",  # the yaml's "streaming inference chunk size, in token"
        "est_chunk": "flow.decoder.estimator.static_chunk_size",
        "dit_heads": "flow.decoder.estimator.heads",
        "dit_dim_head": "flow.decoder.estimator.dim_head",
        "dit_ff_mult": "flow.decoder.estimator.ff_mult",
        "cfg_rate": "flow.decoder.cfm_params.content.inference_cfg_rate",
        "token_mel_ratio": "flow.token_mel_ratio",
        "pre_lookahead_len": "flow.pre_lookahead_len",
    },
}


def _fields_from_checkpoint(family: str, sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Config fields read off the tensor shapes upstream saved in flow.pt."""
    emb, spk = sd["input_embedding.weight"].shape, sd["spk_embed_affine_layer.weight"].shape
    out: dict[str, Any] = {
        "vocab_size": emb[0],
        "input_size": emb[1],
        "output_size": spk[0],
        "spk_embed_dim": spk[1],
    }
    if family == "v3":
        out["dit_dim"] = sd["decoder.estimator.transformer_blocks.0.attn.to_q.weight"].shape[1]
        out["dit_depth"] = _count(sd, r"decoder\.estimator\.transformer_blocks\.(\d+)\.")
        out["pre_lookahead_channels"] = sd["pre_lookahead_layer.conv1.weight"].shape[0]
        return out
    levels = _count(sd, r"decoder\.estimator\.down_blocks\.(\d+)\.")
    first = [
        sd[f"decoder.estimator.down_blocks.{i}.0.block1.block.0.weight"] for i in range(levels)
    ]
    out["est_in_channels"] = first[0].shape[1]
    out["num_blocks"] = _count(sd, r"encoder\.encoders\.(\d+)\.")
    if family == "v1":
        out["est_channels"] = tuple(w.shape[0] for w in first)
        out["enc_size"] = sd["encoder.embed.out.0.weight"].shape[0]
    else:
        assert levels == 1, "FlowConfig models the single-level v2 U-Net"
        out["est_channels"] = first[0].shape[0]
    return out


@pytest.mark.parametrize("family", ALL, indirect=True, scope="module")
def test_config_from_yaml(family):
    """The parsed config against values read independently: the checkpoint's tensor shapes and
    a tag-blind reading of the yaml text."""
    path = FAMILIES[family] / "model" / FAMILY_YAML[family]
    cls = FlowV1Config if family == "v1" else FlowConfig
    cfg = cls.from_yaml(read_yaml(path))
    raw = raw_yaml(path)
    expected = _fields_from_checkpoint(family, _checkpoint(family))
    expected |= {f: yaml_value(raw, p) for f, p in YAML_FIELDS[family].items()}
    assert {f: getattr(cfg, f) for f in expected} == expected


# ------------------------------------------------------------------------------ v1


def _v1_cases() -> list:
    """(family, mel key) params for every recorded v1 case (A: no prompt, B: with prompt)."""
    p = FAMILIES["v1"] / "flow.npz"
    if not p.is_file():
        return [pytest.param("v1", None, id="v1", marks=needs(p))]
    keys = sorted(k for k in np.load(p) if re.fullmatch(r"[A-Z]_mel", k))
    return [pytest.param("v1", k, id=f"v1-{k}") for k in keys]


@pytest.mark.parametrize(("family", "key"), _v1_cases(), indirect=["family"], scope="module")
def test_v1_mel_and_cache(flow, fx, key):
    """v1 draws new noise on every call: replay the recorded z, compare mel and flow cache."""
    case = key[0]
    if case == "B":  # prompt = another speaker's speech_token/speech_feat/embedding (README)
        args = (fx["prompt_token"][0], fx["prompt_feat"][0], fx["prompt_embedding"][0])
    else:
        args = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 80), fx["embedding"][0])
    mel, cache = flow.inference(fx["token"][0], *args, z=fx[f"{case}_noise_z"])
    assert_close(mel, fx[key][0], MEL_TOL, what=key)
    assert_close(cache, fx[f"{case}_flow_cache_out"][0], MEL_TOL, what=f"{case} flow cache")


# ------------------------------------------------------------------------------ v2 and v3


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
def test_fixed_noise(fx):
    ref = fx["rand_noise_used"]
    assert torch.equal(fixed_noise()[:, :, : ref.shape[-1]], ref)


def test_fixed_noise_leaves_global_rng_alone():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    fixed_noise.cache_clear()
    fixed_noise()
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
def test_estimator_calls(family, flow, fx):
    calls = _est_calls(fx)
    assert {name for name, _, _ in calls} >= EST_PROBES[family]
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
        assert_close(v, fx[f"{name}_dphi_dt"], MEL_TOL, what=name)


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
@pytest.mark.parametrize("streaming", [False, True])
def test_padding_never_reaches_a_rows_frames(family, flow, fx, streaming):
    """Rows of different lengths in one padded estimator call, the padding filled with large
    random values: each row's real frames come out as the row alone gives them. The
    estimators zero nothing between blocks (causal convolutions, per-frame norms, keys past a
    row's end hidden), so a block that read rightwards or a key left unmasked fails here."""
    est, g = flow.decoder.estimator, torch.Generator().manual_seed(7)
    src = fx["A_est_call0_mu"]
    c, full = src.shape[1], src.shape[-1]
    lens = [full, full - 13, full // 2]
    ins = {k: torch.randn(len(lens), c if k != "spks" else 80, full, generator=g) * 50
           for k in ("x", "mu", "cond", "spks")}  # fmt: skip
    ins["spks"] = ins["spks"][:, :, 0]
    mask = torch.zeros(len(lens), 1, full)
    for i, n in enumerate(lens):
        mask[i, :, :n] = 1.0
        for k in ("x", "mu", "cond"):  # real frames from the fixture, the same for every row
            ins[k][i, :, :n] = torch.as_tensor(
                fx["A_est_call0_x" if k == "x" else f"A_est_call0_{k}"]
            )[0, :, :n]
    t, stream = torch.full((len(lens),), 0.3), torch.full((len(lens),), streaming)
    with torch.inference_mode():
        v = est(ins["x"], mask, ins["mu"], t, ins["spks"], ins["cond"], stream)
        for i, n in enumerate(lens):
            one = {
                k: x[i : i + 1, ..., :n] if x.dim() == 3 else x[i : i + 1] for k, x in ins.items()
            }
            alone = est(one["x"], mask[i : i + 1, :, :n], one["mu"], t[:1], one["spks"],
                        one["cond"], stream[:1])  # fmt: skip
            assert torch.isfinite(v[i]).all()
            assert_close(v[i, :, :n], alone[0], BATCH_TOL, what=f"row {i} ({n} frames)")


@pytest.mark.parametrize("family", family_params("flow.npz", "v2"), indirect=True, scope="module")
def test_encoder_mu(flow, fx):
    with torch.inference_mode():
        mu, lens = flow.encode([flow_input(fx, "A")])
    assert lens[0] == fx["A_mu"].shape[1]
    assert_close(mu, fx["A_mu"], MEL_TOL, what="A_mu")


@pytest.mark.parametrize("family", family_params("flow.npz", "v3"), indirect=True, scope="module")
def test_pre_lookahead(flow, fx):
    """v3 has no conformer: mu is the pre-lookahead output, each token repeated per mel frame."""
    with torch.inference_mode():
        mu, _ = flow.encode([flow_input(fx, "A")])
    assert_close(mu[:, ::MEL_PER_TOKEN], fx["A_h"], MEL_TOL, what="A_h")
    assert torch.equal(mu[:, ::2], mu[:, 1::2])


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
def test_whole_utterance_batched_and_alone(flow, fx):
    cases = _whole_cases(fx)
    assert {k.split("_")[0] for k, _, _ in cases} == {"A", "B", "A2"}  # README's cases
    inps = [flow_input(fx, c, streaming=s) for _, c, s in cases]
    batched = flow.inference(inps)
    for (key, _, _), inp, mb in zip(cases, inps, batched, strict=True):
        assert_close(mb, fx[key][0], MEL_TOL, what=key)
        (alone,) = flow.inference([inp])
        assert_close(alone, mb, BATCH_TOL, what=f"{key} alone vs batched")


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
def test_bf16_autocast_stays_near_float32(flow, fx):
    """bf16 is the GPU default. The Euler schedule was made in mu's dtype, bf16 under
    autocast, so the first step was 5% short and v2's mel 7% off float32's (relative mean
    error); with the schedule in float32 it is 0.7%. The gate leaves room for bf16 matmuls."""
    inps = [flow_input(fx, c) for c in ("A", "B")]
    ref = flow.inference(inps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = flow.inference(inps)
    for g, r in zip(got, ref, strict=True):
        rel = float((g.float() - r).abs().mean() / r.abs().mean())
        assert rel < 0.02, rel


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
def test_chunks_and_whole_in_one_batch(family, flow, fx):
    """Every chunk call of the C/D schedules together with the whole-utterance cases in ONE
    batched call (mixed streaming flags, prompt / no prompt, different lengths): raw and
    offset-sliced mels; the first and the last chunk call again alone (the whole-utterance ones
    are checked alone in test_whole_utterance_batched_and_alone)."""
    chunks = _chunk_cases(family)
    recorded = {k for k in fx if re.fullmatch(r"[A-Z]_chunk\d+_mel_raw", k)}
    assert recorded and recorded == {f"{c}_chunk{i}_mel_raw" for c, i, _ in chunks}
    keys: list[tuple[str, int | None]] = []  # (raw mel key, mel offset of the emitted part)
    inps = []
    for key, c, s in _whole_cases(fx):
        keys.append((key, None))
        inps.append(flow_input(fx, c, streaming=s))
    first_chunk = len(inps)
    for c, i, s in chunks:
        keys.append((f"{c}_chunk{i}_mel_raw", s["token_offset"] * MEL_PER_TOKEN))
        inps.append(flow_input(fx, c, s["n_tok"], s["streaming"], s["finalize"]))
    outs = flow.inference(inps)
    for (key, off), o in zip(keys, outs, strict=True):
        assert_close(o, fx[key][0], MEL_TOL, what=key)
        if off is not None:
            emitted = key.removesuffix("_raw")
            assert_close(o[:, off:], fx[emitted][0], MEL_TOL, what=emitted)
    for i in (first_chunk, len(inps) - 1):
        (alone,) = flow.inference([inps[i]])
        assert_close(alone, outs[i], BATCH_TOL, what=f"{keys[i][0]} alone vs batched")


@pytest.mark.parametrize("family", CAUSAL, indirect=True, scope="module")
def test_chunk_prefix_consistency(flow, fx):
    """Chunk-aligned streaming calls leave earlier frames unchanged (fixed noise + chunk masks +
    causal convs + real look-ahead)."""
    n1, n2 = CHUNK_TOKENS + LOOKAHEAD, 2 * CHUNK_TOKENS + LOOKAHEAD
    a, b = flow.inference(
        [flow_input(fx, "A", n1, True, False), flow_input(fx, "A", n2, True, False)]
    )
    assert a.shape[-1] == CHUNK_TOKENS * MEL_PER_TOKEN
    assert b.shape[-1] == 2 * CHUNK_TOKENS * MEL_PER_TOKEN
    assert_close(b[:, : a.shape[-1]], a, PREFIX_TOL, what="prefix")


# ------------------------------------------------------------------------------ full size


@pytest.mark.parametrize(
    ("cfg", "n_tensors", "n_values", "shapes"),
    [
        pytest.param(  # spec: the released CosyVoice2 flow.pt
            FlowConfig(),
            1121,
            112_549_360,
            {"decoder.estimator.down_blocks.0.1.0.attn1.to_q.weight": (512, 256)},
            id="v2",
        ),
        pytest.param(  # spec: CosyVoice3, incl. the rotary inv_freq buffer
            FlowConfig(input_size=80, estimator="dit"), 330, 332_257_120, {}, id="v3"
        ),
    ],
)
def test_full_size_builder_matches_spec_counts(cfg, n_tensors, n_values, shapes):
    """The builder used by bench/make_full_model.py gives the released flow.pt layout with the
    tensor / value counts the spec derives."""
    with torch.device("meta"):
        sd = build_flow(cfg).state_dict()
    assert len(sd) == n_tensors
    assert sum(v.numel() for v in sd.values()) == n_values
    for k, shape in shapes.items():
        assert sd[k].shape == shape, k
