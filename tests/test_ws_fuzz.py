"""A hypothesis state machine over /ws/tts messages against a real server: whatever a client
sends, in whatever order, every context that started ends with exactly one `done`,
`cancelled` or ending `error`, no audio of a context follows its end, and the scheduler's
counters go back to zero."""

from __future__ import annotations

import contextlib
import json
import struct
import time

import pytest
from golden.conftest import resolve_golden_dir
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from serverproc import ServerProcess
from websockets.sync.client import connect

from rtserver.protocol import ENDING_ERRORS

FRAGMENTS = st.sampled_from(
    ["Hello", " there", ". ", "How are you today?", "...", "\u200b", "a\x00b", "你好。", " ",
     "One, two, three", "!", "x" * 300]
)  # fmt: skip
FORMATS = st.sampled_from([("pcm", None), ("pcm", 16000), ("mp3", None), ("mp3", 9000),
                           ("mp3", 24000), ("wav", None), ("opus", None), ("opus", 22050),
                           ("mulaw", None), ("alaw", 16000), ("aac", None), ("flac", 8000)])  # fmt: skip
SPEEDS = st.sampled_from([1.0, 0.25, 4.0, 0.1, 1.5])


def ending(event: dict) -> bool:
    kind = event["type"]
    return kind in ("done", "cancelled") or (kind == "error" and event["code"] in ENDING_ERRORS)


class WsMachine(RuleBasedStateMachine):
    url = ""  # set by the test
    speaker = "joe"
    text_streaming = st.just(False)  # CosyVoice also takes text as it comes (bistream)

    def __init__(self) -> None:
        super().__init__()
        self.exits = contextlib.ExitStack()

    @initialize()
    def open_socket(self) -> None:
        self.ws = self.exits.enter_context(connect(self.url, compression=None, max_size=None))
        self.events: list[str | bytes] = [self.ws.recv(timeout=30)]
        self.started: dict[str, int] = {}  # context id -> stream
        self.open: list[str] = []  # started and not closed or cancelled by us
        self.next_id = 0

    def send(self, **msg) -> None:
        self.ws.send(json.dumps(msg))

    @rule(fmt=FORMATS, speed=SPEEDS, text=st.one_of(st.just(""), FRAGMENTS), data=st.data())
    def start(self, fmt: tuple[str, int | None], speed: float, text: str, data) -> None:
        cid = f"c{self.next_id}"
        self.next_id += 1
        msg = {"type": "start", "context_id": cid, "spk_id": self.speaker, "format": fmt[0],
               "speed": speed, "text": text,
               "text_streaming": data.draw(self.text_streaming)}  # fmt: skip
        if fmt[1]:
            msg["sample_rate"] = fmt[1]
        self.send(**msg)
        self.open.append(cid)  # maybe refused: the end check only counts `started` ones

    @precondition(lambda self: self.open)
    @rule(data=st.data(), text=FRAGMENTS, flush=st.booleans())
    def text(self, data, text: str, flush: bool) -> None:
        cid = data.draw(st.sampled_from(self.open))
        self.send(type="text", context_id=cid, text=text, flush=flush)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), kind=st.sampled_from(["flush", "close", "cancel"]))
    def control(self, data, kind: str) -> None:
        cid = data.draw(st.sampled_from(self.open))
        self.send(type=kind, context_id=cid)
        if kind != "flush":
            self.open.remove(cid)

    @rule(frame=st.sampled_from(['{"type": "ping"}', "{oops", '{"type": "bogus"}', "[[[[]]]]",
                                 '{"type": "text", "context_id": "ghost", "text": "hi"}']))  # fmt: skip
    def odd_frame(self, frame: str) -> None:
        self.ws.send(frame)

    def teardown(self) -> None:
        try:
            for cid in self.open:
                self.send(type="close", context_id=cid)
            self.drain()
            self.check()
        finally:
            self.exits.close()

    def drain(self) -> None:
        """Read until every context that started has ended (or fail after a minute)."""
        deadline = time.monotonic() + 60
        self.send(type="ping")  # answered in order: every `started` comes before the pong
        while not self.events or self.events[-1] != '{"type":"pong"}':
            self.events.append(self.ws.recv(timeout=60))
        while not self.all_ended():
            assert time.monotonic() < deadline, f"contexts never ended: {self.pending()}"
            self.events.append(self.ws.recv(timeout=60))

    def parsed(self) -> list[dict | bytes]:
        return [e if isinstance(e, bytes) else json.loads(e) for e in self.events]

    def endings(self) -> dict[str, list[str]]:
        ends: dict[str, list[str]] = {}
        for e in self.parsed():
            if isinstance(e, bytes):
                continue
            if e["type"] == "started":
                self.started[e["context_id"]] = e["stream"]
            elif ending(e):
                ends.setdefault(e["context_id"], []).append(e["type"])
        return ends

    def pending(self) -> list[str]:
        ends = self.endings()
        return [cid for cid in self.started if cid not in ends]

    def all_ended(self) -> bool:
        return not self.pending()

    def check(self) -> None:
        ends = self.endings()
        for cid in self.started:
            assert len(ends[cid]) == 1, f"{cid} ended {ends[cid]}"
        ended_streams: set[int] = set()
        for e in self.parsed():
            if isinstance(e, bytes):
                stream = struct.unpack_from("<I", e)[0]
                assert stream not in ended_streams, f"audio of stream {stream} after its end"
            elif e.get("context_id") in self.started and ending(e):
                ended_streams.add(self.started[e["context_id"]])


def run_machine(server, examples: int, **overrides) -> None:
    class Machine(WsMachine):
        url = f"{server.ws_url}/ws/tts"

    for name, value in overrides.items():
        setattr(Machine, name, value)
    case = Machine.TestCase
    case.settings = settings(
        max_examples=examples, stateful_step_count=10, deadline=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    case().runTest()
    server.assert_idle(timeout=30)


@pytest.mark.slow
def test_every_context_ends_exactly_once(server):
    run_machine(server, 25)


COSYVOICE2 = resolve_golden_dir() / "cosyvoice2" / "model"


@pytest.mark.slow
@pytest.mark.skipif(not COSYVOICE2.is_dir(), reason=f"no golden model dir at {COSYVOICE2}")
def test_every_cosyvoice_context_ends_exactly_once_with_text_streaming_or_not():
    """The same on the CosyVoice engine, whose text-streaming contexts feed the LLM text as it
    comes (open segments, seals): its own ways to leave a job or a cache block behind."""
    srv = ServerProcess(
        "--model", str(COSYVOICE2), "--no-warmup", "--max-streams", "2", "--max-queue", "3"
    ).wait_ready()
    try:
        run_machine(srv, 20, speaker="spk_f1", text_streaming=st.booleans())
    finally:
        srv.stop()
