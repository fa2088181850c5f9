"""Speakers: spk2info parity (features recomputed from spk_waves.npz), registration round trip
across processes, and the documented AudioError for unusable prompt audio."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, assert_close

import cosyvoice
from cosyvoice.frontend.audio import AudioError, resample
from cosyvoice.speakers import SpeakerError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

ATOL = 1e-4


def _load(family_dir, tmp_path):
    return cosyvoice.load(family_dir / "model", speaker_dir=tmp_path / "spk")


def test_spk2info_parity(family_dir, tmp_path):
    m = _load(family_dir, tmp_path)
    raw = torch.load(family_dir / "model" / "spk2info.pt", weights_only=True)
    waves = np.load(family_dir / "spk_waves.npz")
    info = json.loads((family_dir / "make_info.json").read_text(encoding="utf-8"))
    sr = m.sample_rate
    ex = m.speakers.extractor
    assert m.speakers.list()[: len(raw)] == list(raw)
    for name, entry in raw.items():
        w = torch.from_numpy(waves[name]).unsqueeze(0)
        w16 = resample(w, sr, 16000)
        if "embedding" in entry:  # SFT format: unaligned tokens and mel
            assert_close(ex.embedding(w16), entry["embedding"], ATOL, what=f"{name} embedding")
            assert ex.speech_tokens(w16) == entry["speech_token"][0].tolist()
            if m.family == "v1":
                # upstream quirk (golden README): v1's speech_feat was computed from audio
                # resampled to a hardcoded 24 kHz with the 22.05 kHz mel parameters. Our
                # extractor deliberately uses the model rate (spec §3.1); check the DSP on the
                # quirk's input instead.
                w = resample(w, sr, 24000)
            assert_close(ex.prompt_mel(w), entry["speech_feat"], ATOL, what=f"{name} feat")
            assert_close(m.speakers.get(name).embedding, entry["embedding"], 0.0)
        else:  # zero-shot format: register from the same audio + transcript
            # the transcript: make_info.json has it for v3; otherwise recover it from the
            # stored ids (the ids are then still checked against a fresh encode)
            text = info.get("zs_prompt_text") or m.frontend.tokenizer.decode(
                entry["prompt_text"][0].tolist(), skip_special_tokens=False
            )
            # add_zero_shot_spk stores the transcript as given (no normalisation)
            spk = m.speakers.register(f"re_{name}", (waves[name], sr), text, normalize=False)
            assert spk.prompt_text_ids == entry["prompt_text"][0].tolist()
            assert spk.prompt_speech_tokens == entry["llm_prompt_speech_token"][0].tolist()
            assert spk.prompt_speech_tokens == entry["flow_prompt_speech_token"][0].tolist()
            assert_close(spk.prompt_feat, entry["prompt_speech_feat"], ATOL, what=f"{name} feat")
            assert_close(spk.embedding, entry["llm_embedding"], ATOL, what=f"{name} emb")
            assert_close(spk.embedding, entry["flow_embedding"], ATOL, what=f"{name} emb")
            assert spk.prompt_feat.shape[1] == 2 * len(spk.prompt_speech_tokens)


def _tone(seconds: float, sr: int = 24000, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    f = 150 + 400 * t / max(seconds, 1e-3)  # chirp with AM: "voice-like" enough for stand-ins
    rng = np.random.default_rng(5)
    x = amp * np.sin(2 * np.pi * np.cumsum(f) / sr) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def _encode(wav: np.ndarray, sr: int, fmt: str, codec: str) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        s = c.add_stream(codec, rate=sr, layout="mono")
        frame = av.AudioFrame.from_ndarray(
            (wav * 32767).astype(np.int16)[None], format="s16", layout="mono"
        )
        frame.sample_rate = sr
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return buf.getvalue()


def _v2_dir(golden_dir: Path) -> Path:
    d = golden_dir / "cosyvoice2"
    if not (d / "model").is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    return d


def test_register_round_trip(golden_dir, tmp_path):
    d = _v2_dir(golden_dir)
    m = _load(d, tmp_path)
    wav = _tone(3.0, 44100)
    audio = _encode(wav, 44100, "wav", "pcm_s16le")
    spk = m.speakers.register("测试 voice-1", audio, "你好，这是一个测试。")
    assert "测试 voice-1" in m.speakers.list()
    # 3 s at 25 Hz tokens -> 75 tokens before alignment; feat frames = 2 x tokens
    assert 70 <= len(spk.prompt_speech_tokens) <= 75
    assert spk.prompt_feat.shape == (1, 2 * len(spk.prompt_speech_tokens), 80)
    assert spk.prompt_text_ids == m.frontend.encode("你好，这是一个测试。")
    with pytest.raises(SpeakerError):
        m.speakers.register("测试 voice-1", audio, "again")
    with pytest.raises(SpeakerError):
        m.speakers.delete("spk_f1")  # built-in
    # FLAC through PyAV as well; the transcript is normalised by default
    flac = m.speakers.register(
        "flac_voice", _encode(_tone(2.0, 16000), 16000, "flac", "flac"), "I have 2 cats"
    )
    assert flac.prompt_text_ids == m.frontend.encode("I have two cats")

    script = (
        "import json, sys, cosyvoice\n"
        "m = cosyvoice.load(sys.argv[1], speaker_dir=sys.argv[2])\n"
        "s = m.speakers.get('测试 voice-1')\n"
        "r = m.new_request('你好。', speaker='测试 voice-1', seed=7)\n"
        "toks = m.llm.generate(r)\n"
        "print(json.dumps({'list': m.speakers.list(), 'tokens': s.prompt_speech_tokens,\n"
        "  'emb': s.embedding.flatten().tolist(), 'n_out': len(toks)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(d / "model"), str(tmp_path / "spk")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # see conftest.torch_single_thread
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "测试 voice-1" in got["list"] and "flac_voice" in got["list"]
    assert got["tokens"] == spk.prompt_speech_tokens
    assert np.allclose(got["emb"], spk.embedding.flatten().numpy(), atol=0)
    assert got["n_out"] >= 2 * len(m.frontend.encode("你好。"))  # min_len respected

    m.speakers.delete("flac_voice")
    assert "flac_voice" not in m.speakers.list()
    m2 = _load(d, tmp_path)
    assert "flac_voice" not in m2.speakers.list() and "测试 voice-1" in m2.speakers.list()
    assert not list((tmp_path / "spk").glob(".tmp-*"))  # atomic writes left no temp files


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("not_audio", "not a supported audio file"),
        ("sdp", "not a supported audio file"),
        ("playlist", "not a supported audio file"),
        ("too_short", "too short"),
        ("just_short", r"too short: 0\.999 s < 1 s"),  # it read "1.00 s < 1 s"
        ("too_long", r"too long: 31 s > 30 s"),
        ("too_long_file", "too long"),
        ("silent", "silent"),
        ("low_rate", "below 16000"),
        ("empty_bytes", "not a supported audio file"),
    ],
)
def test_bad_audio(golden_dir, tmp_path, case, pattern):
    m = _load(_v2_dir(golden_dir), tmp_path)
    audio = {
        "not_audio": lambda: b"this is definitely not an audio file" * 50,
        # Both make FFmpeg open sockets or files if it is left to probe the format.
        "sdp": lambda: (
            b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 0.0.0.0\nt=0 0\nm=audio 5004 RTP/AVP 0\n"
        ),
        "playlist": lambda: b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",
        "too_short": lambda: _encode(_tone(0.4), 24000, "wav", "pcm_s16le"),
        "just_short": lambda: (_tone(0.9995, 16000), 16000),
        "too_long": lambda: (_tone(31.0, 16000), 16000),
        "too_long_file": lambda: _encode(_tone(45.0, 16000), 16000, "wav", "pcm_s16le"),
        "silent": lambda: _encode(np.zeros(48000, np.float32), 24000, "wav", "pcm_s16le"),
        "low_rate": lambda: _encode(_tone(2.0, 8000), 8000, "wav", "pcm_s16le"),
        "empty_bytes": lambda: b"",
    }[case]()
    with pytest.raises(AudioError, match=pattern):
        m.speakers.register("bad", audio, "text")
    assert "bad" not in m.speakers.list()


def test_leftover_temp_and_foreign_files_never_load(golden_dir, tmp_path):
    d = _v2_dir(golden_dir)
    m = _load(d, tmp_path)
    m.speakers.register("kept", _encode(_tone(2.0, 16000), 16000, "wav", "pcm_s16le"), "你好。")
    spk_dir = tmp_path / "spk"
    (written,) = spk_dir.glob("*.safetensors")
    data = written.read_bytes()
    m.speakers.delete("kept")
    # What a crash between write and rename leaves (in this layout and an older one), and a
    # file some other tool put there: none of them is a speaker.
    temps = [spk_dir / ".tmp-abc123.safetensors", spk_dir / ".tmp-def456.partial"]
    foreign = spk_dir / "notes.safetensors"
    for path in (*temps, foreign):
        path.write_bytes(data)
    m2 = _load(d, tmp_path)
    assert "kept" not in m2.speakers.list()
    assert not any(t.exists() for t in temps)  # removed at start
    assert foreign.exists()  # not ours to delete


def test_cross_lingual_and_instruct2_prompt_only_the_flow(family_dir, tmp_path):
    """Upstream's modes, as the spec's table of LLM inputs says: cross-lingual feeds the LLM
    no prompt (v3: the system prefix goes before the text); instruct2 (v2/v3) feeds it the
    instruction ending in <|endofprompt|> (v3 after the system prompt) and no prompt speech.
    The flow keeps the recording's tokens and mel either way."""
    m = _load(family_dir, tmp_path)
    audio = _encode(_tone(3.0, 24000), 24000, "wav", "pcm_s16le")
    full = m.speakers.from_prompt(audio, "你好，这是一个测试。")
    voice = m.speakers.from_prompt(audio, None)
    assert voice.prompt_speech_tokens == full.prompt_speech_tokens
    assert torch.equal(voice.prompt_feat, full.prompt_feat)
    assert voice.name not in m.speakers.list()  # neither kept nor listed
    text = m.frontend.encode("今天天气很好。")
    r = m.new_request("今天天气很好。", voice)
    assert list(r.prompt_speech_tokens) == []
    system = m.frontend.encode("You are a helpful assistant.<|endofprompt|>")
    assert [*r.prompt_text_ids, *r.text_ids] == ([*system, *text] if m.family == "v3" else text)
    if m.family == "v1":
        with pytest.raises(ValueError, match="CosyVoice-300M-Instruct"):
            m.instructed(voice, "用四川话说")
        return
    steered = m.instructed(voice, "用四川话说")
    head = "You are a helpful assistant. " if m.family == "v3" else ""
    r = m.new_request("今天天气很好。", steered)
    assert list(r.prompt_text_ids) == m.frontend.encode(head + "用四川话说<|endofprompt|>")
    assert list(r.prompt_speech_tokens) == [] and list(r.text_ids) == text
    assert steered.prompt_speech_tokens == full.prompt_speech_tokens  # the flow's prompt
    # an instruction that ends itself is taken as it is; a registered voice steers the same
    own = m.instructed(full, "Speak fast.<|endofprompt|>")
    assert own.prompt_text_ids == m.frontend.encode("Speak fast.<|endofprompt|>")
    assert m.instructed(full, "用四川话说").prompt_text_ids == steered.prompt_text_ids


def test_v1_instruct_prompts_the_llm_with_the_instruction_and_no_voice(golden_dir, tmp_path):
    """CosyVoice-300M-Instruct (told by its dir's name, as upstream does; the golden v1 dir
    under that name): the LLM hears the normalised instruction ending in <endofprompt> and
    neither the speaker's x-vector nor any prompt speech; the flow keeps the x-vector."""
    named = tmp_path / "CosyVoice-300M-Instruct"
    named.symlink_to(golden_dir / "cosyvoice1" / "model")
    m = cosyvoice.load(named, speaker_dir=tmp_path / "spk")
    assert m.instructions
    spk = m.speakers.get(m.speakers.list()[0])
    plain = m.new_request("今天天气很好。", spk)
    assert plain.embedding is not None and plain.prompt_text_ids == []
    steered = m.instructed(spk, "A fiery rebel leader, who speaks with 2 voices.")
    r = m.new_request("今天天气很好。", steered)
    said = m.frontend.normalize("A fiery rebel leader, who speaks with 2 voices.")
    assert "two" in said  # normalised as a transcript is
    assert list(r.prompt_text_ids) == m.frontend.encode(said + "<endofprompt>")
    assert r.embedding is None and list(r.prompt_speech_tokens) == []
    assert list(r.text_ids) == list(plain.text_ids)
    assert torch.equal(steered.embedding, spk.embedding)  # the flow's voice
    # an instruction that ends itself is not ended twice
    own = m.instructed(spk, "Speak fast.<endofprompt>")
    assert own.prompt_text_ids == m.frontend.encode(
        m.frontend.normalize("Speak fast.<endofprompt>")
    )


def test_warm_up_keeps_the_zero_shot_prompts_that_fit(golden_dir, tmp_path):
    """After a restart a zero-shot speaker's first stream starts past its prompt again: the
    warm-up keeps the prompts of the zero-shot speakers (the built-in one and two registered,
    equal parts), as many as the flow's store has room for, computing no others."""
    m = _load(_v2_dir(golden_dir), tmp_path)
    for i, amp in enumerate((0.2, 0.4)):
        m.speakers.register(
            f"v{i}", _encode(_tone(3.0, amp=amp), 24000, "wav", "pcm_s16le"), "你好。"
        )
    flow = m.token2wav.flow
    calls: list[int] = []
    flow.decoder.estimator.register_forward_hook(lambda *_: calls.append(1))

    def warm_up(budget: float) -> int:  # estimator calls
        flow.prompts.clear()
        flow.prompts.budget, n = budget, len(calls)
        m.warmup()
        return len(calls) - n

    full = flow.prompts.budget
    utterance = warm_up(0)  # no store: the warm-up utterance alone
    three = warm_up(full) - utterance
    assert len(flow.prompts) == 3 and three > 0
    one = flow.prompts.nbytes / 3
    assert warm_up(2.5 * one) - utterance == 2 * three // 3  # the third: no room, not computed
    assert len(flow.prompts) == 2 and flow.pool.held == 0


def test_a_prompt_two_speakers_share_stays_kept_while_either_is_left(golden_dir, tmp_path):
    """Two names for one recording (transcripts aside) are one prompt to the flow: deleting one
    keeps what the flow kept for the other; deleting both frees it."""
    m = _load(_v2_dir(golden_dir), tmp_path)
    wav = _encode(_tone(3.0), 24000, "wav", "pcm_s16le")
    m.speakers.register("a", wav, "你好。")
    m.speakers.register("b", wav, "再见。")
    m.speakers.register("c", _encode(_tone(3.0, amp=0.4), 24000, "wav", "pcm_s16le"), "你好。")
    a, b, c = (m.speakers.get(n) for n in "abc")
    store = m.token2wav.flow.prompts
    store.clear()
    assert m.keep_prompt(a) and m.keep_prompt(c) and len(store) == 2
    assert m.keep_prompt(b) and len(store) == 2  # kept already: one entry for both names
    m.speakers.delete("a")
    assert not m.forget_prompt(a) and len(store) == 2
    m.speakers.delete("c")
    assert m.forget_prompt(c) and len(store) == 1
    m.speakers.delete("b")
    assert m.forget_prompt(b) and len(store) == 0


@pytest.mark.parametrize("meanwhile", ["deleted", "replaced"])
def test_a_registration_whose_file_changes_before_it_is_listed(
    golden_dir, tmp_path, monkeypatch, meanwhile
):
    """A registration writes its file outside the store's lock (lookups on a server's event
    loop take it), so another thread or replica may delete or replace the file before the
    store lists it. A deletion then failed the registration (its stat found no file), and a
    file replaced then was kept as this registration's voice for good (its key was the new
    file's). Now the store follows the directory either way."""
    import dataclasses

    import cosyvoice.speakers as speakers

    m = _load(_v2_dir(golden_dir), tmp_path)
    wav = _encode(_tone(2.0, 16000), 16000, "wav", "pcm_s16le")
    other = m.speakers.from_prompt(_encode(_tone(3.0, 24000), 24000, "wav", "pcm_s16le"), "再见。")
    write = speakers._write_speaker

    def then_another_writer(path, spk, family, replace):
        key = write(path, spk, family, replace)
        if meanwhile == "deleted":
            path.unlink()
        else:
            write(path, dataclasses.replace(other, name=spk.name), family, replace=True)
        return key

    monkeypatch.setattr(speakers, "_write_speaker", then_another_writer)
    m.speakers.register("v", wav, "你好。")
    monkeypatch.undo()
    if meanwhile == "deleted":
        assert "v" not in m.speakers.list()
    else:
        fresh = _load(_v2_dir(golden_dir), tmp_path)  # what a restart or a replica reads
        served = m.speakers.get("v").prompt_speech_tokens
        assert served == fresh.speakers.get("v").prompt_speech_tokens == other.prompt_speech_tokens
