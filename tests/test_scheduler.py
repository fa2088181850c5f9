"""The scheduler on its own, driving a small deterministic engine written for the test."""

from __future__ import annotations

import asyncio
import functools
import time

import numpy as np
import pytest

from rtserver.channel import Channel
from rtserver.engine import Cancelled, Chunk, Done, Failed, Job, Speaker
from rtserver.scheduler import CONTENDED_READ_S, TRIM_GAP_S, Busy, Scheduler

SPEAKER = Speaker("tone", "xx", 1000, "test")


class ToneEngine:
    """One segment = one step. Text "bad" fails its job (as engines report per-job problems);
    text "boom" makes the whole step raise (an engine bug)."""

    name = "tone"
    sample_rate = 1000

    def __init__(self, max_batch: int = 8, samples: int = 100) -> None:
        self.max_batch, self.samples = max_batch, samples  # samples per segment (1000 Hz)
        self.batches: list[list[int]] = []
        self.released: list[int] = []
        self.started: list[int] = []  # job ids in the order they were admitted

    def speakers(self) -> list[Speaker]:
        return [SPEAKER]

    def warmup(self) -> None:
        pass

    def start(self, job: Job) -> None:
        job.engine_state = "started"
        self.started.append(job.id)

    def ready(self, job: Job) -> bool:
        return job.has_pending_text() or job.input_closed

    def step(self, jobs: list[Job]) -> list:
        self.batches.append([j.id for j in jobs])
        out = []
        for job in jobs:
            item = job.next_segment()
            if item is None:
                out.append((job, Done()))
                continue
            index, text = item
            if text == "boom":
                raise RuntimeError("engine exploded")
            if text == "bad":
                out.append((job, Failed("bad segment")))
                continue
            out.append((job, Chunk(np.full(self.samples, 0.1, np.float32), index, True)))
        return out

    def release(self, job: Job) -> None:
        self.released.append(job.id)


async def drain(job: Job) -> list:
    events = []
    while True:
        ev = await asyncio.wait_for(job.channel.get(), 10)
        events.append(ev)
        if isinstance(ev, Done | Failed | Cancelled):
            return events


def make_job(sched: Scheduler, segments: list[str], close: bool = True, client: str = "") -> Job:
    job = Job(
        speaker=SPEAKER, channel=Channel(asyncio.get_running_loop(), sched.wake), client=client
    )
    job.add_segments(segments)
    if close:
        job.close_input()
    sched.submit(job)
    return job


def run(coro):
    return asyncio.run(coro)


def test_jobs_are_batched_and_finish_in_order():
    async def go():
        engine = ToneEngine()
        sched = Scheduler(engine)
        sched.start()
        try:
            jobs = [make_job(sched, ["a", "b", "c"]) for _ in range(3)]
            results = await asyncio.gather(*(drain(j) for j in jobs))
        finally:
            sched.stop()
        return engine, results

    engine, results = run(go())
    for events in results:
        assert [e.segment for e in events if isinstance(e, Chunk)] == [0, 1, 2]
        assert isinstance(events[-1], Done)
    assert max(len(b) for b in engine.batches) > 1  # jobs shared steps
    assert len(engine.released) == 3


def test_a_failing_job_fails_alone():
    async def go():
        engine = ToneEngine()
        sched = Scheduler(engine)
        jobs = [make_job(sched, ["a", "b"]), make_job(sched, ["bad", "x"]), make_job(sched, ["c"])]
        sched.start()
        try:
            results = await asyncio.gather(*(drain(j) for j in jobs))
        finally:
            sched.stop()
        return sched, engine, jobs, results

    sched, engine, jobs, (good1, bad, good2) = run(go())
    assert isinstance(bad[-1], Failed) and "bad segment" in bad[-1].message
    assert [type(e) for e in good1] == [Chunk, Chunk, Done]
    assert [type(e) for e in good2] == [Chunk, Done]
    snap = sched.snapshot()
    assert snap["failed"] == 1 and snap["completed"] == 2 and snap["active"] == 0
    assert jobs[1].id in engine.released


def test_an_engine_exception_fails_its_batch_and_the_scheduler_goes_on():
    async def go():
        engine = ToneEngine(max_batch=1)
        sched = Scheduler(engine)
        sched.start()
        try:
            broken = await drain(make_job(sched, ["boom"]))
            later = await drain(make_job(sched, ["a"]))
        finally:
            sched.stop()
        return broken, later

    broken, later = run(go())
    assert isinstance(broken[-1], Failed) and "exploded" in broken[-1].message
    assert [type(e) for e in later] == [Chunk, Done]


def test_cancel_drops_the_job_and_frees_it():
    async def go():
        engine = ToneEngine()
        sched = Scheduler(engine)
        sched.start()
        try:
            job = make_job(sched, ["x"] * 1000, close=False)
            first = await asyncio.wait_for(job.channel.get(), 10)
            job.cancel()
            sched.wake()
            events = [first, *await drain(job)]
        finally:
            sched.stop()
        return engine, sched, job, events

    engine, sched, job, events = run(go())
    assert isinstance(events[-1], Cancelled)
    assert job.id in engine.released
    # Bounded by the backlog: far fewer than the 1000 segments were synthesized.
    assert sum(isinstance(e, Chunk) for e in events) <= sched.max_backlog + 2
    assert sched.snapshot()["active"] == 0 and sched.snapshot()["cancelled"] == 1


def test_unread_jobs_stop_being_scheduled():
    async def go():
        engine = ToneEngine()
        sched = Scheduler(engine, max_backlog=3)
        sched.start()
        try:
            job = make_job(sched, ["x"] * 100)
            for _ in range(100):  # nobody reads: the backlog fills, then stays full
                await asyncio.sleep(0.05)
                if job.channel.backlog >= 3:
                    break
            backlog, steps = job.channel.backlog, sched.counters.steps
            await asyncio.sleep(0.3)
            return backlog, steps, sched.counters.steps
        finally:
            sched.stop()

    backlog, steps_a, steps_b = run(go())
    assert backlog == 3 and steps_a == steps_b


def test_a_reader_is_dropped_once_it_could_have_played_what_it_read():
    """--read-timeout-s after both its last read and the time a listener playing in real time
    would have played all it read: not counting audio still queued for it, nor the wait twice
    (a client reading at playback speed reads nothing new while its buffers play)."""

    async def go() -> float:
        sched = Scheduler(ToneEngine(samples=4000), read_timeout_s=1.0, max_backlog=3)
        sched.start()
        try:
            job = make_job(sched, ["x"] * 20)  # 4 s of audio each
            await job.channel.get()  # the first 4 s, then nothing more
            while sched.counters.dropped == 0:
                await asyncio.sleep(0.05)
            return time.monotonic() - job.first_audio_at
        finally:
            sched.stop()

    took = run(go())
    assert 5.0 < took < 7.5, took  # 4 s to play + 1 s; the scheduler looks at least once a second


class SlowToneEngine(ToneEngine):
    """Synthesis slower than real time: each step takes `step_s`."""

    def __init__(self, step_s: float, **kw) -> None:
        super().__init__(**kw)
        self.step_s = step_s

    def step(self, jobs: list[Job]) -> list:
        time.sleep(self.step_s)
        return super().step(jobs)


def test_a_slow_reader_gives_its_slot_up_only_while_others_wait():
    """A client that reads often, but a quarter of real time, keeps its slot while nobody
    waits; once a stream waits for the slot, it is dropped for being behind real time."""

    async def go():
        sched = Scheduler(ToneEngine(samples=250), max_streams=1, read_timeout_s=1.0)
        sched.start()
        try:
            slow = make_job(sched, ["x"] * 200, client="slow")  # 0.25 s of audio a segment
            events: list = []

            async def read_slowly():
                while not events or not isinstance(events[-1], Done | Failed | Cancelled):
                    events.append(await slow.channel.get())
                    await asyncio.sleep(0.6)  # reads every 0.6 s: never 1 s without reading

            reader = asyncio.create_task(read_slowly())
            await asyncio.sleep(4.0)  # 3+ s behind real time by now, alone on the scheduler
            alone = sched.counters.dropped
            waiting = make_job(sched, ["y"], client="other")
            other = await drain(waiting)
            await reader
            return alone, events[-1], other[-1]
        finally:
            sched.stop()

    alone, last, other = run(go())
    assert alone == 0
    assert isinstance(last, Failed) and last.code == "read_timeout" and "behind" in last.message
    assert isinstance(other, Done)


def test_a_stalled_reader_gives_its_slot_up_within_seconds_while_others_wait():
    """A client that reads its first audio, then nothing: alone it keeps its slot for the read
    timeout, but once a stream waits for the slot it gives it up CONTENDED_READ_S behind real
    time. Stalled readers from two addresses held every slot for the whole read timeout."""

    async def go():
        sched = Scheduler(ToneEngine(samples=250), max_streams=1, read_timeout_s=60.0)
        sched.start()
        try:
            stalled = make_job(sched, ["x"] * 400, client="stalled")  # 100 s of audio
            await stalled.channel.get()  # 0.25 s of it, then nothing
            await asyncio.sleep(CONTENDED_READ_S + 1)
            alone = sched.counters.dropped
            t0 = time.monotonic()
            waiting = make_job(sched, ["y"], client="other")
            other = (await drain(waiting))[-1]
            return alone, time.monotonic() - t0, other, (await drain(stalled))[-1]
        finally:
            sched.stop()

    alone, waited, other, last = run(go())
    assert alone == 0
    assert isinstance(other, Done) and waited < 5.0, (other, waited)  # the timeout is 60 s
    assert isinstance(last, Failed) and last.code == "read_timeout" and "others" in last.message


def test_a_stream_behind_only_because_synthesis_is_slow_keeps_its_slot():
    """Synthesis at a fifth of real time, read as it comes, with a stream waiting: the
    listener is seconds behind real time, but not because of its client."""

    async def go():
        engine = SlowToneEngine(step_s=0.25, samples=50)  # 0.05 s of audio per 0.25 s
        sched = Scheduler(engine, max_streams=1, read_timeout_s=1.0)
        sched.start()
        try:
            first = make_job(sched, ["x"] * 16, client="a")
            waiting = make_job(sched, ["y"], client="b")
            return (await drain(first))[-1], (await drain(waiting))[-1]
        finally:
            sched.stop()

    first, waiting = run(go())
    assert isinstance(first, Done) and isinstance(waiting, Done), (first, waiting)


class IdleToneEngine(ToneEngine):
    """Records, at each let_go(), how many jobs the scheduler was running; says it has more
    idle work for its first ``more`` calls (as CosyVoice does while CUDA graphs wait)."""

    def __init__(self, sched_of, more: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.sched_of, self.let_go_at, self.more = sched_of, [], more

    def let_go(self) -> bool:
        self.let_go_at.append(self.sched_of().snapshot()["active"])
        return len(self.let_go_at) <= self.more


def test_the_engine_lets_its_idle_state_go_once_nothing_runs():
    """After the last job ends, the scheduler tells the engine it is idle (CosyVoice then frees
    its flow state pool); never while a job runs."""

    async def go():
        engine = IdleToneEngine(lambda: sched, samples=250)
        sched = Scheduler(engine)
        sched.start()
        try:
            await drain(make_job(sched, ["x"] * 8))
            deadline = time.monotonic() + 5
            while not engine.let_go_at and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return engine.let_go_at
        finally:
            sched.stop()

    let_go_at = run(go())
    assert let_go_at and not any(let_go_at), let_go_at


def test_an_engine_with_more_idle_work_is_called_again_while_idle():
    """An engine whose let_go() says it has more to do (a CUDA graph each call) is called again
    a gap later while the scheduler stays idle, and no more once it says it is done."""

    async def go():
        engine = IdleToneEngine(lambda: sched, more=2, samples=250)
        sched = Scheduler(engine)
        sched.start()
        try:
            await drain(make_job(sched, ["x"] * 4))
            deadline = time.monotonic() + 10
            while len(engine.let_go_at) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(3 * TRIM_GAP_S)  # room for a fourth call, which must not come
            return engine.let_go_at
        finally:
            sched.stop()

    assert run(go()) == [0, 0, 0]


def test_capacity_and_serial_mode():
    async def go():
        engine = ToneEngine()
        sched = Scheduler(engine, max_streams=1, max_queue=1, serial=True)
        a = make_job(sched, ["a", "b"])
        b = make_job(sched, ["c"])
        with pytest.raises(Busy):
            make_job(sched, ["d"])
        sched.start()
        try:
            await asyncio.gather(drain(a), drain(b))
        finally:
            sched.stop()
        return engine

    engine = run(go())
    assert all(len(batch) == 1 for batch in engine.batches)


def test_earliest_deadline_first():
    engine = ToneEngine()
    sched = Scheduler(engine, first_audio_budget_s=0.25)

    def job(created: float, first: float | None = None, audio: float = 0.0, text=None) -> Job:
        j = Job(speaker=SPEAKER, channel=None, created=created)  # never admitted: no channel
        j.first_text_at = created if text is None else text
        j.first_audio_at, j.audio_seconds = first, audio
        return j

    new = job(created=100.0)  # due at 100.25
    starving = job(created=90.0, first=95.0, audio=5.1)  # listener runs dry at 100.1
    comfortable = job(created=90.0, first=95.0, audio=20.0)  # dry at 115
    # A context opened at 50 whose text came at 100.05: due at 100.3, not at 50.25 (ahead
    # of the stream about to run dry).
    late_text = job(created=50.0, text=100.05)
    order = sorted([late_text, comfortable, new, starving], key=sched.deadline)
    assert order == [starving, new, late_text, comfortable]


def admission_order(max_streams: int, burst: int, segments: int) -> tuple[list, list, int]:
    """Client a queues `burst` streams of `segments` segments, then client b one; all run to
    the end. The order the engine started them in, a's ids and b's id."""

    async def go():
        engine = ToneEngine()
        sched = Scheduler(engine, max_streams=max_streams)
        early = [make_job(sched, ["a"] * segments, client="a") for _ in range(burst)]
        later = make_job(sched, ["b"], client="b")
        sched.start()
        try:
            await asyncio.gather(*(drain(j) for j in [*early, later]))
        finally:
            sched.stop()
        return engine.started, [j.id for j in early], later.id

    return run(go())


def test_admission_takes_turns_between_clients():
    """Client a queues a burst before client b asks once: b takes the second slot instead of
    waiting behind a's whole burst, and a's burst then runs in its own order."""
    started, burst, other = admission_order(max_streams=2, burst=5, segments=3)
    assert started == [burst[0], other, *burst[1:]]


def test_a_slot_that_comes_free_goes_to_the_client_admitted_longest_ago():
    """One slot; client a queued three streams before client b asked once. Whenever the slot
    comes free both run none, and b (never admitted) goes before a's older streams: a client
    that queued many early cannot take every slot that comes free (a WebSocket client kept a
    waiting agent out for minutes so, one context after another)."""
    started, early, later = admission_order(max_streams=1, burst=3, segments=1)
    assert started == [early[0], later, *early[1:]]


def test_one_client_never_runs_every_slot():
    """Client a opens as many streams as there are slots and keeps them open: it runs its
    share (all but one), its last waits with a slot free (not a contended server: a's running
    streams keep their usual timeouts), and client b, coming later, gets that slot at once."""

    async def go():
        sched = Scheduler(ToneEngine(), max_streams=3, client_share=2)
        sched.start()
        try:
            held = [make_job(sched, ["a"], close=False, client="a") for _ in range(3)]
            await eventually(lambda: sched.snapshot()["active"] == 2)
            await asyncio.sleep(0.2)  # a tick or two later: still only a's share
            alone = sched.snapshot(), sched.contended
            other = await drain(make_job(sched, ["b"], client="b"))
            for job in held:
                job.cancel()
            await asyncio.gather(*(drain(j) for j in held))
            return alone, other[-1], sched.snapshot()
        finally:
            sched.stop()

    (alone, contended), other, after = run(go())
    assert (alone["active"], alone["queued"], contended) == (2, 1, False)
    assert isinstance(other, Done)
    assert (after["active"], after["queued"]) == (0, 0)


async def eventually(check, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.02)


def test_a_place_left_goes_to_the_waiting_client_holding_the_fewest():
    """Uploads' places: client a holds both and has two more waiting, queued before b's one.
    The place a leaves goes to b (before: to a's first waiter, so two busy addresses took
    every place freed and a third client waited in vain)."""
    from rtserver.service import Places

    async def go() -> list[str]:
        places = Places(2, "uploads", waiting=8, wait_s=5)
        order: list[str] = []
        release = [asyncio.Event() for _ in range(5)]

        async def use(client: str, i: int) -> None:
            async with places.enter(client):
                order.append(f"{client}{i}")
                await release[i].wait()

        tasks = [asyncio.create_task(use("a", i)) for i in range(4)]
        await asyncio.sleep(0.01)  # a0, a1 inside; a2, a3 wait
        tasks.append(asyncio.create_task(use("b", 4)))
        await asyncio.sleep(0.01)
        for i in range(5):
            release[i].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return order

    assert run(go()) == ["a0", "a1", "b4", "a2", "a3"]


def test_a_waiter_whose_client_left_gives_its_turn_and_a_handed_place_up():
    """A waiter whose `gone` is set leaves the line at once (ClientGone), and a place handed
    to a waiter that left in the same moment goes on to the next one: no place is lost."""
    from rtserver.service import ClientGone, Places

    async def go() -> tuple[list[str], int]:
        places = Places(1, "uploads", waiting=8, wait_s=5)
        order: list[str] = []
        inside, gone_a, gone_b = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def use(client: str, gone: asyncio.Event | None, until: asyncio.Event) -> None:
            async with places.enter(client, gone):
                order.append(client)
                await until.wait()

        first = asyncio.create_task(use("x", None, inside))
        await asyncio.sleep(0.01)
        a = asyncio.create_task(use("a", gone_a, asyncio.Event()))
        b = asyncio.create_task(use("b", gone_b, asyncio.Event()))
        c = asyncio.create_task(use("c", None, asyncio.Event()))
        await asyncio.sleep(0.01)
        gone_a.set()  # a leaves while waiting
        await asyncio.sleep(0.01)
        assert a.done() and isinstance(a.exception(), ClientGone)
        inside.set()  # x leaves: the place is handed to b ...
        gone_b.set()  # ... which leaves in the same moment: it goes on to c
        await first
        await eventually(lambda: b.done() and "c" in order)
        assert isinstance(b.exception(), ClientGone)
        c.cancel()
        await asyncio.gather(c, return_exceptions=True)
        return order, places.inside + places.waiters.held() + len(places._turns)

    order, held = run(go())
    assert order == ["x", "c"] and held == 0


async def hold_place(places, order: list[str], done: asyncio.Event, client: str, *, clear: bool):
    """Enter ``places`` as ``client``, note it in ``order``, and hold the place until ``done``
    (cleared again for the next holder when ``clear``)."""
    async with places.enter(client):
        order.append(client)
        await done.wait()
        if clear:
            done.clear()


def test_a_full_line_makes_room_for_a_client_with_none_in_it():
    """Two clients fill the line (4 waiting each, of 8) as fast as it empties: a third one
    got 503 every time. It now takes the place in line of the newest waiter of the client
    with the most waiting (that one gets Busy); a client with no fewer than one less than
    the most still gets Busy, and no place or count is lost."""
    from rtserver.service import Places

    async def go() -> tuple[list[str], list[bool], int]:
        places = Places(1, "uploads", waiting=8, wait_share=4, wait_s=5)
        order: list[str] = []
        done = asyncio.Event()
        use = functools.partial(hold_place, places, order, done, clear=False)

        inside = asyncio.create_task(use("x"))
        await asyncio.sleep(0.01)
        line = [asyncio.create_task(use(c)) for c in "aaaabbbb"]
        await asyncio.sleep(0.01)
        newcomer = asyncio.create_task(use("c"))  # the line is full: a's newest goes
        await asyncio.sleep(0.01)
        a_again = asyncio.create_task(use("a"))  # a 3, b 4, c 1: b has only one more
        await asyncio.sleep(0.01)
        refused = [t.done() for t in [*line, a_again]]
        done.set()
        tasks = [inside, newcomer, *line, a_again]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        busy = [type(o).__name__ for o in outcomes if isinstance(o, BaseException)]
        assert busy == ["Busy", "Busy"], outcomes
        held = places.inside + places.waiters.held() + places.holders.held() + len(places._turns)
        return order, refused, held

    order, refused, held = run(go())
    assert refused == [False, False, False, True, False, False, False, False, True]
    assert sorted(order) == sorted("xcaaabbbb") and held == 0  # c had its turn


def test_among_clients_holding_as_few_places_the_one_with_fewer_waiting_goes_first():
    """Four addresses refilling the line got every place freed before a client queued behind
    them (each held as few places as it): 10-12 s waits where a place freed every 3 s. Of
    clients holding as few places, the one with the fewest waiting now goes first."""
    from rtserver.service import Places

    async def go() -> list[str]:
        places = Places(1, "uploads", waiting=8, wait_s=5)
        order: list[str] = []
        done = asyncio.Event()
        use = functools.partial(hold_place, places, order, done, clear=True)

        tasks = [asyncio.create_task(use(c)) for c in "aaaac"]
        await asyncio.sleep(0.01)  # a inside; a, a, a, then c waiting
        for _ in range(5):
            done.set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return order

    assert run(go()) == ["a", "c", "a", "a", "a"]


def test_a_full_line_counts_places_held_too_and_turns_go_to_the_least_recently_served():
    """16 addresses each holding a place or waiting, one of each, kept a newcomer out of a
    full line: counting waiters alone, none had two more than it. Places held count too;
    and among clients as loaded, the one that held places least lately goes first."""
    from rtserver.service import Places

    async def go() -> tuple[list[str], list[str]]:
        places = Places(2, "uploads", waiting=4, wait_s=5)
        order: list[str] = []
        done = asyncio.Event()
        use = functools.partial(hold_place, places, order, done, clear=True)
        tasks = {}
        for c in ["a", "b", "a", "b", "x", "y"]:  # a, b inside; a, b, x, y waiting: full
            tasks.setdefault(c, []).append(asyncio.create_task(use(c)))
            await asyncio.sleep(0.01)
        tasks["c"] = [asyncio.create_task(use("c"))]  # a holds 1 and waits 1: 2 more than c
        await asyncio.sleep(0.01)
        for _ in range(5):
            done.set()
            await asyncio.sleep(0.01)
        done.set()
        outcomes = {c: await asyncio.gather(*ts, return_exceptions=True) for c, ts in tasks.items()}
        refused = [c for c, o in outcomes.items() for r in o if isinstance(r, BaseException)]
        return order, refused

    order, refused = run(go())
    assert refused == ["a"]  # its waiter gave its place in line to c
    assert order[:2] == ["a", "b"] and sorted(order[2:]) == ["b", "c", "x", "y"]
    assert order[2] == "x"  # of those holding and waiting as few, it held places least (never)


def test_of_clients_as_loaded_the_one_that_held_places_least_lately_goes_first():
    """16 addresses taking turns at holding the places (each until its slow upload was cut,
    3 s) made a client whose uploads take a moment wait 10 s of its 15: served in turn, it
    was one of 17. The time each client held places lately now orders them."""
    from rtserver.service import Places

    async def go() -> list[str]:
        places = Places(1, "uploads", waiting=8, wait_s=5)
        order: list[str] = []

        async def hold(client: str, seconds: float) -> None:
            async with places.enter(client):
                order.append(client)
                await asyncio.sleep(seconds)

        await hold("slow", 0.3)  # the place held long
        await hold("quick", 0.01)
        first = asyncio.create_task(hold("x", 0.05))
        await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(hold(c, 0.01)) for c in ("slow", "quick")]
        await asyncio.gather(first, *waiting)
        return order

    assert run(go()) == ["slow", "quick", "x", "quick", "slow"]
