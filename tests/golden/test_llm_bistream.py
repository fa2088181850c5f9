"""Text-streaming (bistream) LLM input, spec §8.6. No golden fixture covers it (the golden
README lists it as not covered), so these check the documented input layout and schedule and
that the result does not depend on how the text is chunked."""

from __future__ import annotations

import pytest
from _fixtures import load_engine

from cosyvoice.llm.engine import LLMRequest

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TEXT = "Hello world, this is a bistream test with a few more words to stream in."


@pytest.fixture(scope="module")
def model(golden_dir):
    return load_engine(golden_dir, "cosyvoice2")


def _run(model, req: LLMRequest, ids: list[int], piece: int) -> LLMRequest:
    i = 0
    while not req.done:
        if req.ready:
            model.llm.step([req])
        elif i < len(ids):
            req.push_text(ids[i : i + piece])
            i += piece
            if i >= len(ids):
                req.close_text()
        else:
            req.close_text()
    return req


def test_prompt_layout_and_fill_schedule(model):
    spk = model.speakers.get("zs_spk1")
    p, t = len(spk.prompt_speech_tokens), len(spk.prompt_text_ids)
    r = model.new_stream_request("zs_spk1", seed=5)
    assert r.ready == (t >= 5 * -(-p // 15))  # enough transcript to interleave all prompt speech
    kinds = [(k, len(v)) for k, v in r.bistream.pending]
    n_blocks = -(-p // 15)
    assert kinds[0] == ("sos", 0)
    assert kinds[1 : 1 + 2 * n_blocks : 2] == [("text", 5)] * n_blocks
    assert [n for _, n in kinds[2 : 2 + 2 * n_blocks : 2]] == [15] * (p // 15) + (
        [p % 15] if p % 15 else []
    )
    assert r.bistream.next_fill == (p // 15 + 1) * 15 - p
    ids = model.frontend.encode(TEXT)
    _run(model, r, ids, 3)
    fill = model.llm.net.fill_id
    s = model.llm.speech_token_size
    assert r.finish_reason in ("stop", "length")
    assert all(0 <= x < s for x in r.flow_tokens)
    assert [x for x in r.out_tokens if x != fill] == r.flow_tokens
    # between fills at most 15 speech tokens; the first block completes the prompt's last one
    runs, cur = [], 0
    for x in r.out_tokens:
        if x == fill:
            runs.append(cur)
            cur = 0
        else:
            cur += 1
    assert runs and runs[0] <= (p // 15 + 1) * 15 - p and all(n <= 15 for n in runs)


@pytest.mark.parametrize("speaker", [None, "zs_spk1"])
def test_chunking_does_not_matter(model, speaker):
    ids = model.frontend.encode(TEXT)
    outs = []
    for piece in (1, 4, len(ids)):
        r = _run(model, model.new_stream_request(speaker, seed=77), ids, piece)
        outs.append((r.out_tokens, r.finish_reason))
    assert outs[0] == outs[1] == outs[2]
    assert len(outs[0][0]) > 15


@pytest.mark.parametrize("speaker", [None, "zs_spk1"])
@pytest.mark.parametrize("piece", [4, 1000])
def test_long_inputs_go_in_chunks(model, speaker, piece):
    """Streamed inputs longer than ``prefill_chunk`` (a zero-shot prompt's interleaved blocks,
    the text left when it closes) go in over several steps, text arriving meanwhile included,
    and the tokens are the same as with every input fed in one step."""
    ids = model.frontend.encode(TEXT * 3)
    runs = []
    for chunk in (None, 3):
        model.llm.prefill_chunk = chunk
        steps: list[int] = []

        def counted(rs, steps=steps, real=model.llm.step):
            steps.append(1)
            return real(rs)

        model.llm.step = counted
        try:
            r = _run(model, model.new_stream_request(speaker, seed=9), ids, piece)
        finally:
            model.llm.prefill_chunk = 128
            del model.llm.step
        runs.append((r.out_tokens, r.finish_reason, len(steps)))
    (plain, why, n_plain), (chunked, why_chunked, n_chunked) = runs
    assert chunked == plain and why_chunked == why
    assert n_chunked > n_plain  # it did go in chunks


def test_waiting_for_text(model):
    r = model.new_stream_request(None, seed=1)
    assert not r.ready  # no prompt speech: needs 5 text tokens first
    with pytest.raises(ValueError):
        model.llm.step([r])
    r.push_text(model.frontend.encode("Hi")[:4])
    assert not r.ready
    r.close_text()  # text ended: final stage feeds the rest + task id
    assert r.ready
    assert [k for k, _ in r.bistream.pending] == ["sos", "text", "task"]
    while not r.done:
        model.llm.step([r])
    assert r.finish_reason == "stop"
    with pytest.raises(ValueError):
        LLMRequest(text_ids=[1, 2]).push_text([3])


def test_mixed_batch_with_unistream(model):
    """A streaming request and a plain one share steps; each matches its solo run."""
    ids = model.frontend.encode(TEXT)
    solo_s = _run(model, model.new_stream_request("zs_spk1", seed=9), ids, 2).out_tokens
    solo_u = model.llm.generate(model.new_request("plain text here.", seed=10))
    rs = model.new_stream_request("zs_spk1", seed=9)
    ru = model.new_request("plain text here.", seed=10)
    i = 0
    while not (rs.done and ru.done):
        batch = [r for r in (rs, ru) if r.ready]
        if batch:
            model.llm.step(batch)
        if not rs.ready and not rs.done:
            if i < len(ids):
                rs.push_text(ids[i : i + 2])
                i += 2
            else:
                rs.close_text()
    assert rs.out_tokens == solo_s and ru.out_tokens == solo_u


def test_v3_system_prompt_first(golden_dir):
    m = load_engine(golden_dir, "cosyvoice3")
    r = m.new_stream_request(None, seed=2)
    system = m.frontend.encode("You are a helpful assistant.<|endofprompt|>")
    assert r.bistream.pending == [("sos", []), ("text", system)]
    assert not r.ready  # unlike upstream, no decoding on the system prompt alone
    ids = m.frontend.encode("Hello world, this is a tiny golden test.")
    _run(m, r, ids, 5)
    assert r.done and all(0 <= x < m.llm.speech_token_size for x in r.flow_tokens)
