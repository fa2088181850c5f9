"""The released LLM shapes from the spec (§7.1-7.3), built on the meta device: key count (incl.
the tied lm_head) and unique parameter count of each family, and for CosyVoice2-0.5B also the
path through ``llm_config`` with the release's CosyVoice-BlankEN/config.json as
bench/make_full_model.py writes it. Nothing here reads the golden folder: its sizes are the tiny
fixture's, not the release's. No weights written."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import REPO_ROOT

from cosyvoice.config import QwenConfig, llm_config
from cosyvoice.llm.lm import UNUSED_KEYS, QwenSpeechLM

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Qwen2-0.5B (spec §7.2): hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
# vocab 151936, RoPE theta 1e6, RMSNorm eps 1e-6
QWEN_05B = QwenConfig(896, 24, 14, 2, 4864, 151936, 1e6, 1e-6)


def _mfm():
    spec = importlib.util.spec_from_file_location("mfm", REPO_ROOT / "bench" / "make_full_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_v2_shape(tmp_path):
    """Spec §7.2: 295 keys, 505,803,812 unique params, and the key shapes of its table."""
    (tmp_path / "CosyVoice-BlankEN").mkdir()
    (tmp_path / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(_mfm().QWEN_CONFIG))
    # the llm node of the released cosyvoice2.yaml, values from spec §7.2
    released = {"llm": {"llm_input_size": 896, "llm_output_size": 896, "speech_token_size": 6561}}
    lc = llm_config("v2", released, tmp_path)
    assert lc.qwen == QWEN_05B
    with torch.device("meta"):
        net = QwenSpeechLM(lc)
    sd = net.state_dict()
    assert len(sd) + len(UNUSED_KEYS) == 295
    assert sum(p.numel() for p in net.parameters()) == 505_803_812
    shapes = {
        "llm_embedding.weight": (2, 896),
        "llm.model.model.embed_tokens.weight": (151936, 896),
        "llm.model.model.layers.23.self_attn.k_proj.weight": (128, 896),
        "llm.model.model.layers.23.mlp.down_proj.weight": (896, 4864),
        "llm_decoder.weight": (6564, 896),
        "speech_embedding.weight": (6564, 896),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


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


def test_make_full_model_never_overwrites_a_model_it_did_not_write(tmp_path, monkeypatch):
    """A benchmark's ``--model`` is make_full_model.py's ``--out`` when that dir is not whole:
    pointed at a real (or the golden) model dir, it must leave it alone, not write random
    weights over it. Its own dirs, whole or cut short, it rebuilds."""
    mfm = _mfm()
    real = tmp_path / "CosyVoice2-0.5B"
    real.mkdir()
    (real / "cosyvoice2.yaml").write_text("the release's\n")
    monkeypatch.setattr("sys.argv", ["make_full_model.py", "--out", str(real)])
    with pytest.raises(SystemExit, match="not overwriting"):
        mfm.main()
    assert [p.name for p in real.iterdir()] == ["cosyvoice2.yaml"]
    assert (real / "cosyvoice2.yaml").read_text() == "the release's\n"
    for marker in (mfm.BUILDING, mfm.COMPLETE):  # its own: accepted (as a new or empty dir is)
        own = tmp_path / marker.strip(".")
        own.mkdir()
        (own / "cosyvoice2.yaml").write_text("random\n")
        (own / marker).touch()
        mfm.refuse_foreign(own)
    mfm.refuse_foreign(tmp_path / "new")
