"""Write a FULL-SIZE random-weight CosyVoice2-0.5B model dir in the official layout.

No model download, but it needs the golden fixtures' ``cosyvoice2/`` (README, Quickstart): every
size comes from the released ``cosyvoice2.yaml``, which we rebuild from the tiny golden yaml by
reversing the edits that made it tiny (and the release's ``filter.max_length``). Weights are
random; tokenizer/ONNX files are the tiny golden stand-ins (``--assets-from`` a real dir).
Output (default ``bench/out/CosyVoice2-0.5B``, git-ignored) loads with ``cosyvoice.load``
like the real dir.

    uv run python bench/make_full_model.py [--out DIR] [--seed 0] [--no-flow-hift]

flow.pt / hift.pt are produced by the builders of ``cosyvoice.flow`` / ``cosyvoice.hift``
(``build_flow(FlowConfig.from_yaml(cfg))``, ``build_hift(HiFTConfig.from_yaml(cfg))``); if
those packages are unavailable the files are skipped with a message (hook: ``write_backhalf``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from golden.paths import resolve_golden_dir  # noqa: E402  (where the tests find them)
from report import BUILDING, COMPLETE  # noqa: E402

from cosyvoice.config import llm_config, read_yaml  # noqa: E402
from cosyvoice.llm.lm import UNUSED_KEYS, QwenSpeechLM  # noqa: E402

# (section path, key, tiny value, released value): the edits that made the golden yaml tiny, reversed
YAML_EDITS: list[tuple[str, str, str, str]] = [
    ("", "llm_input_size", "64", "896"),
    ("", "llm_output_size", "64", "896"),
    ("llm", "speech_token_size", "512", "6561"),
    ("flow", "vocab_size", "512", "6561"),
    ("flow.encoder", "attention_heads", "2", "8"),
    ("flow.encoder", "linear_units", "32", "2048"),
    ("flow.encoder", "num_blocks", "1", "6"),
    ("flow.decoder.estimator", "channels", "[64]", "[256]"),
    ("flow.decoder.estimator", "attention_head_dim", "16", "64"),
    ("flow.decoder.estimator", "n_blocks", "1", "4"),
    ("flow.decoder.estimator", "num_mid_blocks", "2", "12"),
    ("flow.decoder.estimator", "num_heads", "2", "8"),
    ("hift", "base_channels", "64", "512"),
    ("hift.f0_predictor", "cond_channels", "32", "512"),
    ("filter", "max_length", "6000", "40960"),  # the release's value, not the example conf's
]

# Qwen2-0.5B's shape, as CosyVoice-BlankEN/config.json of the release
QWEN_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "model_type": "qwen2",
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def full_yaml(tiny_text: str) -> str:
    """Apply YAML_EDITS by walking the indentation to find each key in its section."""
    lines = tiny_text.splitlines(keepends=True)
    for section, key, old, new in YAML_EDITS:
        hits = [i for i in _find_key(lines, section, key) if _value(lines[i]) == old]
        if len(hits) != 1:
            raise RuntimeError(f"yaml edit {section}.{key}={old}: found {len(hits)} matches")
        i = hits[0]
        lines[i] = re.sub(
            r"(:\s*)" + re.escape(old), lambda m, new=new: m.group(1) + new, lines[i], count=1
        )
    text = "".join(lines)
    # the release predates the online-feature additions of the example conf
    text = re.sub(r"\n    num_frames: 960", "", text)
    text = re.sub(r"compute_whisper_fbank: !name:[^\n]*\n(?:    [^\n]*\n)*", "", text)
    text = text.replace("    !ref <compute_whisper_fbank>,\n", "")
    return text


def _value(line: str) -> str:
    v = line.split(":", 1)[1].split("#", 1)[0].strip()
    return v


def _find_key(lines: list[str], section: str, key: str):
    """Indices of lines ``key:`` whose ancestor keys (by indentation) equal ``section``."""
    want = [s for s in section.split(".") if s]
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        s = line.rstrip("\n")
        if not s.strip() or s.lstrip().startswith("#"):
            continue
        m = re.match(r"^(\s*)([A-Za-z_][\w]*)\s*:", s)
        if not m:
            continue
        ind, k = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= ind:
            stack.pop()
        if k == key and [x[1] for x in stack] == want:
            yield i
        stack.append((ind, k))


@torch.no_grad()
def write_llm(out: Path, cfg: dict, seed: int) -> None:
    lc = llm_config("v2", cfg, out)
    torch.manual_seed(seed)
    net = QwenSpeechLM(lc)
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)
    sd = net.state_dict()
    # tied lm_head stored with the same storage as embed_tokens, as in the release
    sd[UNUSED_KEYS[0]] = sd["llm.model.model.embed_tokens.weight"]
    torch.save(sd, out / "llm.pt")


def write_backhalf(out: Path, cfg: dict, seed: int) -> None:
    """Hook for the token2wav half: flow.pt and hift.pt from cosyvoice.flow/hift builders."""
    try:
        from cosyvoice.flow.flow import FlowConfig, build_flow
        from cosyvoice.hift.hift import HiFTConfig, build_hift
    except ImportError as e:
        print(f"[make_full_model] skipping flow.pt/hift.pt: {e}")
        return
    torch.manual_seed(seed + 1)
    torch.save(build_flow(FlowConfig.from_yaml(cfg)).state_dict(), out / "flow.pt")
    torch.manual_seed(seed + 2)
    torch.save(build_hift(HiFTConfig.from_yaml(cfg)).state_dict(), out / "hift.pt")


def write_spk2info(out: Path, cfg: dict, seed: int) -> None:
    """One SFT-format speaker (random x-vector) and one zero-shot entry computed by our own
    frontend from a synthetic 3 s waveform (stand-in ONNX models)."""
    from cosyvoice.frontend.tokenizer import QwenTokenizer
    from cosyvoice.speakers import PromptExtractor

    rng = np.random.default_rng(seed)
    sr = 24000
    t = np.arange(3 * sr) / sr
    wav = 0.3 * np.sin(2 * np.pi * np.cumsum(120 + 300 * t / 3) / sr) + 0.01 * rng.standard_normal(
        len(t)
    )
    emb, tokens, feat = PromptExtractor(out, "v2", cfg).extract(wav.astype(np.float32), sr)
    text = QwenTokenizer(out / "CosyVoice-BlankEN").encode("希望你以后能够做的比我还好呦。")
    i32 = torch.int32
    tok = torch.tensor([tokens], dtype=i32)
    info = {
        "bench_sft": {
            "embedding": torch.from_numpy(rng.standard_normal((1, 192)).astype(np.float32))
        },
        "bench_zs": {
            "prompt_text": torch.tensor([text], dtype=i32),
            "prompt_text_len": torch.tensor([len(text)], dtype=i32),
            "llm_prompt_speech_token": tok,
            "llm_prompt_speech_token_len": torch.tensor([len(tokens)], dtype=i32),
            "flow_prompt_speech_token": tok,
            "flow_prompt_speech_token_len": torch.tensor([len(tokens)], dtype=i32),
            "prompt_speech_feat": feat,
            "prompt_speech_feat_len": torch.tensor([feat.shape[1]], dtype=i32),
            "llm_embedding": emb,
            "flow_embedding": emb,
        },
    }
    torch.save(info, out / "spk2info.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "CosyVoice2-0.5B")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flow-hift", action="store_true", help="LLM side only")
    ap.add_argument(
        "--assets-from",
        type=Path,
        default=None,
        help="a real CosyVoice2 dir: copy its tokenizer files and ONNX models instead of the stand-ins",
    )
    args = ap.parse_args()
    refuse_foreign(args.out)
    src = resolve_golden_dir() / "cosyvoice2" / "model"
    if not (src / "cosyvoice2.yaml").is_file():
        sys.exit(f"no golden CosyVoice2 dir at {src}: put the golden fixtures at .golden/ or "
                 "set COSYVOICE_GOLDEN=DIR (README, Quickstart)")  # fmt: skip
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILDING).touch()
    (out / COMPLETE).unlink(missing_ok=True)  # a rebuild cut short must not pass for whole
    (out / "CosyVoice-BlankEN").mkdir(parents=True, exist_ok=True)

    (out / "cosyvoice2.yaml").write_text(
        full_yaml((src / "cosyvoice2.yaml").read_text("utf-8")), "utf-8"
    )
    blank = out / "CosyVoice-BlankEN"
    (blank / "config.json").write_text(json.dumps(QWEN_CONFIG, indent=2) + "\n")
    # stand-ins: tiny tokenizer files and ONNX models, unless real ones are given
    real = args.assets_from
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        p = real / "CosyVoice-BlankEN" / name if real else None
        shutil.copy2(p if p and p.is_file() else src / "CosyVoice-BlankEN" / name, blank / name)
    for name in ("campplus.onnx", "speech_tokenizer_v2.onnx"):
        p = real / name if real else None
        shutil.copy2(p if p and p.is_file() else src / name, out / name)

    cfg = read_yaml(out / "cosyvoice2.yaml", {"qwen_pretrain_path": str(blank)})
    print("[make_full_model] llm.pt ...", flush=True)
    write_llm(out, cfg, args.seed)
    write_spk2info(out, cfg, args.seed)
    if not args.no_flow_hift:
        print("[make_full_model] flow.pt / hift.pt ...", flush=True)
        write_backhalf(out, cfg, args.seed)
    for p in sorted(out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>14,d}  {p.relative_to(out)}")
    (out / COMPLETE).write_text("written whole by bench/make_full_model.py\n")
    (out / BUILDING).unlink()


def refuse_foreign(out: Path) -> None:
    """Exit unless ``out`` is new, empty or this script's own: it overwrites the yaml and the
    weights, and a real model dir (or the golden one, ``--out`` being a benchmark's
    ``--model``) must never get random weights."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / COMPLETE).exists() or (out / BUILDING).exists():
        return
    sys.exit(f"{out} holds files this script did not write (a model dir?): not overwriting it. "
             "Give --out a new or empty folder.")  # fmt: skip


if __name__ == "__main__":
    main()
