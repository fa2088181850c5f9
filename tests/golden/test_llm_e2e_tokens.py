"""Text -> speech tokens through the public API against the LLM part of <family>/e2e_sft.npz:
upstream's frontend segments, segment token ids and greedy LLM tokens per segment (SFT and
zero-shot speakers, incl. the v1 speaker-embedding input), plus the v3 silent-token filter."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cosyvoice
from cosyvoice.llm.silence import filter_silent

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _fixtures(family_dir):
    js = sorted(family_dir.glob("fixtures_*.json"))
    npz = family_dir / "e2e_sft.npz"
    if not js or not npz.is_file():
        pytest.skip("no e2e fixtures")
    return json.loads(js[0].read_text(encoding="utf-8")), np.load(npz)


def test_e2e_llm_tokens(family_dir, tmp_path):
    meta, z = _fixtures(family_dir)
    m = cosyvoice.load(family_dir / "model", speaker_dir=tmp_path)
    runs = meta["e2e_sft"]["runs"]
    assert runs
    done: dict[tuple[str, str], list[list[int]]] = {}  # stream/full runs share the LLM tokens
    for run in runs:
        segs = m.frontend.split(run["text"])
        assert segs == run["segments"], run["key"]
        if "segment_text_tokens" in run:
            assert [m.frontend.encode(s) for s in segs] == run["segment_text_tokens"]
        key = (run["text"], run["spk"])
        if key not in done:
            done[key] = []
            for seg in segs:
                req = m.new_request(seg, speaker=run["spk"], greedy=True)
                m.llm.generate(req)
                assert req.finish_reason == "stop"
                done[key].append(req.flow_tokens)
        for j, got in enumerate(done[key]):
            exp = z[f"{run['key']}_seg{j}_tokens"][0].tolist()
            assert got == exp, f"{run['key']} seg {j}"


def test_v3_silent_filter(golden_dir):
    z = golden_dir / "cosyvoice3" / "e2e_sft.npz"
    if not z.is_file():
        pytest.skip("no cosyvoice3 e2e fixture")
    d = np.load(z)
    if "silent_filter_in" not in d:
        pytest.skip("no silent filter arrays")
    got = filter_silent(d["silent_filter_in"][0].tolist())
    assert got == d["silent_filter_out"][0].tolist()


def test_v3_system_prefix_added(golden_dir, tmp_path):
    """Text without <|endofprompt|> gets upstream's canonical prefix (v3 only): the ids equal
    the golden llm.npz text tokens, which upstream built from the prefixed text."""
    d = golden_dir / "cosyvoice3"
    if not (d / "llm.npz").is_file():
        pytest.skip("no cosyvoice3 llm.npz")
    meta = json.loads((d / "fixtures_v3.json").read_text(encoding="utf-8"))["llm"]
    prefix = "You are a helpful assistant.<|endofprompt|>"
    if not meta["sft_text"].startswith(prefix):
        pytest.skip("fixture text has another prefix")
    m = cosyvoice.load(d / "model", speaker_dir=tmp_path)
    z = np.load(d / "llm.npz")
    req = m.new_request(meta["sft_text"][len(prefix) :], speaker="spk_f1", greedy=True)
    assert list(req.text_ids) == z["text_token"][0].tolist()
    assert req.min_len == meta["min_len"] and req.max_len == meta["max_len"]
    assert m.llm.generate(req) == z["greedy_tokens"][0].tolist()
    zs = m.new_request(meta["zs_text"], speaker="zs_spk1")  # prompt already has the prefix
    assert list(zs.prompt_text_ids) == z["zs_prompt_text_token"][0].tolist()
