"""The released CosyVoice2-0.5B shape, rebuilt by bench/make_full_model.py from the tiny golden
yaml: the yaml edits land, and our LLM built from it has exactly the released parameter count
(spec §7.2: 505,803,812 unique params, 295 keys incl. the tied lm_head). No weights written."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO_ROOT

from cosyvoice.config import QwenConfig, llm_config, read_yaml
from cosyvoice.llm.lm import UNUSED_KEYS, QwenSpeechLM

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _mfm():
    spec = importlib.util.spec_from_file_location("mfm", REPO_ROOT / "bench" / "make_full_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_v2_shape(golden_dir, tmp_path):
    tiny = golden_dir / "cosyvoice2" / "model" / "cosyvoice2.yaml"
    if not tiny.is_file():
        pytest.skip("no cosyvoice2 golden yaml")
    mfm = _mfm()
    (tmp_path / "cosyvoice2.yaml").write_text(mfm.full_yaml(tiny.read_text("utf-8")), "utf-8")
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(mfm.QWEN_CONFIG))
    cfg = read_yaml(tmp_path / "cosyvoice2.yaml")
    assert cfg["llm"]["llm_input_size"] == 896 and cfg["llm"]["speech_token_size"] == 6561
    assert cfg["flow"]["decoder"]["estimator"]["channels"] == [256]
    assert cfg["flow"]["decoder"]["estimator"]["static_chunk_size"] == 50
    assert cfg["hift"]["base_channels"] == 512
    assert "compute_whisper_fbank" not in cfg
    lc = llm_config("v2", cfg, tmp_path)
    assert lc.qwen == QwenConfig(896, 24, 14, 2, 4864, 151936, 1e6, 1e-6)
    with torch.device("meta"):
        net = QwenSpeechLM(lc)
    sd = net.state_dict()
    assert len(sd) + len(UNUSED_KEYS) == 295
    assert sum(p.numel() for p in net.parameters()) == 505_803_812
    assert tuple(sd["llm_decoder.weight"].shape) == (6564, 896)
    assert tuple(sd["llm.model.model.layers.23.self_attn.k_proj.weight"].shape) == (128, 896)


QWEN_05B = QwenConfig(896, 24, 14, 2, 4864, 151936, 1e6, 1e-6)


@pytest.mark.parametrize(
    "family,n_keys,n_params",
    [
        ("v1", 401, 310_718_465),  # spec §7.1 (instantiated upstream)
        ("v3", 293, 506_148_480),  # spec §7.3 (keys verified, count derived)
    ],
)
def test_released_shapes_other_families(family, n_keys, n_params):
    from cosyvoice.config import LLMConfig
    from cosyvoice.llm.transformer_lm import TransformerSpeechLM

    if family == "v1":
        cfg = LLMConfig(
            family="v1",
            llm_input_size=1024,
            llm_output_size=1024,
            speech_token_size=4096,
            text_token_size=51866,
            text_encoder_input_size=512,
            v1_text_encoder={
                "output_size": 1024,
                "attention_heads": 16,
                "linear_units": 4096,
                "num_blocks": 6,
            },
            v1_llm={"attention_heads": 16, "linear_units": 4096, "num_blocks": 14},
        )
    else:
        cfg = LLMConfig(
            family="v3",
            llm_input_size=896,
            llm_output_size=896,
            speech_token_size=6561,
            qwen=QWEN_05B,
        )
    with torch.device("meta"):
        net = TransformerSpeechLM(cfg) if family == "v1" else QwenSpeechLM(cfg)
    extra = 0 if family == "v1" else len(UNUSED_KEYS)
    assert len(net.state_dict()) + extra == n_keys
    assert sum(p.numel() for p in net.parameters()) == n_params
