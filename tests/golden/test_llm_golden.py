"""LLM parity with <golden>/<family>/llm.npz: teacher-forced logits, greedy decode tokens and
per-step logits (plain and zero-shot prompt). Tolerance 1e-4 abs on logits (README). Each runs
with torch's linears and with the oneDNN-packed ones ``cosyvoice.load`` uses on a CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close, family_of

from cosyvoice.config import llm_config, load_model_yaml
from cosyvoice.devices import can_pack_linears, pack_linears
from cosyvoice.llm.engine import LLMEngine, LLMRequest
from cosyvoice.llm.lm import QwenSpeechLM
from cosyvoice.llm.transformer_lm import TransformerSpeechLM

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ATOL = 1e-4

PACKED = [False] + [True] * can_pack_linears(torch.device("cpu"), torch.float32)


def _engine(family_dir, packed: bool):
    model_dir = family_dir / "model"
    fam, cfg = load_model_yaml(model_dir)
    lc = llm_config(fam, cfg, model_dir)
    net = TransformerSpeechLM(lc) if fam == "v1" else QwenSpeechLM(lc)
    net.load_checkpoint(model_dir / "llm.pt")
    if packed:
        assert pack_linears(net) > 0
    return LLMEngine(net.eval(), lc.sampling)


def _npz(family_dir):
    p = family_dir / "llm.npz"
    if not p.is_file():
        pytest.skip(f"{p} missing")
    return np.load(p)


@pytest.mark.parametrize("packed", PACKED)
def test_teacher_forced_logits(family_dir, packed):
    z = _npz(family_dir)
    eng = _engine(family_dir, packed)
    net = eng.net
    text = torch.from_numpy(z["text_token"][0]).long()
    speech = torch.from_numpy(z["tf_speech_token"][0]).long()
    emb = torch.from_numpy(z["speaker_embedding"])  # only v1 uses it
    with torch.inference_mode():
        if "text_encoder_out" in z:  # v1: causal conformer text encoder
            assert_close(net.encode_text(text), z["text_encoder_out"][0], ATOL, what="text_encoder")
        x = torch.cat([net.prefix_embeds(text, speech[:0], emb), net.speech_embedding(speech)])
        assert_close(x, z["tf_lm_input"][0], ATOL, what="lm_input")
        cache = net.new_cache(torch.float32, "cpu")
        if isinstance(net, QwenSpeechLM):
            hidden = net.qwen(x, [cache], [x.shape[0]])
        else:
            hidden = net.llm(x, [cache], [x.shape[0]])
        assert_close(hidden, z["tf_last_hidden"][0], ATOL, what="last_hidden")
        logits = net.llm_decoder(hidden)
    assert_close(logits, z["tf_logits"][0], ATOL, what="tf_logits")
    if "tf_logp" in z:
        assert_close(logits.log_softmax(-1), z["tf_logp"][0], ATOL, what="tf_logp")


@pytest.mark.parametrize("packed", PACKED)
@pytest.mark.parametrize("variant", ["plain", "zero_shot"])
def test_greedy_decode(family_dir, variant, packed):
    z = _npz(family_dir)
    eng = _engine(family_dir, packed)
    if variant == "plain":
        emb = torch.from_numpy(z["speaker_embedding"])
        req = LLMRequest(text_ids=z["text_token"][0].tolist(), greedy=True, embedding=emb)
        exp_tokens, exp_logits = z["greedy_tokens"][0], z["greedy_step_logits"]
    else:
        if "zs_text_token" not in z:
            pytest.skip("no zero-shot fixture")
        req = LLMRequest(
            text_ids=z["zs_text_token"][0].tolist(),
            prompt_text_ids=z["zs_prompt_text_token"][0].tolist(),
            prompt_speech_tokens=z["zs_prompt_speech_token"][0].tolist(),
            greedy=True,
        )
        exp_tokens, exp_logits = z["zs_greedy_tokens"][0], z["zs_greedy_step_logits"]
    step_logits = []
    while not req.done:
        eng.step([req])
        step_logits.append(req.last_logits.clone())
    assert req.out_tokens == exp_tokens.tolist()
    assert req.finish_reason == "stop"
    assert_close(torch.stack(step_logits), exp_logits, ATOL, what="greedy_step_logits")


def test_family_detection(family_dir):
    # every golden dir's yaml name maps to a family and that family's LLM class
    fam = family_of(family_dir)
    _, cfg = load_model_yaml(family_dir / "model")
    cls = cfg["llm"]["_target_"].rsplit(".", 1)[-1]
    assert {"v1": "TransformerLM", "v2": "Qwen2LM", "v3": "CosyVoice3LM"}[fam] == cls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_within_a_rounding_of_float64(dtype):
    """The LLM's RMSNorm (one op: float32 statistics inside it) against a float64 norm: in
    float32 to float32's precision, in bf16 within what HF Qwen2's order (round to bf16, then
    multiply by the weight) loses, on the test's device."""
    from _fixtures import TEST_DEVICE

    from cosyvoice.llm.qwen2 import RMSNorm

    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 896, generator=g) * 30
    norm = RMSNorm(896, 1e-6)
    norm.weight.data = torch.rand(896, generator=g) + 0.5
    x64, w64 = x.to(dtype).double(), norm.weight.to(dtype).double()
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    got = norm.to(TEST_DEVICE, dtype)(x.to(TEST_DEVICE, dtype)).double().cpu()
    xf, wf = x.to(dtype).float(), norm.weight.to(dtype).float().cpu()
    hf = wf.to(dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    bound = 1e-5 if dtype is torch.float32 else (hf.double() - ref).abs().max().item()
    assert (got - ref).abs().max().item() <= bound
