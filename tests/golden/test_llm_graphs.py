"""The static decode step that CUDA graphs replay (captured on a GPU, run eagerly on the CPU): padded to batch and
context buckets, it gives the same logits and tokens as the dynamic step, across a bucket
boundary and while requests join and leave."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from _fixtures import ONE_THREAD, TEST_DEVICE, WETEXT

import cosyvoice
from cosyvoice.llm.engine import LLMRequest
from cosyvoice.llm.graphs import CONTEXT_BLOCKS
from cosyvoice.llm.kv import BLOCK

pytestmark = ONE_THREAD


def _load(golden_dir, graphs: bool):
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    # no wetext on a bare GPU box: this test reads no text
    return cosyvoice.load(d, device=TEST_DEVICE, dtype="float32", speaker_dir=None,
                          use_wetext=WETEXT, token2wav=False, graphs=graphs,
                          max_batch=6)  # fmt: skip


def _trace(model, lengths: list[int]) -> list[tuple[list[int], list[torch.Tensor]]]:
    reqs = [
        LLMRequest(text_ids=list(range(20, 26 + 4 * i)), seed=7 + i, min_len=n, max_len=n)
        for i, n in enumerate(lengths)
    ]
    logits: list[list[torch.Tensor]] = [[] for _ in reqs]
    late = reqs.pop()  # joins after a few steps
    step = 0
    while live := [r for r in reqs if not r.done]:
        model.llm.step(live)
        for r in live:
            logits[reqs.index(r)].append(r.last_logits.clone())
        step += 1
        if step == 3:
            reqs.append(late)
    return [(r.out_tokens, lg) for r, lg in zip(reqs, logits, strict=False)]


def test_static_step_matches_dynamic(golden_dir):
    eager, static = _load(golden_dir, False), _load(golden_dir, True)
    # captured CUDA graphs on a GPU (bench/bench_gpu.py), the same static step eagerly on the CPU
    assert static.llm.graphs is not None
    assert static.llm.graphs.capture == (torch.device(TEST_DEVICE).type == "cuda")
    # 5 requests (a padded bucket of 6), one running past 8 blocks (the 256-position bucket)
    lengths = [12, 40, 9 * BLOCK, 30, 25]
    for (tok_e, lg_e), (tok_s, lg_s) in zip(
        _trace(eager, lengths), _trace(static, lengths), strict=True
    ):
        assert tok_e == tok_s
        torch.testing.assert_close(torch.stack(lg_s), torch.stack(lg_e), atol=1e-4, rtol=1e-4)
    pool = static.llm.net.kv_pool()
    assert pool.fixed and pool.used_blocks == 1  # only the scratch block is left


def test_a_first_input_alone_runs_as_a_prefill_bucket(golden_dir):
    """A request's first input alone in its step (one listener's first audio waits on it) runs
    at a prefill bucket, padded, with the dynamic step's logits and tokens: inputs across the
    buckets, and one longer than the largest, whose first chunk fits and whose rest runs as the
    dynamic step."""
    eager, static = _load(golden_dir, False), _load(golden_dir, True)
    for model in (eager, static):
        model.llm.prefill_chunk = 128
    # text tokens; the input adds sos and task: 129 positions are a 128-position first chunk
    # and one more (as a decode step), 152 a first chunk and 24 more (dynamically)
    lengths = [3, 29, 31, 60, 127, 150]
    got = {}
    for name, model in (("eager", eager), ("static", static)):
        got[name] = []
        for i, n in enumerate(lengths):
            r = LLMRequest(text_ids=[20 + k % 30 for k in range(n)], seed=3 + i, min_len=4,
                           max_len=4)  # fmt: skip
            logits = []
            while not r.done:
                if model.llm.step([r]) != [None]:  # (None: a first chunk, nothing drawn yet)
                    logits.append(r.last_logits.clone())
            got[name].append((r.out_tokens, logits))
    assert static.llm.graphs.prefills == len(lengths)  # the longer inputs' first chunks too
    for (tok_e, lg_e), (tok_s, lg_s) in zip(got["eager"], got["static"], strict=True):
        assert tok_e == tok_s
        torch.testing.assert_close(torch.stack(lg_s), torch.stack(lg_e), atol=1e-4, rtol=1e-4)
    assert static.llm.net.kv_pool().used_blocks == 1


def test_requests_joining_others_run_as_prefill_and_decode_graphs(golden_dir):
    """First inputs of several requests at once run as one prefill bucket, and a step where
    requests join others decoding replays a prefill and a decode graph: the same logits and
    tokens as the dynamic step, whatever joins when. A step of more requests than the graphs
    hold (a library caller's: the server caps its steps) runs as steps they replay."""
    eager, static = _load(golden_dir, False), _load(golden_dir, True)
    # step -> text lengths of requests joining; at step 7, 10 requests step, the graphs
    # hold 6: two replayed steps (6, then 4 first inputs), none eager
    joins = {0: [5, 40, 17], 2: [9], 4: [33, 12], 7: [3, 4, 5, 6, 7, 8, 9]}
    got = {}
    for name, model in (("eager", eager), ("static", static)):
        reqs, logits = [], []
        for step in range(14):
            for n in joins.get(step, []):
                reqs.append(LLMRequest(text_ids=[20 + k % 30 for k in range(n)],
                                       seed=1 + len(reqs), min_len=6, max_len=6))  # fmt: skip
                logits.append([])
            live = [r for r in reqs if not r.done]
            model.llm.step(live)
            for r in live:
                logits[reqs.index(r)].append(r.last_logits.clone())
        got[name] = [(r.out_tokens, torch.stack(lg)) for r, lg in zip(reqs, logits, strict=True)]
    assert static.llm.graphs.prefills == sum(len(v) for v in joins.values())
    assert static.llm.calls["dynamic"] == 0
    for (tok_e, lg_e), (tok_s, lg_s) in zip(got["eager"], got["static"], strict=True):
        assert tok_e == tok_s and len(tok_s) == 6
        torch.testing.assert_close(lg_s, lg_e, atol=1e-4, rtol=1e-4)
    assert static.llm.net.kv_pool().used_blocks == 1


def test_a_request_past_the_buckets_leaves_the_graphs_tables(golden_dir):
    """A request past the largest context bucket runs eagerly and grows the model's RoPE tables
    as new tensors. The graphs read the old ones at their captured address: those must stay
    allocated (freed, their memory is handed out again and every stream's decode step reads
    garbage), and the static step must go on giving the dynamic step's logits."""
    eager, static = _load(golden_dir, False), _load(golden_dir, True)
    qwen = static.llm.net.qwen
    read = weakref.ref(qwen.rope_tables(0)[0])
    n = CONTEXT_BLOCKS[-1] * BLOCK + 40
    static.llm.generate(LLMRequest(text_ids=[20 + i % 10 for i in range(n)], min_len=2, max_len=2))
    assert qwen.rope_tables(0)[0].shape[0] > n  # grown
    gc.collect()
    assert read() is not None
    lengths = [12, 30, 25]
    for (tok_e, lg_e), (tok_s, lg_s) in zip(
        _trace(eager, lengths), _trace(static, lengths), strict=True
    ):
        assert tok_e == tok_s
        torch.testing.assert_close(torch.stack(lg_s), torch.stack(lg_e), atol=1e-4, rtol=1e-4)


def test_pool_is_fixed_and_full_is_an_error(golden_dir):
    model = _load(golden_dir, True)
    pool = model.llm.net.kv_pool()
    with pytest.raises(MemoryError):
        pool.take(pool.free_blocks + 1)
    with pytest.raises(ValueError):
        model.llm.enable_graphs(4)  # the pool already exists


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="a capture fails only where there is no GPU")
def test_a_failed_capture_leaves_decode_eager_and_right(golden_dir, caplog):
    eager, model = _load(golden_dir, False), _load(golden_dir, False)
    model.llm.enable_graphs(6, capture=True)  # on the CPU capturing raises
    assert model.llm.graphs is None and "capturing the LLM's CUDA graphs failed" in caplog.text
    lengths = [12, 30, 25]
    for (tok_e, _), (tok_f, _) in zip(_trace(eager, lengths), _trace(model, lengths), strict=True):
        assert tok_e == tok_f


def test_rope_keeps_float32_frequencies_in_bfloat16(golden_dir):
    """The LLM in bfloat16 (the CUDA default) rotates by the float32 angles: its weights are
    cast, its position table must not be (rounded frequencies put cos off by 0.28 by position
    300, which the float32 parity runs cannot see)."""
    d = golden_dir / "cosyvoice2" / "model"
    if not d.is_dir():
        pytest.skip("no cosyvoice2 golden dir")
    model = cosyvoice.load(d, device=TEST_DEVICE, dtype="float32", speaker_dir=None,
                           use_wetext=WETEXT, token2wav=False, packed=False)  # fmt: skip
    net = model.llm.net.qwen
    pos = torch.arange(0, 4000, 7, device=net.norm.weight.device)
    want = net.rope(pos, 4000, torch.float32)
    net.to(torch.bfloat16)._rope_cache = None
    got = net.rope(pos, 4000, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


def test_a_full_pool_ends_only_the_request_that_needs_a_block(golden_dir):
    """Under CUDA graphs the KV pool cannot grow: a request that needs a block when none is
    free ends there ("length"), and the others in its step go on (the pool's MemoryError came
    out of the forward and failed the whole batch)."""
    model = _load(golden_dir, True)
    pool = model.llm.net.kv_pool(model.llm.dtype, model.llm.device)
    a = LLMRequest(text_ids=list(range(20, 26)), seed=1, min_len=200, max_len=200)
    b = LLMRequest(text_ids=list(range(20, 26)), seed=2, min_len=200, max_len=200)
    model.llm.step([a])
    for _ in range(BLOCK // 2):  # b is half a block behind a
        model.llm.step([a])
    model.llm.step([b])
    others = pool.take(pool.free_blocks)  # another holder takes every free block
    try:
        while not a.done:
            held = len(b.cache.blocks)
            tokens = model.llm.step([a, b])
            assert tokens[1] is not None and len(b.cache.blocks) == held  # b goes on
        assert a.finish_reason == "length" and 0 < len(a.out_tokens) < 200 and a.cache is None
        pool.give(others)  # the other holder is done: b has room to its end
        others = []
        while not b.done:
            model.llm.step([b])
        assert b.finish_reason == "length" and len(b.out_tokens) == 200
    finally:
        pool.give(others)


def test_a_request_at_the_largest_context_bucket_ends_there(golden_dir):
    """Under the decode graphs a request ends ("length") where its next input would pass the
    largest context bucket: its steps stay static (past it, each one it was in ran eagerly for
    the whole batch) and it never holds more than its share of the fixed pool. Here the
    buckets stop at 16 blocks (512 positions)."""
    model = _load(golden_dir, True)
    model.llm.graphs.contexts = [8, 16]
    cap = 16 * BLOCK
    runaway = LLMRequest(text_ids=list(range(20, 26)), seed=3, min_len=2 * cap, max_len=2 * cap)
    other = LLMRequest(text_ids=list(range(20, 26)), seed=4, min_len=40, max_len=40)
    most = 0
    while live := [r for r in (runaway, other) if not r.done]:
        model.llm.step(live)
        most = max([most, *(r.cache.length for r in live if r.cache is not None)])
    assert runaway.finish_reason == "length" and len(other.out_tokens) == 40
    assert cap - 20 < len(runaway.out_tokens) < cap and most <= cap
    assert model.llm.calls["dynamic"] == 0
    assert model.llm.held_blocks() == 0
