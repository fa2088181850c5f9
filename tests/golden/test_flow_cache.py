"""Streaming over the flow cache (v2 U-Net, v3 DiT): every chunk of a long random utterance equals
the chunk recomputed from scratch, alone and batched with ragged requests; the estimator only ever
sees a chunk's new frames; the memory bound drops a cache without changing the audio; a call that
skips a chunk is refused. Upstream parity of the cached chunks is in test_token2wav/test_e2e."""

from __future__ import annotations

import pytest
import torch
from _fixtures import FAMILIES, ONE_THREAD, CountOps, drive_ragged, family_params
from conftest import assert_close

from cosyvoice.flow import FlowCache, FlowInput, load_flow
from cosyvoice.flow.cache import BLOCK, CPU_ROOM
from cosyvoice.hift import load_hift
from cosyvoice.token2wav import make_token2wav

V2_V3 = family_params("e2e_sft.npz", "v2", "v3")
MEL_TOL = 1e-4  # golden README: flow mel
WAVE_TOL = 1e-3
N_TOKENS = 420  # hops 25, 50, 100, 100, 100 and a final piece: 16.8 s

pytestmark = [ONE_THREAD, pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")]


@pytest.fixture(scope="module")
def parts(family):
    d = FAMILIES[family] / "model"
    spk = torch.load(d / "spk2info.pt", map_location="cpu", weights_only=True)
    return load_flow(d), load_hift(d), spk


def _speakers(spk):
    """(embedding, prompt tokens, prompt mel) of an SFT speaker and of a zero-shot one."""
    sft = next(s for s in spk.values() if "embedding" in s)
    zs = next(s for s in spk.values() if "flow_prompt_speech_token" in s)
    return [
        (sft["embedding"], None, None),
        (zs["flow_embedding"], zs["flow_prompt_speech_token"][0], zs["prompt_speech_feat"][0]),
    ]


def _tokens(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _stream(t2w, speaker, toks, seed=3):
    st = t2w.new_state(*speaker, seed=seed)
    return list(t2w.stream(st, [toks])), st


def test_flow_calls_over_the_cache_equal_recomputed(parts):
    """Chunk-aligned calls with a cache return the frames a from-scratch call returns."""
    flow, _, spk = parts
    for emb, pt, pf in _speakers(spk):
        pt = torch.zeros(0, dtype=torch.long) if pt is None else pt
        pf = torch.zeros(0, 80) if pf is None else pf
        pad = -pt.numel() % 25
        toks = torch.tensor(_tokens(300, 1, flow.cfg.vocab_size))
        cache, offset = FlowCache(), 0
        for end, final in [(25 + pad, False), (75 + pad, False), (175 + pad, False), (300, True)]:
            n = end if final else end + 3
            args = (toks[:n], pt, pf, emb, True, final, 2 * offset)
            (cached,) = flow.inference([FlowInput(*args, cache=cache)])
            (scratch,) = flow.inference([FlowInput(*args)])
            assert cached.shape == scratch.shape == (80, 2 * (end - offset))
            assert_close(cached, scratch, MEL_TOL, what=f"chunk ending at token {end}")
            offset = end
        assert cache.tokens == pt.numel() + 175 + pad  # the final call does not extend it


def test_long_utterance_cached_equals_recomputed(parts):
    """Every emitted chunk of a 16.8 s stream, with and without caches (the final chunk too:
    both read/recompute it chunk-masked), for a plain and a prompted speaker."""
    flow, hift, spk = parts
    cached_t2w, scratch_t2w = (
        make_token2wav(flow, hift),
        make_token2wav(flow, hift, flow_cache_mb=0),
    )
    toks = _tokens(N_TOKENS, 2, flow.cfg.vocab_size)
    for speaker in _speakers(spk):
        got, st = _stream(cached_t2w, speaker, toks)
        ref, st_ref = _stream(scratch_t2w, speaker, toks)
        assert st_ref.flow_cache is None and st.flow_cache is None  # freed at the end
        assert [c.numel() for c in got] == [c.numel() for c in ref] and len(got) >= 6
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            assert_close(a, b, WAVE_TOL, what=f"chunk {i}")


def test_estimator_sees_only_new_frames(parts):
    """The linear-time property itself: each Euler step of a cached chunk runs the estimator on
    that chunk's frames, not on the utterance so far."""
    flow, hift, spk = parts
    seen: list[int] = []
    hook = flow.decoder.estimator.register_forward_hook(
        lambda m, args, out: seen.append(out.shape[-1])
    )
    try:
        chunks, _ = _stream(
            make_token2wav(flow, hift), _speakers(spk)[0], _tokens(300, 4, flow.cfg.vocab_size)
        )
    finally:
        hook.remove()
    per_call = seen[:: flow.cfg.n_timesteps]  # one entry per flow call
    # hops 25, 50, 100, 100 tokens -> 50, 100, 200, 200 frames, then the last 25 tokens
    assert per_call == [50, 100, 200, 200, 50]
    assert len(chunks) == 5


def test_batched_ragged_requests_over_caches(parts):
    """Three requests stepped together with ragged token arrival (their caches at different
    lengths in one padded call) give what each gives alone from scratch."""
    flow, hift, spk = parts
    t2w, scratch = make_token2wav(flow, hift), make_token2wav(flow, hift, flow_cache_mb=0)
    toks = _tokens(260, 6, flow.cfg.vocab_size)
    (sft, prompted) = _speakers(spk)
    speakers = [sft, prompted, sft]
    alone = [torch.cat(_stream(scratch, s, toks, seed=i)[0]) for i, s in enumerate(speakers)]
    states = [t2w.new_state(*s, seed=i) for i, s in enumerate(speakers)]
    got, n_batched = drive_ragged(t2w, states, toks, [9, 13, 4])
    assert n_batched > 0
    for i in range(3):
        assert_close(torch.cat(got[i]), alone[i], WAVE_TOL, what=f"request {i}")


def test_the_pool_reads_no_position_it_did_not_write(parts, monkeypatch):
    """The pool's tensors are made empty (and on the CPU larger than needed): made full of NaN
    instead, ragged streams still give what each gives alone. No key that is masked out or not
    yet written is ever multiplied in, and a growth keeps every position in use."""
    flow, hift, spk = parts
    flow.pool.drop()  # its tensors are made again, under the patch
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda x, *size, **kw: x.new_full(size, float("nan"), **kw)
    )
    t2w, scratch = make_token2wav(flow, hift), make_token2wav(flow, hift, flow_cache_mb=0)
    toks = _tokens(200, 8, flow.cfg.vocab_size)
    speakers = [_speakers(spk)[0]] * 4
    alone = [torch.cat(_stream(scratch, s, toks, seed=i)[0]) for i, s in enumerate(speakers)]
    states = [t2w.new_state(*s, seed=i) for i, s in enumerate(speakers)]
    got, _ = drive_ragged(t2w, states, toks, [9, 13, 4, 30])
    frames = flow.pool.blocks["frames"]
    assert frames.size > CPU_ROOM * frames.initial  # its tensors grew past their first room
    for i in range(len(states)):
        assert_close(torch.cat(got[i]), alone[i], WAVE_TOL, what=f"request {i}")


def test_memory_bound_drops_the_cache_not_the_audio(parts):
    flow, hift, spk = parts
    flow.prompts.clear()  # the bound counts the prompt store too
    tiny = make_token2wav(flow, hift, flow_cache_mb=0.05)
    toks = _tokens(200, 7, flow.cfg.vocab_size)
    st = tiny.new_state(*_speakers(spk)[0], seed=1)
    assert st.flow_cache is not None
    (first,) = tiny.step([(st, toks[:28], False)])
    assert first is not None and st.flow_cache is None  # over 50 kB after one chunk
    rest = list(tiny.stream(st, [toks[28:]]))
    ref, _ = _stream(make_token2wav(flow, hift), _speakers(spk)[0], toks, seed=1)
    for i, (a, b) in enumerate(zip([first, *rest], ref, strict=True)):
        assert_close(a, b, WAVE_TOL, what=f"chunk {i}")


def test_memory_bound_is_shared_by_all_streams(parts):
    """Room for one stream's cache, not two: of two streams stepped together one keeps its
    cache and one recomputes, both with the right audio; a dropped state leaves the bound."""
    flow, hift, spk = parts
    flow.prompts.clear()  # the bound counts the prompt store too
    toks = _tokens(140, 9, flow.cfg.vocab_size)
    probe = make_token2wav(flow, hift)
    st = probe.new_state(*_speakers(spk)[0])
    probe.step([(st, toks[:28], False)])
    one = st.flow_cache.nbytes
    del st
    assert not probe._cached  # a state nobody holds no longer counts
    shared = make_token2wav(flow, hift, flow_cache_mb=1.5 * one / 2**20)
    states = [shared.new_state(*_speakers(spk)[0], seed=i) for i in range(2)]
    first = shared.step([(s, toks[:28], False) for s in states])
    assert sorted(s.flow_cache is None for s in states) == [False, True]
    rest, _ = drive_ragged(shared, states, toks[28:], [28, 28])
    for i in range(2):
        ref, _ = _stream(make_token2wav(flow, hift), _speakers(spk)[0], toks, seed=i)
        got = torch.cat([first[i], *rest[i]])
        assert_close(got, torch.cat(ref), WAVE_TOL, what=f"stream {i}")


def test_over_the_bound_the_largest_cache_goes(parts):
    """Not the stream that just grew: the one holding the most (a long whole utterance paced
    in hops, say) recomputes from then on."""
    flow, hift, spk = parts
    flow.prompts.clear()  # the bound counts the prompt store too
    toks = _tokens(140, 9, flow.cfg.vocab_size)
    probe = make_token2wav(flow, hift)
    big, small = (probe.new_state(*_speakers(spk)[0]) for _ in range(2))
    probe.step([(big, toks[:28], False)])
    probe.step([(big, toks[28:78], False)])  # a second hop: about three times the first's
    probe.step([(small, toks[:28], False)])
    sizes = big.flow_cache.nbytes, small.flow_cache.nbytes
    del big, small
    t = make_token2wav(flow, hift, flow_cache_mb=(sizes[0] + sizes[1] / 2) / 2**20)
    big, small = (t.new_state(*_speakers(spk)[0]) for _ in range(2))
    t.step([(big, toks[:28], False)])
    t.step([(big, toks[28:78], False)])
    assert big.flow_cache is not None  # alone it fits
    t.step([(small, toks[:28], False)])
    assert big.flow_cache is None and small.flow_cache is not None


def test_cache_grows_with_frames_and_refuses_a_skipped_chunk(parts):
    flow, _, spk = parts
    emb = _speakers(spk)[0][0]
    toks = torch.tensor(_tokens(200, 8, flow.cfg.vocab_size))
    none = torch.zeros(0, dtype=torch.long), torch.zeros(0, 80)
    cache = FlowCache()
    flow.inference([FlowInput(toks[:28], *none, emb, True, False, 0, cache)])
    one = cache.nbytes
    flow.inference([FlowInput(toks[:78], *none, emb, True, False, 50, cache)])
    assert cache.tokens == 75 and cache.length == {"tokens": 75, "frames": 150}
    assert 2 * one <= cache.nbytes <= 4.5 * one  # ~3x the positions (plus fixed conv tails)
    stale = FlowCache()
    flow.inference([FlowInput(toks[:28], *none, emb, True, False, 0, stale)])
    stale.tokens = 50  # claims positions it does not hold
    with pytest.raises(RuntimeError, match="flow cache holds"):
        flow.inference([FlowInput(toks[:103], *none, emb, True, False, 100, stale)])


def _second_chunk_ops(flow, emb, toks, n: int) -> CountOps:
    """The ops of one batched flow call continuing ``n`` cached streams (their second chunk)."""
    none = torch.zeros(0, dtype=torch.long), torch.zeros(0, 80)
    caches = [FlowCache() for _ in range(n)]
    flow.inference([FlowInput(toks[:28], *none, emb, True, False, 0, c) for c in caches])
    counter = CountOps()
    with counter:
        flow.inference([FlowInput(toks[:78], *none, emb, True, False, 50, c) for c in caches])
    return counter


def test_flow_call_ops_do_not_grow_with_batch(parts):
    """Every layer reads and writes the whole batch's cached keys and conv inputs through one
    index tensor each, so a call over 6 streams runs the ops of a call over 1 plus a few per
    request (its tokens and noise), not a few per request per layer; no layer makes the host
    wait for the device. The pool gives everything back when the streams go."""
    flow, _, spk = parts
    emb = _speakers(spk)[0][0]
    toks = torch.tensor(_tokens(100, 10, flow.cfg.vocab_size))
    # grow the pool first (growth copies every layer) and hold it there: an empty pool shrinks
    none = torch.zeros(0, dtype=torch.long), torch.zeros(0, 80)
    warm = [FlowCache() for _ in range(7)]
    flow.inference([FlowInput(toks[:78], *none, emb, True, False, 0, c) for c in warm])
    del warm[1:]
    one, six = (_second_chunk_ops(flow, emb, toks, n) for n in (1, 6))
    warm[0].release()
    assert flow.pool.held == 0
    extra = sum(six.ops.values()) - sum(one.ops.values())
    layers = sum(1 for m in flow.modules() if hasattr(m, "to_qkv") or hasattr(m, "linear_qkv"))
    assert sum(one.ops.values()) > 10 * layers * flow.cfg.n_timesteps  # it saw the estimator
    assert extra <= 40 * 5, six.ops - one.ops
    assert sum(six.host_waits().values()) <= 8, six.host_waits()


def test_stateless_requests_stay_out_of_the_pool(parts, monkeypatch):
    """A whole-utterance request batched with a stream runs apart from the pool: its 600
    frames neither grow the pool nor change its mel; the pool shrinks once nothing is held
    (at once here: no hold)."""
    flow, _, spk = parts
    monkeypatch.setattr(flow.pool, "hold_s", 0.0)
    emb = _speakers(spk)[0][0]
    toks = torch.tensor(_tokens(300, 11, flow.cfg.vocab_size))
    none = torch.zeros(0, dtype=torch.long), torch.zeros(0, 80)
    cache = FlowCache()
    stream = FlowInput(toks[:28], *none, emb, True, False, 0, cache)
    got = flow.inference([stream, FlowInput(toks, *none, emb)])
    (alone,) = flow.inference([FlowInput(toks, *none, emb)])
    assert_close(got[1], alone, MEL_TOL, what="the stateless request")
    assert cache.length["frames"] == 50 and flow.pool.blocks["frames"].size * BLOCK < 600
    big = [FlowCache() for _ in range(4)]
    flow.inference([FlowInput(toks[:203], *none, emb, True, False, 0, c) for c in big])
    grown = flow.pool.blocks["frames"].size
    del big
    cache.release()
    flow.inference([FlowInput(toks[:50], *none, emb, True, True, 0, FlowCache())])
    assert flow.pool.held == 0 and flow.pool.blocks["frames"].size < grown


def _first_call_frames(flow, t2w, speaker, toks) -> tuple[list[int], torch.Tensor]:
    """The frames the estimator saw per flow call while a stream made its first chunk (the
    pieces of its prompt first), and the chunk."""
    seen: list[int] = []
    hook = flow.decoder.estimator.register_forward_hook(
        lambda m, args, out: seen.append(out.shape[-1])
    )
    try:
        st = t2w.new_state(*speaker, seed=5)
        t2w.feed(st, toks)
        while (chunk := t2w.step([(st, [], False)])[0]) is None:  # until the first hop's
            assert len(seen) < 100 * flow.cfg.n_timesteps
    finally:
        hook.remove()
    if st.flow_cache is not None:
        st.flow_cache.release()
    return seen[:: flow.cfg.n_timesteps], chunk


def _long_prompt(spk, times: int = 4):
    """A zero-shot speaker whose prompt is ``times`` its recording (60 tokens each)."""
    _, (emb, pt, pf) = _speakers(spk)
    return emb, pt.repeat(times), pf.repeat(times, 1)


def test_a_long_prompt_goes_through_the_flow_in_pieces(parts):
    """A stream's prompt goes through the flow ahead of its tokens in pieces of at most the
    longest hop (100 tokens): a 240-token prompt (9.6 s) in calls of 100, 100 and 25 tokens,
    then the first hop alone. Its first chunk is the one a single call over the prompt and the
    hop makes (without a cache: upstream's way)."""
    flow, hift, spk = parts
    speaker = _long_prompt(spk)
    toks = _tokens(40, 15, flow.cfg.vocab_size)
    flow.prompts.clear()
    pad = -240 % 25  # the first hop ends on the chunk grid
    frames, chunk = _first_call_frames(flow, make_token2wav(flow, hift), speaker, toks)
    assert frames == [200, 200, 50, 2 * (240 - 225 + 25 + pad)]
    whole, ref = _first_call_frames(
        flow, make_token2wav(flow, hift, flow_cache_mb=0), speaker, toks
    )
    assert whole == [2 * (240 + 25 + pad)]
    assert_close(chunk, ref, WAVE_TOL, what="the first chunk after a prompt in pieces")
    assert flow.pool.held == 0


def test_a_long_prompt_starting_holds_no_other_streams_chunk(parts):
    """A stream with a long prompt (720 tokens, 29 s) starts beside one already speaking: each
    step's one flow call carries the other's next chunk and a piece of the prompt, never more
    than a hop's frames (the whole prompt was 1440 frames in one call, the other stream's chunk
    waiting on it)."""
    flow, hift, spk = parts
    t2w = make_token2wav(flow, hift)
    flow.prompts.clear()
    sft, _ = _speakers(spk)
    calls: list[int] = []
    hook = flow.decoder.estimator.register_forward_hook(
        lambda m, a, out: calls.append(out.shape[-1])
    )
    speaking, joining = t2w.new_state(*sft, seed=1), t2w.new_state(*_long_prompt(spk, 12), seed=2)
    toks = _tokens(400, 16, flow.cfg.vocab_size)
    try:
        t2w.feed(speaking, toks)  # chunks of 25, 50, 100, 100 and 100 tokens ready
        t2w.feed(joining, toks[:40])  # its first hop ready (30 tokens on the chunk grid, 3 ahead)
        heard = []
        for _ in range(7):  # the prompt's 700 tokens: 7 pieces of 100
            a, b = t2w.step([(speaking, [], False), (joining, [], False)])
            heard.append(a is not None)
            assert b is None
        assert heard == [True] * 5 + [False] * 2
        assert max(calls) <= 200 and len(calls) == 7 * flow.cfg.n_timesteps
        (b,) = t2w.step([(joining, [], False)])  # then its first hop (and the prompt's last 20)
        assert b is not None and b.numel() > 0 and calls[-1] == 2 * (720 - 700 + 30)
    finally:
        hook.remove()
        for st in (speaking, joining):
            st.flow_cache.release()
    assert flow.pool.held == 0


def test_a_prompted_stream_starts_past_its_speakers_saved_prompt(parts):
    """A zero-shot speaker's prompt (60 tokens) is computed up to the last chunk with its
    look-ahead inside it (50 tokens) in a call of its own before the stream's tokens, and kept
    from its second stream on: later streams copy it in and compute only the rest and their
    hop. The first chunk is the same each time; an SFT speaker (no prompt) and a flow without
    a store budget skip the store. The pool holds nothing afterwards."""
    flow, hift, spk = parts
    sft, prompted = _speakers(spk)
    toks = _tokens(60, 12, flow.cfg.vocab_size)
    flow.prompts.clear()
    t2w = make_token2wav(flow, hift)
    pad = -prompted[1].numel() % 25  # the first hop ends on the chunk grid
    rest = 2 * (prompted[1].numel() - 50 + 25 + pad)
    once, a = _first_call_frames(flow, t2w, prompted, toks)
    assert once == [100, rest] and len(flow.prompts) == 0  # a prompt seen once is not kept
    again, b = _first_call_frames(flow, t2w, prompted, toks)
    assert again == [100, rest] and len(flow.prompts) == 1
    later, c = _first_call_frames(flow, t2w, prompted, toks)
    assert later == [rest] and flow.prompts.hits == 1
    assert torch.equal(b, c)
    assert_close(b, a, WAVE_TOL, what="the first chunk over the store")
    flow.prompts.budget, kept = 0, flow.prompts.budget
    try:
        flow.prompts.clear()
        assert [_first_call_frames(flow, t2w, prompted, toks)[0] for _ in range(2)] == [
            [100, rest]
        ] * 2
    finally:
        flow.prompts.budget = kept
    assert len(flow.prompts) == 0
    assert _first_call_frames(flow, t2w, sft, toks)[0] == [50] and len(flow.prompts) == 0
    assert flow.pool.held == 0


def _kept(pieces) -> tuple[bool, int]:
    """Drive keep_prompt's pieces: whether it kept the prompt, and how many flow calls."""
    n = 0
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value, n
        n += 1


def test_a_prompt_kept_ahead_serves_the_first_stream(parts):
    """keep_prompt (a speaker registered to be used) computes the prompt's part at once, a
    chunk per call (60 tokens: two of 25): its very first stream copies it in and makes the
    chunk a stream computing it would. Asked again it computes nothing; an SFT speaker and a
    store without budget keep nothing; without room it computes nothing either.
    forget_prompt (the speaker deleted) frees it."""
    flow, hift, spk = parts
    sft, prompted = _speakers(spk)
    toks = _tokens(60, 15, flow.cfg.vocab_size)
    flow.prompts.clear()
    t2w = make_token2wav(flow, hift)
    _, cold = _first_call_frames(flow, t2w, prompted, toks)
    assert len(flow.prompts) == 0
    calls: list[int] = []
    hook = flow.decoder.estimator.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert _kept(t2w.keep_prompt(*prompted)) == (True, 2) and len(flow.prompts) == 1
        assert len(calls) == 2 * flow.cfg.n_timesteps
        assert _kept(t2w.keep_prompt(*prompted)) == (True, 0)  # kept already
        other = (-prompted[0], *prompted[1:])
        flow.prompts.budget, budget = 1.5 * flow.prompts.nbytes, flow.prompts.budget
        assert _kept(t2w.keep_prompt(*other)) == (False, 0)  # no room: nothing computed
        flow.prompts.budget = budget
        assert len(calls) == 2 * flow.cfg.n_timesteps
    finally:
        hook.remove()
    pad = -prompted[1].numel() % 25  # the first hop ends on the chunk grid
    rest = 2 * (prompted[1].numel() - 50 + 25 + pad)
    frames, warm = _first_call_frames(flow, t2w, prompted, toks)
    assert frames == [rest] and flow.prompts.hits == 1
    assert_close(warm, cold, WAVE_TOL, what="the first chunk from a prompt kept ahead")
    assert (
        _kept(t2w.keep_prompt(sft[0], torch.zeros(0, dtype=torch.long), torch.zeros(0, 80)))[0]
        is False
    )
    assert t2w.forget_prompt(*prompted) and (len(flow.prompts), flow.prompts.nbytes) == (0, 0)
    assert not t2w.forget_prompt(*prompted)
    flow.prompts.budget, kept = 0, flow.prompts.budget
    try:
        flow.prompts.clear()
        assert _kept(t2w.keep_prompt(*prompted)) == (False, 0) and len(flow.prompts) == 0
    finally:
        flow.prompts.budget = kept
    assert flow.pool.held == 0


def test_a_prompt_kept_under_autocast_keeps_the_flows_dtype(family):
    """A bfloat16 model's flow runs under autocast (cosyvoice.load wraps it); keep_prompt's
    pieces do too, so the pool's tensors and what the store keeps stay in the dtype the
    streams' calls use (on CUDA a change of dtype would also drop the flow's graphs)."""
    from cosyvoice.model import _Autocast

    d = FAMILIES[family] / "model"
    flow, hift = load_flow(d), load_hift(d)
    spk = torch.load(d / "spk2info.pt", map_location="cpu", weights_only=True)
    t2w = make_token2wav(flow, hift)
    t2w.flow = _Autocast(flow, "cpu", torch.bfloat16)
    assert _kept(t2w.keep_prompt(*_speakers(spk)[1]))[0]
    (saved,) = flow.prompts._saved.values()
    assert {t.dtype for t in saved.kv.values()} == {torch.bfloat16}
    assert {t.dtype for t in flow.pool.kv.values()} <= {torch.bfloat16}


def test_a_bf16_flow_stores_what_autocast_casts_and_speaks_the_same(family, monkeypatch):
    """``cosyvoice.load`` keeps a bfloat16 model's flow linears and convolutions in bf16
    (``devices.store_in``), which autocast would otherwise cast on every call: the audio is the
    same bit for bit as autocast's over float32 weights, for an SFT and a zero-shot speaker,
    and norms and embeddings keep float32."""
    import cosyvoice
    import cosyvoice.devices as devices
    from cosyvoice.model import _Autocast

    d = FAMILIES[family] / "model"
    monkeypatch.setattr(devices, "cpu_has_bf16_units", lambda: True)  # bf16 on any CPU
    # (packed=False: packing a bf16 LLM needs AVX-512, and only the flow is looked at here)
    loaded = cosyvoice.load(d, dtype="bfloat16", speaker_dir=None, packed=False).token2wav.flow
    spk = torch.load(d / "spk2info.pt", map_location="cpu", weights_only=True)
    audio = []
    for flow in (load_flow(d), loaded._flow):
        t2w = make_token2wav(flow, load_hift(d))
        t2w.flow = _Autocast(flow, "cpu", torch.bfloat16)
        toks = _tokens(80, 1, flow.cfg.vocab_size)
        audio.append([torch.cat(_stream(t2w, s, toks)[0]) for s in _speakers(spk)])
    for plain, stored in zip(*audio, strict=True):
        assert torch.equal(plain, stored)
    matmuls = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    dtypes = {
        (isinstance(m, matmuls), p.dtype)
        for m in loaded.modules()
        for p in m.parameters(recurse=False)
    }
    assert dtypes == {(True, torch.bfloat16), (False, torch.float32)}
    assert any(isinstance(m, torch.nn.Embedding) for m in loaded.modules())


def test_the_prompt_store_keeps_what_its_budget_holds(parts, monkeypatch):
    """Keyed by the prompt's content (another x-vector is another entry); past the budget the
    least recently used goes, also when the budget is lowered; a prompt larger than the whole
    budget is not kept, nor tried again."""
    flow, hift, spk = parts
    _, (emb, pt, pf) = _speakers(spk)
    toks = _tokens(60, 13, flow.cfg.vocab_size)
    flow.prompts.clear()
    t2w = make_token2wav(flow, hift)
    voices = [(emb, pt, pf), (-emb, pt, pf), (emb.flip(-1), pt, pf)]

    def twice(v) -> list[int]:  # a prompt is kept from its second stream on
        return [len(_first_call_frames(flow, t2w, v, toks)[0]) for _ in range(2)]

    twice(voices[0])
    one = flow.prompts.nbytes
    flow.prompts.budget, kept = 2.5 * one, flow.prompts.budget
    try:
        for v in voices[1:]:
            twice(v)
        assert len(flow.prompts) == 2 and flow.prompts.nbytes == 2 * one
        assert twice(voices[0]) == [2, 1]  # evicted: computed (seen before: kept), then copied
        flow.prompts.budget = 1.5 * one  # lowered: the least recently used goes now
        assert len(flow.prompts) == 1 and flow.prompts.nbytes == one
        assert len(_first_call_frames(flow, t2w, voices[0], toks)[0]) == 1  # the one left
        flow.prompts.clear()
        flow.prompts.budget = 0.5 * one
        refused = []
        refuse = flow.prompts.refuse
        monkeypatch.setattr(flow.prompts, "refuse", lambda key: refused.append(refuse(key)))
        assert twice(voices[0]) == [2, 2] and len(flow.prompts) == 0  # too large to keep
        assert len(refused) == 1
        assert twice(voices[0]) == [2, 2] and len(refused) == 1  # and not tried again
        flow.prompts.clear()
        flow.prompts.budget = one  # what its copy takes (the cache's whole blocks take more)
        assert twice(voices[0]) == [2, 2] and len(flow.prompts) == 1 and len(refused) == 1
    finally:
        flow.prompts.budget = kept
    assert flow.pool.held == 0


def test_a_prompt_copy_out_of_memory_leaves_the_stream_whole(parts, monkeypatch):
    """Out of memory while a kept prompt is copied in (after the copy took blocks), the
    stream computes its whole prompt instead, with the same audio, and gives everything back;
    any other error is not hidden."""
    flow, hift, spk = parts
    _, prompted = _speakers(spk)
    toks = _tokens(60, 14, flow.cfg.vocab_size)
    flow.prompts.clear()
    t2w = make_token2wav(flow, hift)
    kept = [_first_call_frames(flow, t2w, prompted, toks) for _ in range(2)][-1][1]
    assert len(flow.prompts) == 1

    def fail(why: str):
        def restore(saved, cache):
            flow.pool.reserve(cache, "frames", 40)
            raise RuntimeError(why)

        return restore

    monkeypatch.setattr(flow.pool, "restore", fail("CPU allocator: can't allocate memory"))
    frames, chunk = _first_call_frames(flow, t2w, prompted, toks)
    assert len(frames) == 2 and frames[0] == 100  # the prompt computed (a piece), then the hop
    assert_close(chunk, kept, WAVE_TOL, what="the first chunk without the copy")
    assert flow.pool.held == 0
    monkeypatch.setattr(flow.pool, "restore", fail("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        _first_call_frames(flow, t2w, prompted, toks)


def test_a_pool_that_may_not_grow_copies_a_kept_prompt_only_into_free_blocks(parts, family):
    """Under CUDA graphs the pool keeps its size (its tensors' addresses are in the graphs): a
    kept prompt is copied into a stream's cache only where the pool has the blocks free. Here
    it has not (8 blocks of frames, the prompt's part takes 13): the stream goes without a
    cache, as the memory bound would have it, with the same first chunk, and the pool does not
    grow. The copy grew it, and a GPU's graphs all went."""
    _, hift, spk = parts
    flow = load_flow(FAMILIES[family] / "model")
    t2w = make_token2wav(flow, hift)
    _, prompted = _speakers(spk)
    toks = _tokens(60, 17, flow.cfg.vocab_size)
    for _ in t2w.keep_prompt(*prompted):
        pass
    pad = -prompted[1].numel() % 25
    frames, want = _first_call_frames(flow, t2w, prompted, toks)
    assert frames == [2 * (prompted[1].numel() - 50 + 25 + pad)]  # copied in: the rest alone
    flow.pool.presize({"tokens": 8, "frames": 8}, 4)
    flow.pool.keep = True  # pinned, as captured graphs pin it
    layout = flow.pool.layout
    frames, got = _first_call_frames(flow, t2w, prompted, toks)
    assert frames == [2 * (prompted[1].numel() + 25 + pad)]  # no cache: all in one call
    assert flow.pool.layout == layout and flow.pool.held == 0
    assert_close(got, want, WAVE_TOL, what="the first chunk without the copy")


def test_a_kept_prompt_is_copied_into_the_pool_as_it_is(parts, family):
    """A stream copying a kept prompt in takes blocks the pool has free: it neither shrinks
    the pool first (nothing is held then) nor grows it again (on the full CosyVoice2 a 10 s
    prompt's copy took 10.5 s that way on a 2-core VM, 0.26 s as it is)."""
    _, hift, spk = parts
    flow = load_flow(FAMILIES[family] / "model")  # a pool no other test's stream holds
    _, prompted = _speakers(spk)
    toks = _tokens(60, 18, flow.cfg.vocab_size)
    flow.prompts.clear()
    t2w = make_token2wav(flow, hift)
    for _ in t2w.keep_prompt(*prompted):
        pass
    _first_call_frames(flow, t2w, prompted, toks)  # the pool grows for a stream, then idles
    assert flow.pool.held == 0
    resets, layout = flow.pool.resets, flow.pool.layout
    frames, _ = _first_call_frames(flow, t2w, prompted, toks)
    assert len(frames) == 1 and flow.prompts.hits == 2  # copied in, then its hop
    assert (flow.pool.resets, flow.pool.layout) == (resets, layout)
