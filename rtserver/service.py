"""What the HTTP and WebSocket handlers share: speakers, limits, and opening synthesis jobs.

Handlers stay thin: they parse, call this, and turn its exceptions into status codes or
WebSocket error events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from rtserver import __version__
from rtserver.audio import make_encoder
from rtserver.channel import Channel
from rtserver.engine import Engine, Failed, Job, Speaker
from rtserver.logs import request_id
from rtserver.metrics import Metrics
from rtserver.scheduler import Busy, Scheduler
from rtserver.session import (
    ClientQuota,
    Session,
    TextRejected,
    TooManyForClient,
    check_text,
    speakable,
)
from rtserver.settings import Settings
from rtserver.text import Segmenter

__all__ = [
    "SHUTTING_DOWN",
    "Busy",
    "ClientGone",
    "ShuttingDown",
    "SpeakerRefused",
    "SynthesisFailed",
    "TTSService",
    "TextRejected",
    "TooManyForClient",
    "UnknownSpeaker",
    "UnsupportedFormat",
    "UnsupportedOption",
]


log = logging.getLogger("rtserver.service")

CUT_WAIT_S = 1.0  # at the drain's end, for the streams cut to end before uvicorn's shutdown
KEEP_STOP_S = 30.0  # at shutdown, the longest wait for a prompt being kept to stop
SPEAKER_WATCH_S = 2.0  # how often to look for speakers other processes registered
STALL_S = 15.0  # an engine step this long means the inference thread is stuck
# A transcript of at most 30 s of prompt speech; normalizing it costs ~0.15 ms a character on
# the CPU, with the GIL held, so it is bounded before any of that work starts.
MAX_PROMPT_TEXT_CHARS = 1000
# Prompts analysed at once, registrations and zero-shot requests together (each runs ONNX
# feature extraction on the CPU)
MAX_EXTRACTING = 2
# Upload bodies read at once: a body is held whole (up to 8 MiB, a few times that while its
# form is parsed) before the registration limit can look at it; 256 slow uploads held 1.5 GB.
MAX_UPLOADS = 4
UPLOADS_WAITING = 16  # requests waiting for that: a connection each, their bodies not read
UPLOAD_GRACE_S = 3.0  # before an upload's rate counts (see slow_upload)


NO_SPEAKERS = "no speakers yet: register one (POST /speakers)"


def echoed(name: str) -> str:
    """A client's name (a speaker, a model) as an error message echoes it: a bounded prefix
    (a 500 KB id made a 500 KB error)."""
    return name if len(name) <= 64 else name[:64] + "..."


class UnknownSpeaker(LookupError):
    def __init__(
        self, spk_id: str, valid: list[str], field: str = "spk_id", note: str = ""
    ) -> None:
        shown = echoed(spk_id)
        noun = "voices" if field == "voice" else "speakers"  # (OpenAI's names are voices)
        known = f"valid {noun}: {', '.join(valid)}" if valid else NO_SPEAKERS
        super().__init__(f"unknown {field} {shown!r}{note}; {known}")
        self.spk_id, self.valid, self.field = spk_id, valid, field


class UnsupportedFormat(ValueError):
    """An audio format or rate the encoder cannot produce."""


class UnsupportedOption(ValueError):
    """An option the loaded engine cannot honour (text streaming on Piper or CosyVoice v1)."""


class SynthesisFailed(RuntimeError):
    pass


SHUTTING_DOWN = "the server is shutting down; retry on another"


class ShuttingDown(Exception):
    """The server is draining: no new sessions."""


class ClientGone(Exception):
    """The client left before its response started: nothing to answer."""


class SpeakerRefused(ValueError):
    """A speaker not registered, deleted or made from a prompt: unusable audio, a bad or
    taken name, or an engine without zero-shot speakers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


T = TypeVar("T")


def _not_stored(exc: OSError) -> SpeakerRefused:
    """A registration or deletion the speaker folder refused (read-only, full): 507, the
    status for a server that cannot store what a request asks it to. The client is not told
    the server's paths; the log says which folder, and the flag that moves it."""
    # (with a traceback when the store did not say why: an errno from deep in a write)
    log.error("speaker store: %s (--speaker-dir sets the folder)", exc,
              exc_info=exc if exc.errno is not None else None)  # fmt: skip
    return SpeakerRefused(
        "the server cannot store speakers: its speaker folder is read-only or full", 507
    )


async def in_own_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that exits when it is done. torch's OpenMP workers live as long
    as the thread that started them, and with a second team idle beside the inference
    thread's, libgomp (managing more threads than cores) cuts spinning short: a CosyVoice
    stream ran 12% slower with 1.3 of 2 cores busy (docs/benchmarks.md). So what may run torch
    off the inference thread (boot, speaker registration) runs in a thread of its own."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

    threading.Thread(target=target, name="off-loop", daemon=True).start()
    return await done


# How long Places remembers the time a client held its places (its order of turns): the time
# counts half after USE_HALF_LIFE_S, and the last USERS_KEPT clients are remembered.
USE_HALF_LIFE_S = 30.0
USERS_KEPT = 1024


class Places:
    """At most ``size`` of one kind of work (``what``: "uploads") at a time, at most ``share``
    of them one client's (0: any). Work past that waits its turn for up to ``wait_s``, first
    come first served among the waiters of the clients holding the fewest places, then with
    the fewest waiting, then that held places the least time lately: at most ``waiting`` at
    once, ``wait_share`` of them one client's; past that (or that long) Busy, a 503. A full
    line makes room for a client by refusing the newest waiter of the client with the most
    places held and waiting, if that is two more than its own; so addresses refilling the
    line as fast as it empties cannot keep everyone else out. A place that is left goes to a
    waiter directly, so a newcomer cannot take it in between. (On the event loop: no lock.)"""

    def __init__(
        self, size: int, what: str, *, share: int = 0, waiting: int = 0, wait_share: int = 0,
        wait_s: float = 0.0,
    ) -> None:  # fmt: skip
        self.size, self.what, self.share = size, what, share
        self.waiting, self.wait_s = waiting, wait_s
        self.inside = 0
        self.holders = ClientQuota(what, share, "under way")  # places each client holds
        self.waiters = ClientQuota(what, wait_share, "waiting")
        self._turns: deque[tuple[str, asyncio.Future[Callable[[], None]]]] = deque()
        # seconds each client held places (decaying), and when: least recently updated first
        self._use: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @contextlib.asynccontextmanager
    async def enter(self, client: str, gone: asyncio.Event | None = None) -> AsyncIterator[None]:
        """A place for ``client``; ClientGone once ``gone`` is set while it waits."""
        if self.inside < self.size and self._may_take(client):  # then no one may be waiting
            self.inside += 1
            release = self._give(client)
        else:
            release = await self._wait_turn(client, gone)
        try:
            yield
        finally:
            self._leave(release)

    def wanted(self, client: str) -> bool:
        """Whether a place `client` left would go to a waiter (one waiting only because its
        own client holds its share waits for that client's place, not for this one)."""
        full = self.inside >= self.size
        return any(c == client or (full and self._may_take(c)) for c, _ in self._turns)

    def _may_take(self, client: str) -> bool:
        return not self.share or self.holders.held_by(client) < self.share

    async def _wait_turn(self, client: str, gone: asyncio.Event | None) -> Callable[[], None]:
        """Until a place is handed over (its release is returned); Busy, or ClientGone once
        ``gone`` is set (a client that left gives its turn up at once)."""
        try:
            unwait = self.waiters.acquire(client)
        except TooManyForClient as exc:
            raise Busy(f"{exc}; try again") from None
        if len(self._turns) >= self.waiting and not self._make_room(client):
            unwait()
            raise Busy(f"{self.size} {self.what} under way and {self.waiting} waiting; try again")
        turn: asyncio.Future[Callable[[], None]] = asyncio.get_running_loop().create_future()
        self._turns.append(entry := (client, turn))
        left = asyncio.ensure_future(gone.wait()) if gone is not None else None
        try:
            await asyncio.wait([f for f in (turn, left) if f], timeout=self.wait_s,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        except BaseException:  # cancelled
            self._forgo(entry)
            raise
        finally:
            unwait()
            if left is not None:
                left.cancel()
        left_us = gone is not None and gone.is_set()
        if turn.done() and not left_us:
            return turn.result()
        self._forgo(entry)
        if left_us:
            raise ClientGone()
        raise Busy(f"{self.size} {self.what} under way for {self.wait_s:g}s; try again")

    def _give(self, client: str) -> Callable[[], None]:
        """A place to ``client``: its release, which adds the time it was held to the
        client's use."""
        release, began = self.holders.acquire(client), time.monotonic()

        def give_back() -> None:
            now = time.monotonic()
            self._use[client] = (self._used(client, now) + now - began, now)
            self._use.move_to_end(client)
            if len(self._use) > USERS_KEPT:
                self._use.popitem(last=False)
            release()

        return give_back

    def _used(self, client: str, now: float) -> float:
        """Seconds ``client`` held places lately (each counting half after USE_HALF_LIFE_S)."""
        seconds, at = self._use.get(client, (0.0, now))
        return seconds * 0.5 ** ((now - at) / USE_HALF_LIFE_S)

    def _make_room(self, client: str) -> bool:
        """In a full line, refuse the newest waiter of the client with the most places held
        and waiting, if that is at least two more than ``client`` has: whether there is room
        now. (Counting waiters alone, 16 addresses holding places and waiting kept a
        newcomer out.)"""
        if not self._turns:  # (a line of none)
            return False
        counts = Counter(c for c, _ in self._turns)
        load = {c: self.holders.held_by(c) + n for c, n in counts.items()}
        most = max(load, key=load.__getitem__)
        if load[most] < self.holders.held_by(client) + counts[client] + 2:
            return False
        entry = next(e for e in reversed(self._turns) if e[0] == most)
        self._turns.remove(entry)
        entry[1].set_exception(
            Busy(f"{self.what}: a client with fewer waiting took this place in line; try again")
        )
        return True

    def _forgo(self, entry: tuple[str, asyncio.Future[Callable[[], None]]]) -> None:
        """A waiter stops waiting: out of the line, or a place already handed to it goes on
        (none was if it was refused: :meth:`_make_room`)."""
        turn = entry[1]
        if not turn.done():
            self._turns.remove(entry)
        elif turn.exception() is None:
            self._leave(turn.result())

    def _leave(self, release: Callable[[], None]) -> None:
        """The place goes to the first waiter of a client holding the fewest places, of those
        with the fewest waiting, of those that held places the least time lately: waiters
        queued first by addresses holding theirs (or taking turns at it, each holding a place
        until its slow upload was cut) took every place freed, and a client whose uploads
        take a moment waited 10 s of its 15."""
        release()
        takers = [entry for entry in self._turns if self._may_take(entry[0])]
        if not takers:
            self.inside -= 1
            return
        waiting, now = Counter(c for c, _ in self._turns), time.monotonic()

        def rank(entry: tuple[str, asyncio.Future]) -> tuple[int, int, float]:
            c = entry[0]
            return self.holders.held_by(c), waiting[c], self._used(c, now)

        entry = min(takers, key=rank)
        self._turns.remove(entry)
        entry[1].set_result(self._give(entry[0]))  # `inside` stays


def client_share(settings: Settings) -> int:
    """Streams one client address runs at once: with per-client limits on, all slots but one,
    so that one address cannot hold them all for as long as its streams last (its other
    streams wait as if the server were full); 0 (no limit) with them off, as in benchmarks."""
    if settings.max_client_streams and settings.streams > 1:
        return settings.streams - 1
    return 0


class TTSService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics | None = None,
        replica: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.replica = replica  # the Ray Serve replica id, when this is one of several
        self.scheduler = Scheduler(
            engine,
            max_streams=settings.streams,
            max_queue=settings.max_queue,
            serial=settings.scheduler == "serial",
            read_timeout_s=settings.read_timeout_s,
            client_share=client_share(settings),
            metrics=metrics,
        )
        self.client_streams = ClientQuota("streams", settings.max_client_streams)
        self.client_sockets = ClientQuota("sockets", settings.max_client_sockets)
        self.scheduler.metrics.watch_held(self.held)
        if hasattr(engine, "stats"):
            self.scheduler.metrics.watch_engine(engine.stats)
        if hasattr(engine, "graph_stats"):
            self.scheduler.metrics.watch_graphs(engine.graph_stats)
        self._registering: set[str] = set()  # names being registered now
        self._keeping = asyncio.Lock()  # registered speakers' prompts kept one at a time
        self._keeps: set[asyncio.Task] = set()
        self._speakers_seen: set[str] = set()  # whose prompts are kept or being kept
        self._keep_busy = threading.Lock()  # held by the thread keeping one
        self._stop_keeping = threading.Event()
        # prompts being analysed now (registrations among them), upload bodies being read now
        limits = bool(settings.max_client_streams)  # per-client limits on
        self._extractions = Places(
            MAX_EXTRACTING, "prompt analyses", waiting=MAX_UPLOADS,
            wait_share=MAX_UPLOADS // 2 if limits else 0, wait_s=settings.request_timeout_s,
        )  # fmt: skip
        self._uploads = Places(
            MAX_UPLOADS, "uploads", share=MAX_UPLOADS // 2 if limits else 0,
            waiting=UPLOADS_WAITING, wait_share=UPLOADS_WAITING // 4 if limits else 0,
            wait_s=settings.request_timeout_s / 2,  # the request's deadline runs: half is left
        )  # fmt: skip
        self.draining = False  # SIGTERM came: no new sessions
        self.sockets: set = set()  # open WsSessions, told when the server shuts down
        # each client address's share of the event loop (api.ws_session.LoopShare), one for
        # all its sockets: kept while any of them is open
        self.loop_shares: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()  # cut at the drain's end
        self.started_at = time.time()

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self.settings.warmup:
            self.engine.warmup()
        self.scheduler.start()

    def stop(self) -> None:
        # A prompt being kept stops after its piece (seconds at most on a CPU): a thread still
        # in torch when the interpreter exits aborts the process.
        self._stop_keeping.set()
        if self._keep_busy.acquire(timeout=KEEP_STOP_S):
            self._keep_busy.release()
        self.scheduler.stop()

    async def drain(self, deadline_s: float) -> None:
        """Stop taking sessions, let running ones finish for up to `deadline_s`, then end
        every WebSocket context that is left with `shutting_down` and cut every other stream
        (:meth:`cut_streams`)."""
        self.draining = True
        log.info("draining: up to %gs for %d streams", deadline_s, self.client_streams.held())
        end = time.monotonic() + deadline_s
        while self.client_streams.held() and time.monotonic() < end:
            await asyncio.sleep(0.1)
        # Bounded: a client that reads nothing would hold its socket's shutdown (and every cut
        # after it) until the write watch gave up on it. uvicorn cancels what is left.
        closing = [asyncio.ensure_future(ws.shutdown()) for ws in list(self.sockets)]
        if closing:
            await asyncio.wait(closing, timeout=CUT_WAIT_S)
        for task in closing:
            task.cancel()
        self.cut_streams()
        end = time.monotonic() + CUT_WAIT_S
        while self.client_streams.held() and time.monotonic() < end:
            await asyncio.sleep(0.05)

    def cut_streams(self) -> None:
        """At the drain's deadline every stream still running (HTTP) fails as `shutting_down`:
        its body breaks, so its client can tell it is cut, with one warning line; one still
        queued gets 503. Left to uvicorn's own shutdown, its task was cancelled with an error
        and a traceback."""
        self.draining = True
        why = Failed("the server is shutting down", "shutting_down")
        for session in list(self._sessions):
            session.cut(why)

    # ---- queries --------------------------------------------------------------------------

    def speakers(self) -> list[Speaker]:
        return self.engine.speakers()

    def speaker(self, spk_id: str) -> Speaker:
        speakers = {s.id: s for s in self.engine.speakers()}
        if spk_id not in speakers:
            raise UnknownSpeaker(spk_id, sorted(speakers))
        return speakers[spk_id]

    @property
    def sample_rate(self) -> int:
        return self.engine.sample_rate

    def readiness(self) -> tuple[bool, str]:
        """Whether to send this server new work, and why not."""
        if self.draining:
            return False, "shutting down"
        if self.scheduler.stalled(after_s=STALL_S):
            return False, f"the inference thread has not come round for {STALL_S:g} s"
        if self.scheduler.full():
            return False, "no capacity left"
        return True, "ready"

    def health(self) -> dict[str, object]:
        return {
            "status": "ok",
            **({"replica": self.replica} if self.replica is not None else {}),
            "version": __version__,
            "engine": self.engine.name,
            "uptime_s": round(time.time() - self.started_at, 1),
            "speakers": len(self.engine.speakers()),
            **self.scheduler.snapshot(),
            **self.held(),
        }

    def held(self) -> dict[str, int]:
        """Sessions not yet released, WebSockets open, upload bodies being read and prompt
        recordings being analysed, and requests waiting for either."""
        return {
            "streams_open": self.client_streams.held(),
            "sockets_open": self.client_sockets.held(),
            "uploads_reading": self._uploads.inside,
            "uploads_waiting": self._uploads.waiters.held(),
            "prompts_analysing": self._extractions.inside,
            "prompts_waiting": self._extractions.waiters.held(),
        }

    def receiving_upload(
        self, client: str, gone: asyncio.Event | None = None
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """A place to read an upload's body in, waited for in turn (before a byte of it is
        read: a waiter costs a connection), or Busy (503); ClientGone once ``gone`` is set
        while it waits. One client address holds at most half of them (a slow upload holds
        its place until the request deadline): its others wait for its own to end, as its
        streams past its share do."""
        return self._uploads.enter(client, gone)

    def slow_upload(self, client: str, held_s: float, received: int) -> str | None:
        """Why `client`'s upload that has held its place `held_s` and received `received`
        bytes gives the place up, or None: while another waits for that place, it came slower
        than --min-upload-kib-s (four uploads trickling a byte a second from two addresses
        shut registration and zero-shot for everyone until their deadline)."""
        floor = self.settings.min_upload_kib_s * 1024
        if held_s < UPLOAD_GRACE_S or received >= floor * held_s:
            return None
        if not self._uploads.wanted(client):
            return None
        rate = received / held_s
        return (
            f"the upload came at {rate:.0f} bytes/s while others waited for a place (at least "
            f"{floor} needed); send it faster, or again later"
        )

    async def register_speaker(
        self,
        spk_id: str,
        audio: bytes,
        prompt_text: str,
        client: str = "",
        gone: asyncio.Event | None = None,
    ) -> Speaker:
        register = getattr(self.engine, "register_speaker", None)
        if register is None:
            raise SpeakerRefused(
                f"the {self.engine.name} engine has no zero-shot speaker registration", 400
            )
        speakers = self.engine.speakers()
        if any(s.id == spk_id for s in speakers):
            raise SpeakerRefused(f"speaker {spk_id!r} already exists", 409)
        # One registration per name at a time (the event loop is one thread: no lock needed):
        # concurrent ones would each pass the check above, and the last writer would win.
        if spk_id in self._registering:
            raise SpeakerRefused(f"speaker {spk_id!r} is being registered", 409)
        # Registrations are kept in memory and on disk: without a cap, anyone allowed to
        # register could fill both. Those in progress count, so two at once cannot pass it.
        limit = self.settings.max_speakers
        if len(speakers) + len(self._registering) >= limit:
            raise SpeakerRefused(
                f"the server keeps at most {limit} speakers (--max-speakers); delete one "
                "first (DELETE /speakers/{id})",
                409,
            )
        check_text(prompt_text, 0, MAX_PROMPT_TEXT_CHARS, "prompt_text")
        self._registering.add(spk_id)  # from here on, waiting for a place included
        try:
            async with self._extracting(client, gone):
                speaker = await in_own_thread(lambda: register(spk_id, audio, prompt_text))
        except (ValueError, KeyError) as exc:  # AudioError, SpeakerError, empty text
            # Another replica sharing the speaker dir may have taken the name meanwhile.
            taken = any(s.id == spk_id for s in self.engine.speakers())
            raise SpeakerRefused(str(exc), 409 if taken else 400) from exc
        except OSError as exc:  # the store's folder (decoding errors are ValueErrors)
            raise _not_stored(exc) from exc
        finally:
            self._registering.discard(spk_id)
        self._keep_prompt_soon(spk_id)
        return speaker

    def _keep_prompt_soon(self, spk_id: str) -> None:
        """After a registration has answered, the engine keeps what the speaker's first stream
        would compute (CosyVoice: its prompt's flow state; seconds on a CPU): in the
        background, one speaker at a time, outside the gate for prompt analysis."""
        keep = getattr(self.engine, "keep_prompt", None)
        if keep is None:
            return
        self._speakers_seen.add(spk_id)

        def keep_now() -> None:
            with self._keep_busy:  # stop() waits for this, so no thread runs torch at exit
                if not self._stop_keeping.is_set():
                    keep(spk_id, self._stop_keeping)

        async def kept() -> None:
            async with self._keeping:
                try:
                    await in_own_thread(keep_now)
                except Exception:  # the speaker speaks all the same; its streams compute it
                    log.exception("could not keep the prompt of speaker %r", spk_id)

        task = asyncio.get_running_loop().create_task(kept(), name=f"keep-{spk_id}")
        self._keeps.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._keeps.discard)

    async def watch_speakers(self) -> None:
        """Until cancelled: speakers another process registered in a shared --speaker-dir (Ray
        replicas, servers on one volume) have their prompts kept here too, so that their first
        stream on this server starts past the prompt as on the one that took the registration.
        A look is one stat of the directory while nothing changes."""
        if getattr(self.engine, "keep_prompt", None) is None:
            return
        self._speakers_seen |= {s.id for s in self.speakers()}  # kept at warm-up
        while True:
            await asyncio.sleep(SPEAKER_WATCH_S)
            try:
                ids = {s.id for s in self.speakers()}
            except Exception:  # noqa: BLE001 - the next look may work (a file system hiccup)
                log.exception("could not list the speakers")
                continue
            for spk_id in sorted(ids - self._speakers_seen - self._registering):
                self._keep_prompt_soon(spk_id)
            # one deleted, then registered again elsewhere, is kept again
            self._speakers_seen &= ids | self._registering

    async def prompt_speaker(
        self,
        audio: bytes,
        prompt_text: str | None,
        instruction: str | None = None,
        client: str = "",
        gone: asyncio.Event | None = None,
    ) -> Speaker:
        """A speaker for one request from a prompt recording (upstream's /inference_zero_shot
        with its transcript, /inference_cross_lingual without, /inference_instruct2 with an
        instruction): neither kept nor counted in --max-speakers."""
        make = getattr(self.engine, "prompt_speaker", None)
        if make is None:
            raise SpeakerRefused(f"the {self.engine.name} engine has no zero-shot speakers")
        if instruction is not None:
            self.check_instructions(instruction)
        if prompt_text is not None:
            check_text(prompt_text, 0, MAX_PROMPT_TEXT_CHARS, "prompt_text")
        async with self._extracting(client, gone):
            try:
                return await in_own_thread(lambda: make(audio, prompt_text, instruction))
            except (ValueError, KeyError) as exc:  # AudioError, empty text, v1's instruct2
                raise SpeakerRefused(str(exc)) from exc

    def check_instructions(self, instruction: str) -> None:
        """Upstream's `instruct_text`: refused by a model without an instruct mode, as upstream
        does (the `instructions` field is ignored there instead, as by OpenAI's tts-1)."""
        if not getattr(self.engine, "instructions", False):
            raise SpeakerRefused(
                f"the {self.engine.name} model takes no instructions (CosyVoice-300M-Instruct, "
                "a dir named so, CosyVoice2 and CosyVoice3 do)"
            )
        check_text(instruction, 0, MAX_PROMPT_TEXT_CHARS, "instruct_text")
        if not instruction.strip():
            raise SpeakerRefused("instruct_text: say how to speak (it is blank)")

    async def steered(
        self,
        spk_id: str | Speaker,
        instruction: str | None,
        waited: Callable[[float], None] | None = None,
    ) -> str | Speaker:
        """``spk_id``'s speaker steered by an instruction where the engine takes one (see
        ``check_instructions``), prepared in a worker thread (v1's is normalised, up to 0.1 s;
        ``waited`` is told those seconds: not the event loop's); elsewhere ``spk_id`` as it
        is, as OpenAI's tts-1 ignores `instructions`. Raises TextRejected or UnknownSpeaker."""
        if instruction is None:
            return spk_id
        check_text(instruction, 0, MAX_PROMPT_TEXT_CHARS, "instructions")
        if not getattr(self.engine, "instructions", False) or not instruction.strip():
            return spk_id
        speaker = spk_id if isinstance(spk_id, Speaker) else self.speaker(spk_id)
        began = time.perf_counter()
        try:
            return await asyncio.to_thread(self.engine.instructed, speaker, instruction)
        except KeyError:  # deleted since it was looked up
            raise UnknownSpeaker(speaker.id, [s.id for s in self.speakers()]) from None
        finally:
            if waited is not None:
                waited(time.perf_counter() - began)

    @contextlib.asynccontextmanager
    async def _extracting(self, client: str, gone: asyncio.Event | None) -> AsyncIterator[None]:
        """A place to analyse a prompt in (its own thread: ONNX models), waited for in turn
        (a backend registering four voices at once), or Busy; ClientGone once ``gone`` is set
        while it waits (nobody would hear of the analysis)."""
        async with self._extractions.enter(client, gone):
            try:
                yield
            finally:
                self.scheduler.used_memory()  # the upload's buffers go back to the OS once idle

    async def delete_speaker(self, spk_id: str) -> None:
        delete = getattr(self.engine, "delete_speaker", None)
        if delete is None:
            raise SpeakerRefused(f"the {self.engine.name} engine has no registered speakers")
        try:
            self.speaker(spk_id)
        except UnknownSpeaker as exc:  # the path names no resource: 404, not a bad body's 400
            raise SpeakerRefused(str(exc), 404) from exc
        try:
            await in_own_thread(lambda: delete(spk_id))
        except KeyError as exc:  # a built-in speaker, or one deleted meanwhile (another request)
            gone = all(s.id != spk_id for s in self.speakers())
            raise SpeakerRefused(str(exc), 404 if gone else 400) from exc
        except OSError as exc:
            raise _not_stored(exc) from exc

    # ---- synthesis ------------------------------------------------------------------------

    def segmenter(self, stream: bool, incremental: bool = False) -> Segmenter:
        """How text becomes job segments: the engine's own rules where it has them (CosyVoice
        splits as upstream does), else sentence segmentation tuned for low latency."""
        own = getattr(self.engine, "segmenter", None)
        if own is not None:
            return own(incremental)
        s = self.settings
        return Segmenter(
            min_chars=s.min_sentence_chars,
            first_chars=s.first_segment_chars,
            # stream=true asks for the finest chunks: cut at clauses, not only sentences.
            clause_chars=s.first_segment_chars if stream else 0,
        )

    def check_whole_text(self, text: str, field: str) -> None:
        """A request's whole text (the body's `field`), before anything is admitted: raises
        TextRejected."""
        check_text(text, 0, self.settings.max_text_chars, name=field)
        if not speakable(text):
            raise TextRejected("no_speakable_text", f"{field}: has nothing to speak", field=field)

    def _check_open(self) -> None:
        if self.draining:
            raise ShuttingDown(SHUTTING_DOWN)

    async def open_session(
        self,
        spk_id: str | Speaker,
        client: str,
        fmt: str = "pcm",
        sample_rate: int | None = None,
        speed: float = 1.0,
        seed: int = 0,
        stream: bool = False,
        incremental: bool = False,
        text_streaming: bool = False,
        instructions: str | None = None,
        waited: Callable[[float], None] | None = None,
    ) -> Session:
        """A session whose job is admitted. Everything that can fail is built first; raises
        ShuttingDown, TextRejected, UnknownSpeaker, UnsupportedFormat, UnsupportedOption,
        TooManyForClient or Busy, holding nothing then.
        ``spk_id``: a speaker's id, or one made for this request (:meth:`prompt_speaker`),
        steered by ``instructions`` (:meth:`steered`, which tells ``waited`` its wait)."""
        self._check_open()
        if instructions is not None:
            spk_id = await self.steered(spk_id, instructions, waited)
            self._check_open()  # the drain may have begun while it waited
        speaker = spk_id if isinstance(spk_id, Speaker) else self.speaker(spk_id)
        try:
            encoder = make_encoder(fmt, speaker.sample_rate, sample_rate)
        except ValueError as exc:
            raise UnsupportedFormat(str(exc)) from exc
        if text_streaming and not getattr(self.engine, "text_streaming", False):
            raise UnsupportedOption("text_streaming needs a CosyVoice2 or CosyVoice3 model")
        segmenter = self.segmenter(stream, incremental)
        release = self.client_streams.acquire(client)
        loop = asyncio.get_running_loop()
        job = Job(
            speaker=speaker,
            channel=Channel(loop, self.scheduler.wake),
            speed=speed,
            seed=seed,
            stream=stream,
            max_audio_s=self.settings.max_audio_s,
            request_id=request_id.get(),
            client=client,
            text_streaming=text_streaming,
        )
        try:
            self.scheduler.submit(job)
        except Busy:
            release()
            raise
        wake = self.scheduler.wake
        session = Session(job, encoder, segmenter, self.settings.max_text_chars, wake, release)
        self._sessions.add(session)
        return session
