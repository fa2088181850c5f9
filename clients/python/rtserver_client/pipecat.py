"""A Pipecat TTS service for rtserver: `pip install "rtserver-client[pipecat]"`.

One WebSocket to /ws/tts for the whole pipeline, one server context per turn (Pipecat reuses a
context id within a turn, and the protocol multiplexes contexts on the socket). Sentences are
appended to the turn's context as Pipecat hands them over; the end of the turn sends `close`;
a barge-in sends `cancel`, after which the server sends no audio of that context. PCM frames
become TTSAudioRawFrames at the pipeline's output rate (the server resamples), and the
server's `words` events become Pipecat word timestamps, so the transcript follows playback.

    tts = RTServerTTSService(base_url="http://127.0.0.1:50000", voice="joe")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from loguru import logger
from pipecat.frames.frames import (
    AggregatedTextProgressFrame,
    Frame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from rtserver_client.client import auth_headers, connect_ws, ws_url
from rtserver_client.protocol import (
    ENDING_ERRORS,
    AppendText,
    Cancel,
    Cancelled,
    Close,
    Done,
    Error,
    Ready,
    Start,
    Started,
    Words,
    decode_server_frame,
)

__all__ = ["RTServerTTSService"]

_encode = msgspec.json.Encoder().encode
_READY_TIMEOUT_S = 10.0  # the server's `ready` follows the upgrade at once


class RTServerTTSService(WebsocketTTSService):
    """Pipecat TTS on rtserver's /ws/tts, with word timestamps and barge-in.

    Args:
        base_url: the server's HTTP base URL (`ws://.../ws/tts` is derived from it).
        voice: the speaker id (`GET /speakers`).
        api_key: for a server started with `--api-key`.
        speed: speaking rate, 1.0 normal.
        instructions: how to speak, e.g. a dialect or an emotion (CosyVoice2/3's instruct
            mode; other engines ignore it).
        word_timestamps: ask the server for `words` events; the service then pushes each
            word as a TTSTextFrame timed to the audio.
        sample_rate: output rate; default the pipeline's.
        text_aggregation_mode: SENTENCE (Pipecat's default) hands over whole sentences and
            each is spoken at once; TOKEN streams LLM tokens and lets the server's own
            sentence buffering cut them, for the lowest latency.
        text_streaming: feed the model text as it arrives instead of by sentence
            (CosyVoice2/3 only; other engines refuse the turn): speech starts after a few
            words. Best with TOKEN; each sentence handed over in SENTENCE mode is a piece.
        seed: sampling seed (CosyVoice); 0 draws a random one per turn.
    """

    def __init__(
        self,
        *,
        base_url: str = "http://127.0.0.1:50000",
        voice: str = "joe",
        api_key: str | None = None,
        speed: float = 1.0,
        instructions: str | None = None,
        word_timestamps: bool = True,
        sample_rate: int | None = None,
        text_aggregation_mode: TextAggregationMode | None = None,
        text_streaming: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            # Reconnecting is on demand (see _ensure_socket), not Pipecat's background loop.
            reconnect_on_error=False,
            text_aggregation_mode=text_aggregation_mode,
            # Text frames come from the word timestamps (or, when a server sends none, from
            # Pipecat's end-of-context completion), so an interrupted turn only adds what
            # was actually spoken to the LLM context.
            push_text_frames=False,
            push_start_frame=True,
            sample_rate=sample_rate,
            settings=TTSSettings(model=None, voice=voice, language=None),
            **kwargs,
        )
        self._url = ws_url(base_url)
        self._headers = auth_headers(api_key)
        self._speed = speed
        self._instructions = instructions
        self._word_timestamps = word_timestamps
        self._text_streaming = text_streaming
        self._seed = seed
        self._receive_task: asyncio.Task[None] | None = None
        self.ready: Ready | None = None
        # Server contexts opened on this socket (Pipecat context id -> started), and the
        # stream numbers that tag their binary audio frames.
        self._opened: dict[str, bool] = {}
        self._streams: dict[int, str] = {}
        # Turns whose server context ended on `context_timeout` while the LLM paused: the
        # turn goes on (no TTSStoppedFrame), and its next text opens a new server context.
        self._lapsed: set[str] = set()
        # Server contexts sent `close`: their turn's text is complete.
        self._closing: set[str] = set()
        # Turns that failed (refused, server down, socket lost) and were reported: the rest
        # of their text is dropped until their audio context ends.
        self._failed: set[str] = set()
        # Turns the server refused some text of (the first refusal's code): reported once,
        # and past max_text_chars none of their text is sent any more (all would be refused).
        self._refused: dict[str, str] = {}

    def can_generate_metrics(self) -> bool:
        return True

    # ---- connection -----------------------------------------------------------------
    # Reconnecting is on demand and has one owner, `_ensure_socket`: a socket's reader
    # (`_read`) ends the contexts that lived on it when it closes and retries nothing; the next
    # turn opens a new socket and a new reader. A server that is down then costs that turn one
    # ErrorFrame, and the turn after tries again: a restart (CosyVoice loads for a minute) never
    # makes the service give up. (Pipecat's own loop retries in the background a few times and
    # then gives up for good, and its reconnects raced the sockets turns opened.)

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        # Connect once the pipeline has set the output rate (StartFrame).
        await self._connect()

    async def _connect(self) -> None:
        await super()._connect()
        try:
            await self._ensure_socket()
        except Exception as e:
            # Said now, not only at the first turn (a refused key makes the service unusable).
            await self.push_error(error_msg=f"rtserver connection failed: {e}", exception=e)

    async def _disconnect(self) -> None:
        await super()._disconnect()  # sets _disconnecting: the reader reports nothing
        await self._disconnect_websocket()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None

    async def _ensure_socket(self) -> None:
        """An open socket with its reader; raises if the server cannot be reached."""
        if self._websocket and self._websocket.state is State.OPEN:
            return
        await self._end_reader()
        try:
            await self._connect_websocket()
        except Exception as e:
            await self._call_event_handler("on_connection_error", f"{e}")
            raise
        assert self._websocket is not None
        self._receive_task = self.create_task(self._read(self._websocket), name="rtserver-read")

    async def _end_reader(self) -> None:
        """Let the last socket's reader finish (it ends that socket's contexts) before a new
        socket has any: its socket is closing, so that is a moment."""
        task, self._receive_task = self._receive_task, None
        if task and not task.done():
            await asyncio.wait({task}, timeout=self._ws_close_timeout + 1)
            if not task.done():
                await self.cancel_task(task)

    async def _connect_websocket(self) -> None:
        ws = await connect_ws(
            self._url,
            self._websocket_connect,
            additional_headers=self._headers,
            compression=None,
            max_size=None,
        )
        try:
            # The server speaks first: `ready` with its speakers and limits.
            ready = decode_server_frame(await asyncio.wait_for(ws.recv(), _READY_TIMEOUT_S))
            if not isinstance(ready, Ready):
                raise ConnectionError(f"expected `ready`, got {ready!r}")
        except BaseException:
            ws.transport.abort()  # a server that sent no `ready` answers no closing handshake
            raise
        self.ready = ready
        self._websocket = ws
        # Contexts live on a socket: a new socket starts with none.
        self._opened.clear()
        self._streams.clear()
        self._closing.clear()
        await self._call_event_handler("on_connected")

    async def _disconnect_websocket(self) -> None:
        ws, self._websocket = self._websocket, None  # first: its reader sees it is not current
        try:
            await self.stop_all_metrics()
            if ws:
                await ws.close()
        finally:
            if ws:
                await self._call_event_handler("on_disconnected")

    async def _send(self, msg: msgspec.Struct) -> None:
        if not self._websocket:
            raise ConnectionError("not connected to rtserver")
        await self._websocket.send(_encode(msg).decode())

    # ---- Pipecat hooks --------------------------------------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Append the text to the turn's server context, opening it on the first call."""
        if context_id in self._failed:
            # The turn failed and that was reported: the rest of its text is not spoken.
            logger.debug(f"{self}: turn {context_id} failed; not speaking [{text}]")
            return
        if self._refused.get(context_id) == "text_too_long":
            logger.debug(f"{self}: turn {context_id} is over max_text_chars; dropping [{text}]")
            return
        try:
            if context_id not in self._opened:
                await self._ensure_socket()
                self._lapsed.discard(context_id)
                self._opened[context_id] = False
                await self._send(
                    Start(
                        context_id=context_id,
                        spk_id=str(self._settings.voice),
                        format="pcm",
                        sample_rate=self.sample_rate,
                        speed=self._speed,
                        instructions=self._instructions,
                        timestamps=self._word_timestamps,
                        text_streaming=self._text_streaming,
                        seed=self._seed,
                    )
                )
            # A sentence is complete as handed over: speak it now (flush) instead of waiting
            # for the next one. Tokens are left to the server's sentence buffering.
            await self._send(
                AppendText(context_id=context_id, text=text, flush=not self._is_streaming_tokens)
            )
            await self.start_tts_usage_metrics(text)
        except Exception as e:
            await self._fail(context_id, f"rtserver: {e}", e)
            return
        yield None  # the audio arrives on the receive task

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The turn's text is complete: `close` speaks the rest and ends with `done`."""
        context_id = context_id or self.get_active_audio_context_id()
        if not context_id:
            return
        if context_id in self._opened and self._websocket:
            self._closing.add(context_id)
            await self._send(Close(context_id=context_id))
            return
        if not self.is_usable and self.audio_context_available(context_id):
            # Pipecat gave no text of this turn to run_tts (an unusable service is given no
            # work, e.g. after a refused key, reported once): it failed unspoken, and must
            # end now, not be pushed as spoken when its audio context times out.
            self._failed.add(context_id)
        if context_id in self._lapsed or context_id in self._failed:
            self._lapsed.discard(context_id)
            await self._stop_audio_context(context_id)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Barge-in: `cancel` drops the job on the server within one engine step."""
        await self.stop_all_metrics()
        self._lapsed.discard(context_id)
        self._failed.discard(context_id)
        self._refused.pop(context_id, None)
        if context_id in self._opened and self._websocket:
            await self._send(Cancel(context_id=context_id))
        await super().on_audio_context_interrupted(context_id)

    async def _apply_force_complete(self, context_id: str) -> None:
        """At the end of its audio, Pipecat pushes a context's text that got no word timings
        as spoken (for providers that drop them). A failed turn's text was not spoken: it
        must not reach the LLM context as if it had been, nor text the server refused (with
        word timestamps, what was spoken got its words). (A Pipecat internal: no hook.)"""
        refused = self._word_timestamps and context_id in self._refused
        if context_id not in self._failed and not refused:
            await super()._apply_force_complete(context_id)
            return
        frames = self._aggregated_frame_sequencer.force_complete(
            context_id, self._word_timestamp_tracker.last_pts
        )
        unspoken = (TTSTextFrame, AggregatedTextProgressFrame)
        await self._push_word_frames(
            [f for f in frames if not (isinstance(f, unspoken) and f.context_id == context_id)]
        )

    async def _record_context_audio_outcome(self, context_id: str, received_audio: bool) -> None:
        """Pipecat reports a context that ends without audio, and gives up on the service
        after a few in a row. A failed turn was reported already, and turns failing while the
        server restarts must not cost the service for good. (A Pipecat internal: no hook.)"""
        self._refused.pop(context_id, None)  # the turn is over
        if context_id in self._failed:
            self._failed.discard(context_id)
            return
        await super()._record_context_audio_outcome(context_id, received_audio)

    # ---- receiving ------------------------------------------------------------------

    async def _receive_messages(self) -> None:
        """Unused (WebsocketService's retry loop calls it): each socket has its own reader,
        `_read`, which ends with the socket."""
        raise NotImplementedError

    async def _read(self, ws: ClientConnection) -> None:
        """Handle one socket's frames until it closes, then end the contexts it carried."""
        reason = "the connection to rtserver was lost"
        try:
            async for frame in ws:
                try:
                    msg = decode_server_frame(frame)
                except msgspec.MsgspecError as e:  # e.g. an event of a newer server
                    logger.warning(f"{self}: unreadable frame from rtserver: {e}")
                    continue
                await self._handle(msg)
            reason = f"rtserver closed the socket ({ws.protocol.close_rcvd})"
        except ConnectionClosed as e:
            reason = f"the connection to rtserver was lost ({e})"
        except Exception as e:  # a bug here: drop the socket rather than leave it unread
            logger.exception(f"{self}: reading rtserver's socket failed")
            reason = f"reading rtserver's socket failed ({e})"
            ws.transport.abort()
        finally:
            # Shielded: a new socket's `_end_reader` may cancel this reader, and its turns
            # must still end.
            await asyncio.shield(self._socket_gone(ws, reason))

    async def _socket_gone(self, ws: ClientConnection, reason: str) -> None:
        """A closed socket's contexts are gone with it: each such turn fails (one error, no
        hang); the next turn opens a new socket."""
        if self._websocket is not ws:  # closed on purpose (_disconnect_websocket)
            return
        self._websocket = None
        await self._call_event_handler("on_disconnected")
        if self._disconnecting:
            return
        logger.debug(f"{self}: {reason}")
        for context_id in list(self._opened):
            if self.audio_context_available(context_id):
                await self._fail(context_id, f"{reason} in the middle of a turn")
            else:  # interrupted (its `cancel` was on the way): nobody waits for it
                self._forget(context_id)

    async def _handle(self, msg: object) -> None:
        if isinstance(msg, tuple):  # (stream, PCM)
            stream, pcm = msg
            context_id = self._streams.get(stream)
            # Audio of an interrupted context may still be in flight: it has no audio
            # context any more and is dropped here.
            if context_id and self.audio_context_available(context_id):
                await self.append_to_audio_context(
                    context_id,
                    TTSAudioRawFrame(pcm, self.sample_rate, 1, context_id=context_id),
                )
            return
        context_id = getattr(msg, "context_id", None)
        if isinstance(msg, Started):
            self._opened[msg.context_id] = True
            self._streams[msg.stream] = msg.context_id
        elif isinstance(msg, Words):
            await self.add_word_timestamps(
                [(w.word, w.start_ms / 1000) for w in msg.words], msg.context_id
            )
        elif isinstance(msg, Done | Cancelled):
            await self._end_context(msg.context_id)
        elif (
            isinstance(msg, Error) and msg.code == "context_timeout" and context_id in self._opened
        ):
            logger.debug(f"{self}: rtserver context {context_id} timed out; the turn goes on")
            self._forget(context_id)
            self._lapsed.add(context_id)
        elif isinstance(msg, Error) and self._quiet(msg):
            logger.debug(f"{self}: rtserver {msg.code}: {msg.message}")
        elif isinstance(msg, Error) and context_id in self._opened and self._ends(msg):
            await self._fail(context_id, f"rtserver {msg.code}: {msg.message}")
        elif isinstance(msg, Error) and context_id in self._opened:
            await self._refuse_text(context_id, msg)
        elif isinstance(msg, Error):
            await self.push_error(error_msg=f"rtserver {msg.code}: {msg.message}")
        else:
            logger.trace(f"{self}: {msg!r}")

    async def _refuse_text(self, context_id: str, error: Error) -> None:
        """The server dropped a fragment and the context goes on: one ErrorFrame per turn,
        not one per token (past max_text_chars it refuses every one)."""
        if context_id in self._refused:
            logger.debug(f"{self}: rtserver {error.code}: {error.message}")
            return
        self._refused[context_id] = error.code
        await self.push_error(error_msg=f"rtserver {error.code}: {error.message}")

    def _quiet(self, error: Error) -> bool:
        """Errors that are no news to the pipeline: an idle socket closed by the server (the
        service reconnects, as on any close), and text that was on its way to a context the
        server had already refused or ended (that was reported)."""
        if error.code == "idle_timeout":
            return True
        ended = ("unknown_context", "context_closed")  # the server forgets old ids in time
        return error.code in ended and error.context_id not in self._opened

    def _ends(self, error: Error) -> bool:
        """Whether an error about an open context ends it: an ending error, or the refusal
        of its `start` (no `started` yet)."""
        return error.code in ENDING_ERRORS or self._opened.get(error.context_id or "") is False

    async def _fail(self, context_id: str, error: str, exception: Exception | None = None) -> None:
        """The turn failed: one ErrorFrame (not one more per sentence, nor Pipecat's "no
        audio"), and its audio context ends (one TTSStoppedFrame) once its text is complete:
        now if `close` was sent, else at the turn's end (flush_audio)."""
        text_complete = context_id in self._closing
        self._forget(context_id)
        if context_id not in self._failed:
            await self.push_error(error_msg=error, exception=exception)
            # Marked only while its audio context is there: it is forgotten when that ends.
            if self.audio_context_available(context_id):
                self._failed.add(context_id)
        if text_complete:
            await self._stop_audio_context(context_id)

    def _forget(self, context_id: str) -> bool:
        """Drop a server context this socket had opened; False if it had none by that id."""
        self._closing.discard(context_id)
        if self._opened.pop(context_id, None) is None:
            return False
        self._streams = {s: c for s, c in self._streams.items() if c != context_id}
        return True

    async def _end_context(self, context_id: str) -> None:
        if self._forget(context_id):
            await self._stop_audio_context(context_id)

    async def _stop_audio_context(self, context_id: str) -> None:
        if self.audio_context_available(context_id):
            await self.stop_ttfb_metrics()
            await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
            await self.remove_audio_context(context_id)
