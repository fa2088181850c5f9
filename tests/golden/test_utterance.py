"""The model's utterance API (cosyvoice.load -> start / add_text / close_text / step / cancel)
on the tiny golden CosyVoice2 dir: tags and ends, batch invariance through the whole pipeline,
cancel and errors giving back every KV block."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _fixtures import ONE_THREAD, TEST_DEVICE, WETEXT

import cosyvoice
from cosyvoice.devices import resolve_dtype
from cosyvoice.flow.cache import CPU_ROOM
from cosyvoice.tts import synthesize
from cosyvoice.utterance import Output, Status

# bench/bench_gpu.py runs these on CUDA: the model loads on TEST_DEVICE
pytestmark = ONE_THREAD
TOKENS = 40  # fixed LLM length: a few streaming chunks per segment, quick on the tiny model


@pytest.fixture(scope="module")
def model(golden_dir, tmp_path_factory):
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    return cosyvoice.load(
        d,
        device=TEST_DEVICE,
        dtype="float32",
        use_wetext=WETEXT,
        speaker_dir=tmp_path_factory.mktemp("s"),
        # inline, as on the CPU, also on CUDA (where the vocoder thread is the default): the
        # scheduling tests count the steps until audio, which the thread hands out a step or
        # more later (its own tests: test_vocoder_thread)
        vocoder_thread=False,
    )


def _run(model, utts) -> dict[int, list[Output]]:
    outs: dict[int, list[Output]] = {id(u): [] for u in utts}
    while live := [u for u in utts if u.status is not Status.FINISHED]:
        for o in model.step(live):
            outs[id(o.utterance)].append(o)
    return outs


def _audio(outs: list[Output]) -> np.ndarray:
    return torch.cat([o.audio for o in outs]).numpy()


def test_pieces_are_tagged_and_end_in_order(model):
    spk = model.speakers.list()[0]
    u = model.start(spk, seed=5, fixed_tokens=TOKENS)
    model.add_text(u, "Hello there. How are you today?", tag="a")
    model.add_text(u, "...", tag="b")  # nothing speakable: still ends
    model.add_text(u, "Fine.", tag="c")
    assert u.status is Status.RUNNING
    model.close_text(u)
    with pytest.raises(ValueError):
        model.add_text(u, "late", tag="d")
    outs = _run(model, [u])[id(u)]
    ends = [o.tag for o in outs if o.tag_end]
    assert ends == ["a", "b", "c"]
    tags = [o.tag for o in outs if o.audio.numel()]
    assert tags == sorted(tags) and set(tags) == {"a", "c"}  # audio in text order, none for "b"
    assert [o.done for o in outs].count(True) == 1 and outs[-1].done
    assert not any(o.error for o in outs)
    assert not any(o.truncated for o in outs)  # fixed_tokens end at that length on purpose
    # streamed: a first chunk after 25 + 3 tokens, then the rest
    assert sum(1 for o in outs if o.tag == "c" and o.audio.numel()) >= 2


def test_waiting_until_text_or_close(model):
    u = model.start(model.speakers.list()[0], seed=1, fixed_tokens=TOKENS)
    assert model.step([u]) == [] and u.status is Status.WAITING
    model.close_text(u)
    (out,) = model.step([u])
    assert out.done and out.audio.numel() == 0 and u.status is Status.FINISHED
    with pytest.raises(ValueError):
        model.step([u])


def test_batched_equals_alone(model):
    spk = model.speakers.list()[0]
    texts = ["The first voice speaks.", "A second and longer sentence, spoken at once."]

    def utt(i: int):
        u = model.start(spk, seed=100 + i, fixed_tokens=TOKENS + 7 * i)
        model.add_text(u, texts[i], tag=i)
        model.close_text(u)
        return u

    alone = [_audio(_run(model, [u])[id(u)]) for u in (utt(0), utt(1))]
    a, b = utt(0), utt(1)
    model.step([a])  # staggered: a is one step ahead
    together = _run(model, [a, b])
    for got, ref in zip((_audio(together[id(a)]), _audio(together[id(b)])), alone, strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=2e-3)


def _whole_then_busy(model, monkeypatch, slack):
    """A whole utterance long enough to go in hops (max_whole_tokens lowered for the test)
    beside a streaming one that makes tokens long after it; stepped with ``slack`` for the
    whole one. -> (its outputs, whether the other made tokens at each of its audio outputs,
    the steps from its input's end to its first audio)."""
    monkeypatch.setattr(model, "_step_s", 0.0)
    cfg = model.token2wav.cfg
    monkeypatch.setattr(model.token2wav, "cfg", dataclasses.replace(cfg, max_whole_tokens=60))
    spk = model.speakers.list()[0]

    def utt(seed: int, tokens: int, stream: bool):
        u = model.start(spk, seed=seed, fixed_tokens=tokens, stream=stream)
        model.add_text(u, "Some words to say.", tag=0)
        model.close_text(u)
        return u

    a, b = utt(7, 3 * TOKENS, False), utt(8, 8 * TOKENS, True)
    got: list[Output] = []
    b_busy_at: list[bool] = []
    step = ended_at = first_at = 0
    while live := [u for u in (a, b) if u.status is not Status.FINISHED]:
        step += 1
        for o in model.step(live, slack=lambda u: slack if u is a else None):
            if o.utterance is a:
                got.append(o)
                if o.audio.numel():
                    first_at = first_at or step
                    b_busy_at.append(b.llm is not None and not b.llm.done)
        if not ended_at and a.llm is not None and a.llm.done:
            ended_at = step
    return got, b_busy_at, first_at - ended_at


def test_a_long_whole_utterance_far_ahead_waits_while_others_make_tokens(model, monkeypatch):
    """Its hops (each costlier than the last) are not vocoded while another utterance still
    makes tokens: they would hold every step up."""
    got, b_busy_at, _ = _whole_then_busy(model, monkeypatch, slack=1000.0)
    assert len(b_busy_at) >= 2 and not any(b_busy_at), b_busy_at  # hops, all after b's tokens


def test_a_listener_about_to_run_dry_is_vocoded_at_once(model, monkeypatch):
    """Not held for a batch: its chunk goes the step it is ready (the input's end here)."""
    _, b_busy_at, wait = _whole_then_busy(model, monkeypatch, slack=0.5)
    assert wait == 0 and all(b_busy_at[:1]), (wait, b_busy_at)


def test_a_stream_far_ahead_is_not_held(model):
    """Only a long whole utterance's hops wait: other chunks go as before however far ahead
    their listener is (holding them paced every response and stalled multi-sentence ones)."""
    spk = model.speakers.list()[0]
    a = model.start(spk, seed=7, fixed_tokens=3 * TOKENS)
    b = model.start(spk, seed=8, fixed_tokens=6 * TOKENS)
    for u in (a, b):
        model.add_text(u, "Some words to say.", tag=0)
        model.close_text(u)
    b_busy_at = []
    while live := [u for u in (a, b) if u.status is not Status.FINISHED]:
        for o in model.step(live, slack=lambda u: 1000.0 if u is a else None):
            if o.utterance is a and o.audio.numel():
                b_busy_at.append(b.llm is not None and not b.llm.done)
    assert len(b_busy_at) >= 2 and all(b_busy_at), b_busy_at


def test_same_seed_same_audio_in_process(model):
    spk = model.speakers.list()[0]
    one = torch.cat(list(synthesize(model, "Seeded.", spk, stream=True, seed=9)))
    two = torch.cat(list(synthesize(model, "Seeded.", spk, stream=True, seed=9)))
    torch.testing.assert_close(one, two)


def test_idle_the_flow_state_goes_and_the_next_stream_is_the_same(model):
    """Once nothing synthesizes, let_go() frees the flow pool's tensors once the pool has sat
    idle for its hold (until then it keeps them, and says to be asked again: the next burst
    would take the memory from the OS again); streams after it speak as before, and one still
    streaming keeps its state. A pool that captured graphs read (a GPU's) is kept: the next
    stream would capture them all again."""
    spk, pool = model.speakers.list()[0], model.token2wav.flow.pool
    one = torch.cat(list(synthesize(model, "Seeded, and idle after.", spk, stream=True, seed=9)))
    assert pool.kv and pool.held == 0
    if pool.keep:
        model.let_go()
    else:
        assert model.let_go() and pool.kv  # within the hold
        pool.used_at -= pool.hold_s
        assert not model.let_go()
    assert bool(pool.kv) if pool.keep else not (pool.kv or pool.tails)
    two = torch.cat(list(synthesize(model, "Seeded, and idle after.", spk, stream=True, seed=9)))
    torch.testing.assert_close(one, two)
    u = model.start(spk, seed=3, fixed_tokens=200)
    model.add_text(u, "Still streaming.")
    while not pool.held:
        model.step([u])
    model.let_go()  # (the caller's mistake: something is synthesizing) keeps what is held
    assert pool.kv
    model.cancel(u)


def _warm_cpu_model(golden_dir, tmp_path, **opts):
    if torch.device(TEST_DEVICE).type != "cpu":
        pytest.skip("address space is free on the CPU only; a GPU pool is sized to its memory")
    m = cosyvoice.load(golden_dir / "cosyvoice2" / "model", device="cpu", dtype="float32",
                       use_wetext=WETEXT, speaker_dir=tmp_path, vocoder_thread=False,
                       **opts)  # fmt: skip
    m.warmup()
    return m


def test_after_warm_up_a_cpu_stream_grows_the_flow_pool_without_a_copy(golden_dir, tmp_path):
    """Warm-up gives the flow pool on the CPU the room its memory bound lets streams take
    (address space: a page costs nothing until it is written), so a stream that grows the
    pool's lists far past their first size never makes a tensor anew: each growth copied the
    state, taking its memory a second time at a page fault per page."""
    m = _warm_cpu_model(golden_dir, tmp_path)
    pool = m.token2wav.flow.pool
    u = m.start(m.speakers.list()[0], seed=3, fixed_tokens=300)  # 600 frames
    m.add_text(u, "A long stream.")
    m.close_text(u)
    made: dict = {}  # each layer's tensor's address, from the call that made it
    while u.status is not Status.FINISHED:
        m.step([u])
        for key, t in pool.kv.items():
            assert made.setdefault(key, t.data_ptr()) == t.data_ptr(), f"{key} made anew"
    frames = pool.blocks["frames"]
    assert made and frames.size > CPU_ROOM * frames.initial


def test_a_cpu_flow_bound_past_the_machines_memory_still_streams(golden_dir, tmp_path):
    """The pool's room stops at the machine's memory: a tensor past it cannot be made even as
    address space, and every stream would fail."""
    m = _warm_cpu_model(golden_dir, tmp_path, flow_cache_mb=1e12)
    spk = m.speakers.list()[0]
    chunks = list(synthesize(m, "Bound past memory.", spk, stream=True, seed=2, fixed_tokens=80))
    assert m.token2wav.flow.pool.kv and len(chunks) > 1 and torch.cat(chunks).abs().max() > 0


def test_cancel_and_errors_give_back_kv_blocks(model):
    pool = model.llm.net.kv_pool()
    base = pool.used_blocks
    spk = model.speakers.list()[0]
    u = model.start(spk, seed=3, fixed_tokens=200)
    model.add_text(u, "Cancelled halfway through.")
    for _ in range(5):
        model.step([u])
    assert pool.used_blocks > base
    model.cancel(u)
    model.cancel(u)  # idempotent
    assert pool.used_blocks == base and u.status is Status.FINISHED

    wav = (0.3 * np.sin(np.arange(48000) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    model.speakers.register("short-lived", (wav, 16000), "A test voice.")
    v = model.start("short-lived", seed=4, fixed_tokens=TOKENS)
    model.add_text(v, "One.", tag=0)
    model.add_text(v, "Two.", tag=1)
    while not any(o.tag_end for o in model.step([v])):
        pass
    # Deleted while its second segment waits: the utterance keeps the voice it started with.
    model.speakers.delete("short-lived")
    model.close_text(v)
    outs = _run(model, [v])[id(v)]
    assert not any(o.error for o in outs) and outs[-1].done
    assert sum(o.audio.numel() for o in outs if o.tag == 1) > 0
    assert pool.used_blocks == base
    with pytest.raises(KeyError):
        model.start("short-lived")


def test_bf16_falls_back_on_a_cpu_without_bf16_units(monkeypatch, caplog):
    import cosyvoice.devices as devices

    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: False)
    assert resolve_dtype("bfloat16", cpu) is torch.float32
    assert "slower" in caplog.text
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: True)
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype(None, cpu) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int8", cpu)


def test_text_streaming_cuts_do_not_matter(model):
    spk = model.speakers.list()[0]

    def run(fragments: list[str]) -> np.ndarray:
        u = model.start(spk, seed=21, text_stream=True)
        outs: list[Output] = []
        for f in fragments:
            model.add_text(u, f, tag="turn")
            outs += model.step([u]) if u.busy else []
        model.close_text(u)
        outs += _run(model, [u])[id(u)]
        assert [o.tag for o in outs if o.tag_end] == ["turn"] and outs[-1].done
        return _audio(outs)

    whole = run(["Hello there, how are you doing today? I am fine."])
    cut = run(["Hel", "lo the", "re, how", " are you do", "ing today? I", " am fine."])
    assert whole.size > 0
    # the same tokens either way; on a GPU the cuts change the text's prefill shapes and with
    # them the kernels' summation order, so samples may differ in the last bit (6e-8 on an H200)
    np.testing.assert_allclose(cut, whole, rtol=0, atol=0 if TEST_DEVICE == "cpu" else 1e-6)


def test_text_streaming_waits_for_text_without_spinning(model):
    u = model.start(model.speakers.list()[0], seed=2, text_stream=True)
    model.add_text(u, "Wor", tag=0)  # no word boundary yet: nothing for the LLM
    model.step([u])
    assert u.status is Status.RUNNING and not u.busy
    model.add_text(u, "ds keep coming in", tag=0)
    assert u.busy
    model.add_text(u, "A new piece.", tag=1)  # a new tag seals the first run
    model.close_text(u)
    outs = _run(model, [u])[id(u)]
    assert [o.tag for o in outs if o.tag_end] == [0, 1]
    assert all(o.audio.numel() for o in outs if o.tag_end)


def test_text_streaming_needs_v2_or_v3(golden_dir):
    d = golden_dir / "cosyvoice1" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice1 golden dir")
    pytest.importorskip("whisper", reason="v1's tokenizer (not on a bare GPU box)")
    v1 = cosyvoice.load(d, device="cpu", dtype="float32", speaker_dir=None, token2wav=False)
    with pytest.raises(ValueError, match="CosyVoice2/3"):
        v1.start(v1.speakers.list()[0], text_stream=True)


def _streamed_runs(model, monkeypatch) -> list[list[int]]:
    """The text tokens given to each text-streaming LLM run the model starts from now on."""
    runs: list[list[int]] = []
    new_stream_request = model.new_stream_request

    def recorded(*args, **kw):
        req = new_stream_request(*args, **kw)
        ids: list[int] = []
        runs.append(ids)
        push = req.push_text
        monkeypatch.setattr(req, "push_text", lambda t: (ids.extend(t), push(t))[1])
        return req

    monkeypatch.setattr(model, "new_stream_request", recorded)
    return runs


def _stream_piece(model, monkeypatch, fragments: list[str]) -> tuple[list[list[int]], list[Output]]:
    """One streamed piece from ``fragments``: the text tokens each LLM run was given, and the
    outputs."""
    runs = _streamed_runs(model, monkeypatch)
    u = model.start(model.speakers.list()[0], seed=4, text_stream=True)
    outs: list[Output] = []
    for fragment in fragments:
        model.add_text(u, fragment, tag="reply")
        outs += model.step([u]) if u.busy else []
    model.close_text(u)
    return runs, outs + _run(model, [u])[id(u)]


@pytest.mark.parametrize("punctuated", [True, False], ids=["sentences", "no-sentence-end"])
def test_a_long_streamed_piece_goes_on_in_new_runs(model, monkeypatch, punctuated):
    """One streamed piece far longer than a run takes (an agent's reply, never flushed) is
    spoken in several LLM runs, each ending at a sentence end past ``run_tokens`` and none
    past ``run_cap``; together they speak all of its text, and the piece ends once. Where
    sentences end does not depend on how the text was cut into fragments."""
    monkeypatch.setattr(model, "run_tokens", 30)
    monkeypatch.setattr(model, "run_cap", 100)
    text = " ".join(f"Sentence {i} is here, and it goes on a while." for i in range(12))
    if not punctuated:
        text = " ".join(f"word{i}" for i in range(150))
    words = text.split(" ")
    runs, outs = _stream_piece(model, monkeypatch, [w + " " for w in words[:-1]] + words[-1:])
    spoken = [model.frontend.tokenizer.decode(ids) for ids in runs]
    assert " ".join(spoken).split() == words
    assert len(runs) >= 3 and max(len(ids) for ids in runs) <= 100
    assert [(o.tag, o.truncated) for o in outs if o.tag_end] == [("reply", False)]
    assert outs[-1].done and not [o.error for o in outs if o.error]
    assert model.held() == {"kv_blocks": 0, "flow_blocks": 0}
    if punctuated:
        assert all(
            t.endswith(".") and len(ids) >= 30 for t, ids in zip(spoken[:-1], runs, strict=False)
        )
        first = [list(ids) for ids in runs]  # (the next piece's runs are recorded here too)
        assert _stream_piece(model, monkeypatch, [text])[0] == first  # one fragment: the same


def test_where_a_long_streamed_piece_runs_end_does_not_depend_on_its_fragments(model, monkeypatch):
    """A sentence that fits a run's cap but not what is left of it: the run ended before the
    sentence when its text came in one fragment, but mid-sentence at the cap when it came word
    by word (or, for a queued run, as fast as the text came), so the audio depended on how and
    when the text arrived. Now the runs end at the same places either way."""
    monkeypatch.setattr(model, "run_tokens", 30)
    monkeypatch.setattr(model, "run_cap", 100)
    runs = _streamed_runs(model, monkeypatch)
    long = " ".join(f"then word{i} came" for i in range(11))  # 84 tokens: fits a run alone
    text = f"Sentence one is here. Sentence two is here. And {long} at last. Done now."
    given = {}
    for how in ("whole", "words"):
        runs.clear()
        u = model.start(model.speakers.list()[0], seed=4, text_stream=True)
        for fragment in [text] if how == "whole" else [w + " " for w in text.split(" ")]:
            model.add_text(u, fragment, tag="reply")
            _ = model.step([u]) if u.busy else []  # (a started run takes each word as it comes)
        model.close_text(u)
        _run(model, [u])
        given[how] = [model.frontend.tokenizer.decode(ids).strip() for ids in runs]
        assert " ".join(given[how]).split() == text.split()
        assert max(len(ids) for ids in runs) <= 100
    assert given["whole"] == given["words"]
    assert model.held() == {"kv_blocks": 0, "flow_blocks": 0}


def test_a_run_that_gets_no_text_is_not_spoken(model, monkeypatch):
    """A piece whose text ends where a run does (a sentence end past ``run_tokens``) queues
    the next run, which may start before the piece is closed; closed with no text, that run's
    LLM is not asked to speak (from no text a real model says up to 2 s of something)."""
    text = "Sentence one is here, and it goes on. And a second one ends it."
    monkeypatch.setattr(model, "run_tokens", len(model.frontend.encode(text)))
    runs = _streamed_runs(model, monkeypatch)
    u = model.start(model.speakers.list()[0], seed=5, text_stream=True)
    model.add_text(u, text + " ", tag="reply")  # (the space: the last word is complete)
    first, outs = None, []
    while u.busy:  # until the next run has started and waits for text
        outs += model.step([u])
        first = first or u.llm
    assert len(runs) == 2 and u.llm is not first and u.llm.bistream.n_text == 0
    second = u.llm
    model.close_text(u)
    outs += _run(model, [u])[id(u)]
    assert second.finish_reason == "cancelled" and not second.out_tokens
    assert [(o.tag, o.truncated) for o in outs if o.tag_end] == [("reply", False)]
    assert outs[-1].done and model.held() == {"kv_blocks": 0, "flow_blocks": 0}


def test_a_long_piece_given_at_once_is_read_once(model, monkeypatch):
    """A piece's text that piles up while its runs speak (an agent's whole reply in one
    message) is read up to each run's cut, not again in full at every run's start: the text
    tokenized for all its runs stays within a few times its length (quadratic before: 197k
    characters took 49 s of tokenizing on the inference thread). A piece that ends in spaces
    after a cut adds no empty run."""
    monkeypatch.setattr(model, "run_tokens", 30)
    monkeypatch.setattr(model, "run_cap", 100)
    read = []
    encode = model.frontend.encode
    monkeypatch.setattr(model.frontend, "encode", lambda t: (read.append(len(t)), encode(t))[1])
    text = " ".join(f"Sentence {i} is here, and it goes on a while." for i in range(24))
    runs, outs = _stream_piece(model, monkeypatch, [text + "   "])
    assert len(runs) >= 6 and sum(read) <= 3 * len(text), (sum(read), len(text))
    assert outs[-1].utterance.runs == len(runs)  # (a blank last run would be one more)
    assert [(o.tag, o.truncated) for o in outs if o.tag_end] == [("reply", False)]


@pytest.fixture
def one_group_a_step(model, monkeypatch) -> str:
    """A speaker of `model`, whose steps now normalize one group of sentences each."""
    if not WETEXT:
        pytest.skip("wetext not installed: normalizing is one cheap pass")
    monkeypatch.setattr(cosyvoice.model, "NORMALIZE_SLICE_S", 0.0)
    return model.speakers.list()[0]


def _sentences(n: int) -> str:
    return " ".join(f"Sentence number {i} is here, and it is long enough." for i in range(n))


def test_a_piece_with_a_truncated_segment_says_so_at_its_end(model, monkeypatch):
    """A piece that the frontend splits into several segments, the first of them ended by the
    LLM's length cap: the piece's last output says ``truncated`` (its later segments ended at
    their text's end), and the next piece's does not."""
    made = []
    new_request = model.new_request

    def first_short(*args, **kw):
        req = new_request(*args, **kw)
        if not made:
            req.max_len = req.min_len // 2
        made.append(req)
        return req

    monkeypatch.setattr(model, "new_request", first_short)
    u = model.start(model.speakers.list()[0], seed=6)
    model.add_text(u, _sentences(8), tag=0)
    model.add_text(u, "Fine, thanks.", tag=1)
    model.close_text(u)
    outs = _run(model, [u])[id(u)]
    reasons = [r.finish_reason for r in made]
    assert len(made) >= 3 and reasons == ["length"] + ["stop"] * (len(made) - 1)
    assert [(o.tag, o.truncated) for o in outs if o.tag_end] == [(0, True), (1, False)]
    assert not [o for o in outs if o.truncated and not o.tag_end]


def test_a_long_text_is_normalized_over_several_steps(model, one_group_a_step):
    """Normalizing a long text takes seconds on a CPU: while another utterance has audio to
    make, each step normalizes only a group of its sentences, and the audio is the same as
    when it is normalized at once."""
    spk, long = one_group_a_step, _sentences(30)
    fast = model.start(spk, seed=8, fixed_tokens=TOKENS)
    model.add_text(fast, "Hello there.", tag=0)
    model.close_text(fast)
    slow = model.start(spk, seed=9, fixed_tokens=4)
    model.add_text(slow, long, tag=0)
    model.close_text(slow)
    outs, preparing = {id(fast): [], id(slow): []}, 0
    model.step([fast])  # in flight now: from here on, slow's text is normalized in slices
    while fast.status is not Status.FINISHED:
        for o in model.step([u for u in (fast, slow) if u.status is not Status.FINISHED]):
            outs[id(o.utterance)].append(o)
        preparing += slow.preparing
    outs[id(slow)] += _run(model, [slow])[id(slow)]
    assert preparing >= 5  # ~1700 characters: 8 groups of 200
    alone = model.start(spk, seed=9, fixed_tokens=4)
    model.add_text(alone, long, tag=0)
    model.close_text(alone)
    # the same segments; batched with another utterance for a while: batch-level noise only
    got, ref = _audio(outs[id(slow)]), _audio(_run(model, [alone])[id(alone)])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-3)
    assert model.held() == {"kv_blocks": 0, "flow_blocks": 0}


def test_the_next_piece_is_normalized_while_one_plays(model, one_group_a_step):
    """A long piece queued behind a segment in flight is normalized during that segment's
    steps, so its audio follows without a gap of normalizing."""
    spk, long = one_group_a_step, _sentences(12)
    u = model.start(spk, seed=8, fixed_tokens=TOKENS)
    model.add_text(u, "Hello there.", tag=0)
    outs = model.step([u])
    assert u.in_flight
    model.add_text(u, long, tag=1)
    model.close_text(u)
    while not any(o.tag_end for o in outs):
        assert u.in_flight
        outs += model.step([u])
    assert not u.preparing  # normalized before the first piece ended
    outs += _run(model, [u])[id(u)]
    assert [o.tag for o in outs if o.tag_end] == [0, 1]


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice1"])
def test_a_one_token_segment_at_speed_4_still_speaks(golden_dir, tmp_path, family):
    """A segment of fewer mel frames than ``speed`` was stretched to none, which interpolate
    refuses: the whole step raised, and every utterance in it was lost."""
    d = golden_dir / family / "model"
    if not d.is_dir():
        pytest.skip(f"no {family} golden dir")
    m = cosyvoice.load(d, device=TEST_DEVICE, dtype="float32", use_wetext=WETEXT,
                       speaker_dir=tmp_path, vocoder_thread=False)  # fmt: skip
    spk = m.speakers.list()[0]
    utts = [m.start(spk, seed=1, fixed_tokens=TOKENS)]
    utts += [m.start(spk, seed=2 + s, speed=4.0, stream=s, fixed_tokens=1) for s in (True, False)]
    for u in utts:
        m.add_text(u, "Hello there, my friend.")
        m.close_text(u)
    for outs in _run(m, utts).values():
        assert not any(o.error for o in outs) and outs[-1].done
        assert sum(o.audio.numel() for o in outs) > 0


def test_a_failed_vocoder_batch_ends_only_its_utterances(model, monkeypatch):
    """Inline (no vocoder thread) as on the thread: the error goes to the batch's utterances
    and the others go on, instead of out of step() for every utterance stepped."""
    base = model.llm.net.kv_pool().used_blocks
    spk = model.speakers.list()[0]
    bad = model.start(spk, seed=1, fixed_tokens=TOKENS)
    good = model.start(spk, seed=2, fixed_tokens=TOKENS, stream=False)
    for u in (bad, good):
        model.add_text(u, "Hello there, my friend.")
        model.close_text(u)
    step = model.token2wav.step

    def failing(items):
        if any(st is bad.t2w for st, _, _ in items):
            raise RuntimeError("injected")
        return step(items)

    monkeypatch.setattr(model.token2wav, "step", failing)
    outs = _run(model, [bad, good])
    assert outs[id(bad)][-1].error == "RuntimeError: injected"
    assert not any(o.error for o in outs[id(good)]) and outs[id(good)][-1].done
    assert sum(o.audio.numel() for o in outs[id(good)]) > 0
    assert model.llm.net.kv_pool().used_blocks == base


def test_a_segment_past_the_flows_noise_ends_there_alone(model, monkeypatch):
    """The flow's noise covers 300 s of frames: a segment longer (text with no sentence end)
    failed the batched flow call, so every stream vocoded with it got its error. Its LLM
    now stops at the limit. (The limit lowered to 600 frames: the same path in seconds.)"""
    import cosyvoice.flow.flow as flow

    monkeypatch.setattr(flow, "NOISE_FRAMES", 600)
    spk = model.speakers.list()[0]
    long = model.start(spk, seed=1, fixed_tokens=400)  # 800 frames
    short = model.start(spk, seed=2, fixed_tokens=60)
    for u in (long, short):
        model.add_text(u, "Some words.", tag=0)
        model.close_text(u)
    outs = _run(model, [long, short])
    assert not [o.error for os in outs.values() for o in os if o.error]
    prompt = len(model.speakers.get(spk).prompt_speech_tokens)
    per_token = model.sample_rate // 25
    assert 0 < _audio(outs[id(long)]).size <= (300 - prompt) * per_token
    assert _audio(outs[id(short)]).size == 60 * per_token
    assert model.held() == {"kv_blocks": 0, "flow_blocks": 0}


def test_text_after_a_streamed_piece_ended_at_its_limit_is_dropped(model, monkeypatch, caplog):
    """A streamed piece whose LLM stopped at the flow's limit takes no more text: later
    fragments are dropped with one warning (they used to pile up in a request that would
    never read them), the piece still ends, and the next piece speaks."""
    import cosyvoice.flow.flow as flow

    spk = model.speakers.list()[0]
    prompt = len(model.speakers.get(spk).prompt_speech_tokens)
    ratio = model.token2wav.flow.cfg.token_mel_ratio
    monkeypatch.setattr(flow, "NOISE_FRAMES", (prompt + 8) * ratio)  # 8 speech tokens
    u = model.start(spk, seed=3, text_stream=True)
    model.add_text(u, "Hello there, how are you doing today, my good old friend? ", tag=0)
    run = u.open_run
    outs: list[Output] = []
    for _ in range(200):
        if run.llm is not None and run.llm.done:
            break
        outs += model.step([u])
    assert run.llm is not None and run.llm.done
    taken = run.llm.bistream.n_text
    with caplog.at_level("WARNING", logger="cosyvoice"):
        for words in ("And then ", "some more ", "words after it. "):
            model.add_text(u, words, tag=0)
    assert len([r for r in caplog.records if "already ended" in r.message]) == 1
    assert run.llm.bistream.n_text == taken
    monkeypatch.undo()  # the next piece has the flow's whole noise buffer: not cut
    model.add_text(u, "A new piece.", tag=1)
    model.close_text(u)
    outs += _run(model, [u])[id(u)]
    assert not [o.error for o in outs if o.error] and outs[-1].done
    assert [(o.tag, o.truncated) for o in outs if o.tag_end] == [(0, True), (1, False)]
    assert not [o for o in outs if o.truncated and not o.tag_end]
    per_token = model.sample_rate // 25
    assert 0 < sum(o.audio.numel() for o in outs if o.tag == 0) <= 8 * per_token
    assert model.held() == {"kv_blocks": 0, "flow_blocks": 0}


@pytest.mark.parametrize("share, pieces_first", [(0.01, 1), (1.0, 7)], ids=["held", "free"])
def test_a_long_recordings_pieces_take_their_share_while_another_waits(
    model, monkeypatch, share, pieces_first
):
    """A stream with a long recording (12 times the golden prompt: 7 pieces of 100 tokens)
    starts beside a registered voice's stream. While that one waits for its first audio, a
    batch of pieces is followed by ``prompt_share``'s rest of the time without any: at a
    share of 0.01 one batch goes before that first audio, the rest after it (and the long
    stream still ends). With a share of 1 nothing is held: all 7 go first."""
    zs = next(s for s in map(model.speakers.get, model.speakers.list()) if s.zero_shot)
    long = dataclasses.replace(
        zs, name="long", prompt_speech_tokens=zs.prompt_speech_tokens * 12,
        prompt_feat=zs.prompt_feat.repeat(1, 12, 1), llm_prompt_speech=False,
    )  # fmt: skip
    monkeypatch.setattr(model, "prompt_share", share)
    monkeypatch.setattr(model, "_pieces_due", 0.0)
    t2w = model.token2wav
    pieces: list[int] = []
    step = t2w.step

    def counted(items):
        out = step(items)
        pieces.extend([1] * t2w.pieces)
        return out

    monkeypatch.setattr(t2w, "step", counted)
    waiting = model.start(model.speakers.list()[0], seed=1, fixed_tokens=TOKENS)
    joining = model.start(long, seed=2, fixed_tokens=TOKENS)
    for u, text in ((waiting, "Hello there."), (joining, "Hi.")):
        model.add_text(u, text)
        model.close_text(u)
    first = None
    while live := [u for u in (waiting, joining) if u.status is not Status.FINISHED]:
        for o in model.step(live):
            if o.utterance is waiting and o.audio.numel() and first is None:
                first = len(pieces)
    assert first == pieces_first and len(pieces) == 7
