"""The CosyVoice engine in-process on the tiny golden v2 dir: how it batches the vocoder."""

from __future__ import annotations

import pytest
from golden.conftest import resolve_golden_dir

from rtserver.engine import Chunk, Done, Job

GOLDEN = resolve_golden_dir()
MODEL = GOLDEN / "cosyvoice2" / "model"
pytestmark = pytest.mark.skipif(not MODEL.is_dir(), reason=f"no golden model dir at {MODEL}")


class NullChannel:
    backlog = 0

    def put(self, item) -> None:
        pass


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from rtserver.engines.cosyvoice_engine import CosyVoiceEngine

    return CosyVoiceEngine(MODEL, speaker_dir=tmp_path_factory.mktemp("spk"), fixed_tokens=60)


def job(engine, seed: int) -> Job:
    j = Job(speaker=engine.speakers()[0], channel=NullChannel(), seed=seed, stream=True)
    j.add_segments(["你好，今天天气很好。"])
    j.close_input()
    engine.start(j)
    return j


def test_chunks_of_staggered_jobs_are_vocoded_together(engine):
    calls: list[int] = []
    step = engine.model.token2wav.step

    def counting(items):
        calls.append(len(items))
        return step(items)

    engine.model.token2wav.step = counting
    try:
        a = job(engine, 1)
        engine.step([a])  # a is one LLM step ahead of b
        b = job(engine, 2)
        events: dict[Job, list] = {a: [], b: []}
        while not all(any(isinstance(e, Done) for e in ev) for ev in events.values()):
            live = [j for j in (a, b) if not any(isinstance(e, Done) for e in events[j])]
            for j, event in engine.step(live):
                events[j].append(event)
    finally:
        engine.model.token2wav.step = step
    # Every vocoder call took both jobs: a's chunks waited a step for b's.
    assert calls and all(n == 2 for n in calls), calls
    for j in (a, b):
        chunks = [e for e in events[j] if isinstance(e, Chunk)]
        assert len(chunks) >= 2 and chunks[-1].segment_end


def test_a_lone_job_is_not_held_back(engine):
    a = job(engine, 3)
    steps = 0
    first_chunk_step = None
    while first_chunk_step is None:
        steps += 1
        if any(isinstance(e, Chunk) for _, e in engine.step([a])):
            first_chunk_step = steps
    # The first hop is 25 tokens + 3 look-ahead: one prefill step yields the first token.
    assert first_chunk_step <= 28
    engine.release(a)
