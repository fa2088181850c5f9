"""The flow's static Euler loop: calls padded to their (batch, frames, context) bucket give what
the eager flow gives, for ragged batches, prompted speakers and utterances whose later chunks
outgrow the buckets and run eagerly over the same pool state. On the CPU the loop runs eagerly;
on CUDA (bench/bench_gpu.py runs these there) as captured and replayed graphs."""

from __future__ import annotations

import pytest
import torch
from _fixtures import FAMILIES, ONE_THREAD, TEST_DEVICE, drive_ragged, family_params
from conftest import assert_close

from cosyvoice.flow import load_flow
from cosyvoice.flow.cache import BLOCK
from cosyvoice.flow.graphs import CAPTURE_AT
from cosyvoice.hift import load_hift
from cosyvoice.token2wav import make_token2wav

V2_V3 = family_params("e2e_sft.npz", "v2", "v3")
WAVE_TOL = 1e-3  # as test_flow_cache: chunks of the same utterance, two ways

pytestmark = [ONE_THREAD, pytest.mark.parametrize("family", V2_V3, indirect=True, scope="module")]


@pytest.fixture(scope="module")
def model_dir(family):
    return FAMILIES[family] / "model"


def _speakers(d):
    spk = torch.load(d / "spk2info.pt", map_location="cpu", weights_only=True)
    sft = next(s for s in spk.values() if "embedding" in s)
    zs = next(s for s in spk.values() if "flow_prompt_speech_token" in s)
    prompted = (
        zs["flow_embedding"],
        zs["flow_prompt_speech_token"][0],
        zs["prompt_speech_feat"][0],
    )
    plain = (sft["embedding"], None, None)
    other = (-prompted[0], *prompted[1:])  # another speaker of the same length
    return [plain, prompted, plain, prompted, other]


def _tokens(d, n: int, seed: int) -> list[int]:
    """``n`` random speech tokens of the flow's vocabulary."""
    vocab = load_flow(d).cfg.vocab_size
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ragged(d, toks, defer: bool = False, **graphs):
    """Five streams (plain, prompted, plain, prompted, another prompt) with ragged token
    arrival, through a flow with static graphs (``graphs`` given) or without. The prompt of
    the first two is kept ahead (in pieces, a call each): they copy it from the prompt
    store; the other prompt goes through the flow in a piece beside the others' calls.
    ``defer``: as after warm-up, new buckets wait to be captured."""
    flow = load_flow(d, device=TEST_DEVICE)
    t2w = make_token2wav(flow, load_hift(d, device=TEST_DEVICE))
    speakers = _speakers(d)
    # kept before the graphs are on: its calls do not count towards capturing a bucket
    for _ in t2w.keep_prompt(*speakers[1]):
        pass
    if graphs:
        flow.enable_graphs(**graphs)
        flow.graphs.defer = defer
        capture = graphs.get("capture", torch.device(TEST_DEVICE).type == "cuda")
        assert flow.graphs.capture == flow.pool.keep == capture  # captured graphs pin the pool
    states = [t2w.new_state(*s, seed=i) for i, s in enumerate(speakers)]
    got, n_batched = drive_ragged(t2w, states, toks, [9, 13, 4, 13, 13])
    assert n_batched > 0 and flow.pool.held == 0
    assert len(flow.prompts) == 1 and (flow.prompts.hits, flow.prompts.misses) == (2, 1)
    return [torch.cat(g) for g in got], flow


@pytest.mark.parametrize(
    "ladders",
    [
        dict(max_batch=8),  # every pooled call in a bucket: 5 streams padded to 8
        dict(max_batch=2, contexts=(128,)),  # some calls too wide or too long: those run eagerly
    ],
    ids=["all-static", "mixed"],
)
def test_static_loop_equals_eager(model_dir, ladders):
    toks = _tokens(model_dir, 260, seed=6)
    ref, _ = _ragged(model_dir, toks)
    got, flow = _ragged(model_dir, toks, **ladders)
    graphs = flow.graphs
    assert graphs is not None and flow.calls.static_runs > 0
    assert (graphs.encode is None) == (flow.cfg.estimator == "dit")  # v2: the encoder too
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b, WAVE_TOL, what=f"request {i}")


def _whole(d, toks, stream: bool, blocks: int = 0, **graphs):
    """A plain and a prompted speaker's audio, all ``toks`` at once (a whole utterance, or a
    stream that ends in its first call: calls without state), graphs on or off; ``blocks``:
    the pool made that large first (at token rate; as warm-up sizes it)."""
    flow = load_flow(d, device=TEST_DEVICE)
    if graphs:
        flow.enable_graphs(**graphs)
    if blocks:
        flow.pool.presize({"tokens": blocks, "frames": 2 * blocks}, 8)
    t2w = make_token2wav(flow, load_hift(d, device=TEST_DEVICE))
    out = []
    for i, spk in enumerate(_speakers(d)[:2]):
        st = t2w.new_state(*spk, stream=stream, seed=i)
        out.append(torch.cat(list(t2w.stream(st, [toks]))))
    assert flow.pool.held == 0  # the call's blocks came back
    return out, flow


@pytest.mark.parametrize("stream, n", [(False, 60), (True, 20)], ids=["whole", "short-stream"])
def test_a_call_without_state_goes_through_the_graphs(model_dir, stream, n):
    """A call that neither reads nor keeps flow state (a whole utterance; a stream that ends in
    its first call, a short reply) runs at its graph bucket through the pool, where it ran
    eagerly (on a GPU ~14 000 launches before a short reply's first audio), with the same
    audio. One too long for the buckets, or for the blocks the pool has free, still runs
    eagerly, and the pool does not grow for it. (The prompted speaker's stream puts its
    prompt through first, a piece in a call of its own.)"""
    toks = _tokens(model_dir, n, seed=3)
    calls = 2 + stream
    ref, _ = _whole(model_dir, toks, stream)
    got, flow = _whole(model_dir, toks, stream, blocks=256, max_batch=2)
    assert flow.calls["dynamic"] == 0 and flow.calls.static_runs == calls
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b, WAVE_TOL, what=f"speaker {i}")
    _, flow = _whole(model_dir, toks, stream, blocks=256, max_batch=2, frames=(16,))
    assert flow.calls["dynamic"] == calls and flow.calls.static_runs == 0
    _, flow = _whole(model_dir, toks, stream, max_batch=2)  # the pool's first 8 blocks
    if not stream:  # (a stream's prompt goes in a piece of its own, that keeps state)
        assert flow.calls["dynamic"] >= 1  # (the prompted speaker's, prompt and all)
        assert flow.pool.layout[0] == (8, 8)  # not grown


def test_warm_sizes_the_pool_to_its_bound_and_runs_each_batch(model_dir):
    """Warm-up makes the pool as large as the memory bound lets streams get, so that streams
    under the bound never grow it (graphs over its tensors stay valid), then runs a stream's
    first three chunks (three shapes) at each batch bucket."""
    flow = load_flow(model_dir, device=TEST_DEVICE)
    flow.enable_graphs(max_batch=4)
    t2w = make_token2wav(flow, load_hift(model_dir, device=TEST_DEVICE), flow_cache_mb=16)
    t2w.warm(flow.graphs.batches)
    # sizing, then 4, 2 and 1 streams three chunks each (and the recomputing streams' calls
    # past the 16 MB bound: without state, at their bucket too), every call static
    assert flow.calls.static_runs >= 1 + 3 * len(flow.graphs.batches) == 10
    assert flow.calls["dynamic"] == 0
    layout, pool = flow.pool.layout, flow.pool
    assert (
        pool.held == 0
        and pool.blocks["frames"].size * BLOCK >= 16 * 2**20 / pool.position_bytes["frames"]
    )
    toks = torch.randint(0, flow.cfg.vocab_size, (260,), generator=torch.Generator().manual_seed(9))
    states = [t2w.new_state(*s, seed=i) for i, s in enumerate(_speakers(model_dir)[:3])]
    drive_ragged(t2w, states, toks.tolist(), [9, 13, 4])
    assert pool.layout == layout and pool.held == 0


def test_warm_lowers_the_bound_to_what_the_device_has_room_for(model_dir):
    """Where the device has less room than the bound, its prompts' share and one call of the
    largest batch at the longest hop (on a GPU, half its free memory at load was the bound),
    the bound is lowered to fit and the pool is sized within the room. Then neither streams
    past the bound nor new streams with long prompts (past what the sizing foresees) grow
    it: they drop their caches and recompute, with the same audio. Grown, the pool ran out of
    GPU memory."""
    flow = load_flow(model_dir, device=TEST_DEVICE)
    flow.enable_graphs(max_batch=4)
    flow.pool.keep = True  # pinned, as captured graphs pin it (on the CPU they run eagerly)
    t2w = make_token2wav(flow, load_hift(model_dir, device=TEST_DEVICE), flow_cache_mb=64)
    t2w._chunks(4, 1)  # the pool's bytes per position
    pool = flow.pool
    per_token = pool.position_bytes["tokens"] + 2 * pool.position_bytes["frames"]
    call = 4 * (-(-103 // BLOCK) + 1) * BLOCK  # 4 streams, a 100-token hop and 3 ahead
    room = per_token * (call + 1.5 * 120)  # room for a bound of 120 tokens
    assert room < 64 * 2**20 + per_token * call  # less than the bound asked for
    t2w._room = lambda: room
    t2w.warm(flow.graphs.batches)
    assert t2w.cfg.flow_cache_mb * 2**20 < 121 * per_token
    capacity = sum(pool.blocks[r].size * BLOCK * b for r, b in pool.position_bytes.items())
    assert capacity <= room and pool.held == 0
    layout = pool.layout
    gen = torch.Generator().manual_seed(9)
    toks = torch.randint(0, flow.cfg.vocab_size, (260,), generator=gen).tolist()
    emb, ptok, pfeat = _speakers(model_dir)[1]
    reps = -(-200 // ptok.numel())  # a prompt of 200+ tokens: 4 first calls are past the room
    long = (emb, ptok.repeat(reps), pfeat.repeat(reps, 1))
    plain = _speakers(model_dir)[0]
    # the reference on the same device: HiFT's seeded noise is drawn there (CPU and CUDA
    # generators give different numbers for one seed)
    ref = make_token2wav(*(load(model_dir, device=TEST_DEVICE) for load in (load_flow, load_hift)))
    for spk, rates in ((plain, [9, 13, 4]), (long, [28, 28, 28, 28])):
        states = [t2w.new_state(*spk, seed=i) for i in range(len(rates))]
        got, _ = drive_ragged(t2w, states, toks, rates)
        assert pool.layout == layout and pool.held == 0
        want, _ = drive_ragged(ref, [ref.new_state(*spk, seed=i) for i in range(len(rates))],
                               toks, rates)  # fmt: skip
        for a, b in zip(got, want, strict=True):
            assert_close(torch.cat(a), torch.cat(b), WAVE_TOL)


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="a capture fails only where there is no GPU")
def test_a_failed_capture_leaves_the_flow_eager_and_right(model_dir, caplog):
    toks = _tokens(model_dir, 120, seed=8)
    ref, _ = _ragged(model_dir, toks)
    got, flow = _ragged(model_dir, toks, max_batch=4, capture=True)
    assert flow.graphs is None and "capturing the flow's CUDA graph failed" in caplog.text
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b, WAVE_TOL, what=f"request {i}")


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="a capture fails only where there is no GPU")
def test_after_warm_up_a_new_bucket_runs_eagerly_and_is_captured_when_idle(model_dir, caplog):
    """Past warm-up, a bucket met mid-burst runs at its static shape without a capture (one
    stalled every stream of the burst), and is captured once the model is idle. On a CPU a
    capture fails, which shows when one was tried: only at capture_pending()."""
    toks = _tokens(model_dir, 120, seed=8)
    ref, _ = _ragged(model_dir, toks)
    got, flow = _ragged(model_dir, toks, defer=True, max_batch=4, capture=True)
    assert "capture" not in caplog.text and flow.graphs.pending and flow.calls.static_runs > 0
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, b, WAVE_TOL, what=f"request {i}")
    assert max(flow.graphs.pending.values()) < CAPTURE_AT  # none came often enough
    assert flow.capture_pending() == 0 and flow.graphs is None  # tried: it failed here
    assert "capturing the flow's CUDA graph failed" in caplog.text and not flow.pool.keep
    # for want of a GPU, as far as a capture gets on a CPU (outside inference mode it failed
    # before, on its inference-tensor buffers: on an H200 every graph went)
    assert "Expected a cuda device" in caplog.text, caplog.text[-600:]


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="a capture fails only where there is no GPU")
def test_a_new_bucket_that_keeps_coming_is_captured_without_waiting_for_idle(model_dir, caplog):
    """Under steady load the model is never idle: a bucket met after warm-up is captured at its
    CAPTURE_AT-th call. On a CPU that capture fails, which shows it was tried."""
    toks = _tokens(model_dir, 120, seed=8)
    _, flow = _ragged(model_dir, toks, defer=True, max_batch=4, capture=True)
    assert flow.graphs.pending and "capture" not in caplog.text
    for key in flow.graphs.pending:  # the next call of each is its CAPTURE_AT-th
        flow.graphs.pending[key] = CAPTURE_AT - 1
    t2w = make_token2wav(flow, load_hift(model_dir, device=TEST_DEVICE))
    states = [t2w.new_state(*s, seed=i) for i, s in enumerate(_speakers(model_dir))]
    drive_ragged(t2w, states, toks, [9, 13, 4, 13, 13])
    assert flow.graphs is None and "Expected a cuda device" in caplog.text
