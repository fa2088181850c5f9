"""A request decoded alone and inside a batch (others of different lengths, joining and leaving
between steps) gives the same logits (float tolerance) and the same sampled tokens per seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _fixtures import load_engine

from cosyvoice.llm.engine import LLMRequest

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_engine(golden_dir, "cosyvoice2")


def _requests(model, golden_dir):
    z = np.load(golden_dir / "cosyvoice2" / "llm.npz")
    text = z["text_token"][0].tolist()
    return [
        dict(text_ids=text, seed=11),
        dict(text_ids=text[:5], seed=22),  # short: finishes early, leaves the batch
        dict(
            text_ids=z["zs_text_token"][0].tolist(),
            prompt_text_ids=z["zs_prompt_text_token"][0].tolist(),
            prompt_speech_tokens=z["zs_prompt_speech_token"][0].tolist(),
            seed=33,
        ),
        dict(text_ids=model.frontend.encode("batch invariance"), seed=44),
    ]


def _run_alone(model, spec):
    r = LLMRequest(**spec)
    logits = []
    while not r.done:
        model.llm.step([r])
        logits.append(r.last_logits.clone())
    return r.out_tokens, logits


def test_alone_vs_batched(model, golden_dir):
    specs = _requests(model, golden_dir)
    alone = [_run_alone(model, s) for s in specs]
    # sanity: sampling really is random (different seeds, different streams)
    assert alone[0][0] != _run_alone(model, {**specs[0], "seed": 12})[0]

    reqs = [LLMRequest(**s) for s in specs]
    logs: list[list[torch.Tensor]] = [[] for _ in reqs]
    # request 3 joins late: its prefill shares a forward with the others' decode steps
    live = reqs[:3]
    step = 0
    while live or not reqs[3].prefilled:
        if step == 4:
            live.append(reqs[3])
        model.llm.step(live)
        for r in live:
            logs[reqs.index(r)].append(r.last_logits.clone())
        live = [r for r in live if not r.done]
        step += 1
    for i, r in enumerate(reqs):
        tokens, logits = alone[i]
        assert r.out_tokens == tokens, f"request {i}"
        assert len(logs[i]) == len(logits)
        err = max(float((a - b).abs().max()) for a, b in zip(logs[i], logits, strict=True))
        assert err <= LOGIT_ATOL, f"request {i}: logits differ by {err}"


def test_same_seed_same_tokens_and_cancel(model, golden_dir):
    spec = _requests(model, golden_dir)[0]
    a, b = LLMRequest(**spec), LLMRequest(**spec)
    other = LLMRequest(**{**spec, "seed": 99})
    model.llm.prefill([a])
    model.llm.prefill([b, other])
    for _ in range(5):
        model.llm.decode([a, b, other])
    other.cancel()
    assert other.done and other.cache is None and other.finish_reason == "cancelled"
    while not a.done:
        model.llm.decode([a, b])
    assert a.out_tokens == b.out_tokens and b.done
    assert a.cache is None  # freed when it finished
    with pytest.raises(ValueError):
        model.llm.step([a])
    # min/max length from the text length; no special id leaks into the output
    assert spec["text_ids"] and len(a.out_tokens) >= 2 * len(spec["text_ids"])
    assert all(0 <= t < model.llm.speech_token_size for t in a.out_tokens)


def test_random_seed_zero(model):
    ids = model.frontend.encode("seed zero means random")
    a, b = LLMRequest(text_ids=ids), LLMRequest(text_ids=ids)
    assert a.seed != 0 and a.seed != b.seed


def test_bad_steps_rejected(model):
    ids = model.frontend.encode("guard rails")
    r = LLMRequest(text_ids=ids, seed=5)
    with pytest.raises(ValueError):
        model.llm.step([r, r])
    assert not r.prefilled  # nothing ran
    with pytest.raises(ValueError):
        model.llm.decode([r])
    with pytest.raises(ValueError):
        LLMRequest(text_ids=[])
    model.llm.prefill([r])
    with pytest.raises(ValueError):
        model.llm.prefill([r])


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill(model, golden_dir, chunk):
    """Prefix fed in chunks over several steps (while others decode): same greedy tokens as the
    golden zero-shot run and the same sampled tokens as an unchunked run."""
    z = np.load(golden_dir / "cosyvoice2" / "llm.npz")
    spec = _requests(model, golden_dir)[2]  # the zero-shot one: the longest prefix
    plain = LLMRequest(**spec)
    model.llm.generate(plain)
    greedy = LLMRequest(**{**spec, "greedy": True})
    other = LLMRequest(**_requests(model, golden_dir)[0])
    sampled = LLMRequest(**spec)
    model.llm.prefill([other])
    model.llm.prefill_chunk = chunk
    try:
        prefix_len = (
            2
            + len(spec["prompt_text_ids"])
            + len(spec["text_ids"])
            + len(spec["prompt_speech_tokens"])
        )
        steps_to_first = 0
        while not greedy.out_tokens:
            assert not greedy.prefilled
            live = [r for r in (greedy, sampled, other) if not r.done]
            model.llm.step(live)
            steps_to_first += 1
        assert steps_to_first == -(-prefix_len // chunk)
        while not (greedy.done and sampled.done):
            model.llm.step([r for r in (greedy, sampled, other) if not r.done])
    finally:
        model.llm.prefill_chunk = None
    assert greedy.out_tokens == z["zs_greedy_tokens"][0].tolist()
    assert sampled.out_tokens == plain.out_tokens
