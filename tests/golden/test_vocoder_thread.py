"""The vocoder thread (``cosyvoice.load(vocoder_thread=True)``, the default on a GPU): token2wav
batches run on a thread of their own while decode steps go on, and their audio comes out of a
later step. Forced on here, on the CPU: the same audio as inline vocoding, cancel and failure
mid-vocoding release everything."""

from __future__ import annotations

import contextlib
import gc
import threading
import time

import numpy as np
import pytest
import torch
from _fixtures import ONE_THREAD, WETEXT

import cosyvoice
from cosyvoice.utterance import Output, Status

pytestmark = ONE_THREAD
TOKENS = 40


def _load(golden_dir, tmp_path_factory, thread: bool):
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    return cosyvoice.load(d, device="cpu", dtype="float32", use_wetext=WETEXT,
                          speaker_dir=tmp_path_factory.mktemp("s"), vocoder_thread=thread)  # fmt: skip


@pytest.fixture(scope="module")
def inline(golden_dir, tmp_path_factory):
    return _load(golden_dir, tmp_path_factory, False)


@pytest.fixture(scope="module")
def threaded(golden_dir, tmp_path_factory):
    return _load(golden_dir, tmp_path_factory, True)


def _start(model, i: int, **kw):
    u = model.start(model.speakers.list()[i % 2], seed=50 + i, fixed_tokens=TOKENS + 9 * i, **kw)
    model.add_text(u, f"Sentence number {i}, spoken.", tag=(i, 0))
    model.add_text(u, "And a second piece.", tag=(i, 1))
    model.close_text(u)
    return u


def _run(model, utts) -> tuple[dict[int, list[Output]], int]:
    """Step until all finish, staggered starts; also count the steps after which some audio
    was still on the vocoder thread."""
    outs: dict[int, list[Output]] = {id(u): [] for u in utts}
    live, pending_after = [utts[0]], 0
    for k in range(1, 100_000):
        live = [u for u in utts[: 1 + k // 3] if u.status is not Status.FINISHED]
        if not live:
            break
        for o in model.step(live):
            outs[id(o.utterance)].append(o)
        pending_after += any(u.vocoding for u in utts)
    return outs, pending_after


def test_same_audio_as_inline_vocoding(inline, threaded):
    kinds = [dict(), dict(stream=False), dict(speed=1.3)]
    ref, _ = _run(inline, [_start(inline, i, **k) for i, k in enumerate(kinds)])
    utts = [_start(threaded, i, **k) for i, k in enumerate(kinds)]
    got, pending_after = _run(threaded, utts)
    assert pending_after > 0, "no step ever left audio on the vocoder thread"
    for a, b in zip(ref.values(), got.values(), strict=True):
        assert not any(o.error for o in a + b)
        assert [(o.tag, o.tag_end, o.done) for o in a if o.tag_end or o.done] == [
            (o.tag, o.tag_end, o.done) for o in b if o.tag_end or o.done
        ]
        x, y = (torch.cat([o.audio for o in s]).numpy() for s in (a, b))
        assert x.shape == y.shape and x.size > 0
        np.testing.assert_allclose(y, x, atol=2e-3)  # batch compositions differ: batched tol
        assert [o.done for o in b].count(True) == 1 and b[-1].done
    assert not threaded._inflight


def _settle(model) -> None:
    gc.collect()
    assert not model._inflight
    assert len(model.token2wav._cached) == 0  # no flow cache outlives its stream
    assert model.token2wav.flow.pool.held == 0  # nor any of the flow pool's blocks


def test_cancel_while_vocoding_releases_everything(threaded):
    pool = threaded.llm.net.kv_pool()
    base = pool.used_blocks
    a, b = _start(threaded, 0), _start(threaded, 1)
    for _ in range(200):
        threaded.step([u for u in (a, b) if u.status is not Status.FINISHED])
        if b.vocoding:
            break
    assert b.vocoding
    threaded.cancel(b)
    late = []
    while a.status is not Status.FINISHED:
        late += [o for o in threaded.step([a]) if o.utterance is b]
    assert late == [] and b.status is Status.FINISHED
    assert pool.used_blocks == base
    _settle(threaded)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_batch_fails_only_its_utterances(threaded, monkeypatch, stream):
    """Streaming, it fails at its second chunk, its flow state holding pool blocks: they are
    back once it has failed, with no garbage collection (a cycle through the error's
    traceback kept them until one: the pool could not shrink, a GPU's fixed pool lost them)."""
    good, bad = _start(threaded, 0), _start(threaded, 1, stream=stream)
    t2w, step = threaded.token2wav, threaded.token2wav.step
    calls = []

    def failing(items):
        if any(st is bad.t2w for st, _, _ in items):
            calls.append(len(items))
            if len(calls) == 1 + stream:
                raise RuntimeError("vocoder broke")
        return step(items)

    monkeypatch.setattr(t2w, "step", failing)
    gc.disable()
    try:
        outs, _ = _run(threaded, [good, bad])
        held = threaded.token2wav.flow.pool.held
    finally:
        gc.enable()
    (err,) = [o for o in outs[id(bad)] if o.error]
    assert "vocoder broke" in err.error and err.done and bad.status is Status.FINISHED
    assert outs[id(good)][-1].done and sum(o.audio.numel() for o in outs[id(good)]) > 0
    assert held == 0
    _settle(threaded)


def test_text_streaming_gets_all_its_audio_before_waiting_for_text(inline, threaded, monkeypatch):
    """A text-streaming run that stops for more text has had every chunk its tokens allow, also
    when the tokens came while a batch was on the vocoder thread (a slow one here: the run
    decodes up to its wait for text while the batch is out)."""
    step = threaded.token2wav.step

    def slow(items):
        time.sleep(0.3)
        return step(items)

    monkeypatch.setattr(threaded.token2wav, "step", slow)
    words = "Words keep coming in from the agent, one after another, until the turn is sealed"

    def until_idle(model) -> tuple[int, np.ndarray]:
        u = model.start(model.speakers.list()[0], seed=21, text_stream=True)
        model.add_text(u, words + " and then", tag="t")
        outs: list[Output] = []
        while u.busy:
            outs += model.step([u])
        before = sum(o.audio.numel() for o in outs)
        model.close_text(u)
        outs += _run(model, [u])[0][id(u)]
        return before, torch.cat([o.audio for o in outs]).numpy()

    (n_ref, ref), (n_got, got) = until_idle(inline), until_idle(threaded)
    assert n_ref > 0 and n_got == n_ref
    np.testing.assert_allclose(got, ref, atol=2e-3)
    _settle(threaded)


def test_audio_collected_in_a_failing_step_goes_out_with_the_next(inline, threaded, monkeypatch):
    ref, _ = _run(inline, [_start(inline, i) for i in range(2)])
    utts = [_start(threaded, i) for i in range(2)]
    outs: dict[int, list[Output]] = {id(u): [] for u in utts}
    while not threaded._inflight:
        for o in threaded.step(utts):
            outs[id(o.utterance)].append(o)
    threaded._inflight[0][0].result()  # the batch is done: the next step collects it
    llm_step = threaded.llm.step
    monkeypatch.setattr(threaded.llm, "step", lambda reqs: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        threaded.step(utts)
    monkeypatch.setattr(threaded.llm, "step", llm_step)
    while live := [u for u in utts if u.status is not Status.FINISHED]:
        for o in threaded.step(live):
            outs[id(o.utterance)].append(o)
    for a, b in zip(ref.values(), outs.values(), strict=True):
        x, y = (torch.cat([o.audio for o in s]).numpy() for s in (a, b))
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=2e-3)
    _settle(threaded)


def test_close_keeps_the_audio_in_flight(golden_dir, tmp_path_factory, inline):
    """close() stops the thread after its batches; their audio and the rest come inline."""
    model = _load(golden_dir, tmp_path_factory, True)
    ref, _ = _run(inline, [_start(inline, 0)])
    u = _start(model, 0)
    outs = []
    while not model._inflight:
        outs += model.step([u])
    model.close()
    assert not model.vocoder_thread and not u.vocoding
    while u.status is not Status.FINISHED:
        outs += model.step([u])
    (expected,) = ref.values()
    x, y = (torch.cat([o.audio for o in s]).numpy() for s in (expected, outs))
    assert x.shape == y.shape
    np.testing.assert_allclose(y, x, atol=2e-3)


@pytest.mark.parametrize("mode", ["inline", "threaded"])
def test_a_prompt_is_kept_where_flow_calls_run(mode, request, monkeypatch):
    """keep_prompt may come from any thread (the server's registration): with the vocoder
    thread it runs there, after the batch in flight; inline it waits for the step's flow
    call to end. Either way the speaker's next stream starts from it."""
    model = request.getfixturevalue(mode)
    flow = model.token2wav.flow
    flow.prompts.clear()
    ran_on: list[str] = []
    keep = flow.keep_prompt
    monkeypatch.setattr(flow, "keep_prompt",
                        lambda r: ran_on.append(threading.current_thread().name) or keep(r))  # fmt: skip
    with model._flow_lock if mode == "inline" else contextlib.nullcontext():
        asked = threading.Thread(target=model.keep_prompt, args=("zs_spk1",))
        asked.start()
        if mode == "inline":  # waits for the flow call holding the lock
            asked.join(timeout=0.5)
            assert asked.is_alive() and len(flow.prompts) == 0
    asked.join(timeout=60)
    assert len(flow.prompts) == 1 and len(ran_on) == 1
    assert ran_on[0].startswith("cosyvoice-vocoder") == (mode == "threaded")
    u = model.start("zs_spk1", seed=3, fixed_tokens=2 * TOKENS)  # past the first hop
    model.add_text(u, "A kept voice.")
    model.close_text(u)
    while u.status is not Status.FINISHED:
        model.step([u])
    assert flow.prompts.hits == 1 and flow.prompts.misses == 0
    assert model.stats()["prompts"] == 1
    _settle(model)


def test_steps_flow_calls_run_between_the_pieces_of_a_kept_prompt(inline, monkeypatch):
    """Inline, keep_prompt takes the flow's lock once per piece of the prompt (two here); a
    step that asks for it meanwhile gets it before the next piece (a plain lock would go
    back to the keeping thread, still running, and streams would wait for the whole prompt)."""
    flow = inline.token2wav.flow
    flow.prompts.clear()
    order: list[str] = []
    call = flow._call

    def piece(reqs):
        order.append("piece")
        if len(order) == 1:
            time.sleep(0.3)  # the step asks for the lock meanwhile
        return call(reqs)

    monkeypatch.setattr(flow, "_call", piece)
    keeping = threading.Thread(target=inline.keep_prompt, args=("zs_spk1",))
    keeping.start()
    while not order:
        time.sleep(0.01)
    with inline._flow_lock:  # as _advance takes it for a step's flow call
        order.append("step")
    keeping.join(timeout=60)
    assert order == ["piece", "step", "piece"] and len(flow.prompts) == 1


def test_a_kept_prompt_stops_between_pieces_when_asked(inline):
    """keep_prompt's ``stop`` (the server shutting down, the speaker deleted) ends it after
    the piece in progress: nothing kept, its cache back in the pool."""
    flow = inline.token2wav.flow
    flow.prompts.clear()
    asked: list[int] = []
    assert not inline.keep_prompt("zs_spk1", stop=lambda: asked.append(1) or True)
    assert asked == [1] and len(flow.prompts) == 0  # asked after the first of two pieces
    _settle(inline)
    assert inline.keep_prompt("zs_spk1", stop=lambda: False) and len(flow.prompts) == 1


def test_first_audio_is_waited_for_and_later_chunks_go_beside_the_steps(threaded):
    """A batch that carries a listener's first audio: the steps wait for it (beside them it
    would share the GIL and the GPU with their decoding). Later chunks still go beside."""
    u = _start(threaded, 0)
    later_beside = 0
    while u.status is not Status.FINISHED:
        outs = threaded.step([u])
        assert u.heard or not u.vocoding, "the step left a first chunk on the vocoder thread"
        later_beside += u.vocoding
        if not u.heard:
            assert not any(o.audio.numel() for o in outs)
    assert later_beside > 0, "no later chunk went beside the steps"
    _settle(threaded)


def test_first_audio_goes_beside_the_steps_while_another_listener_runs_dry(threaded):
    """Another listener with little audio left: its stream keeps decoding (the steps do not
    stop for the newcomer's first chunk)."""
    old = _start(threaded, 0)
    while not old.heard:
        threaded.step([old])
    new, beside = _start(threaded, 1), False
    while live := [u for u in (old, new) if u.status is not Status.FINISHED]:
        threaded.step(live, lambda u: 0.2 if u.heard else None)
        beside |= new.vocoding and not new.heard
    assert beside, "the steps stopped for a first chunk while another listener ran dry"
    _settle(threaded)
