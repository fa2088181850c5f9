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

from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from loguru import logger
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
)
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from websockets.protocol import State

from rtserver_client.client import auth_headers, ws_url
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
        **kwargs: Any,
    ) -> None:
        super().__init__(
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
        self._receive_task = None
        self.ready: Ready | None = None
        # Server contexts opened on this socket (Pipecat context id -> started), and the
        # stream numbers that tag their binary audio frames.
        self._opened: dict[str, bool] = {}
        self._streams: dict[int, str] = {}
        # Turns whose server context ended on `context_timeout` while the LLM paused: the
        # turn goes on (no TTSStoppedFrame), and its next text opens a new server context.
        self._lapsed: set[str] = set()

    def can_generate_metrics(self) -> bool:
        return True

    # ---- connection -----------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        # Connect once the pipeline has set the output rate (StartFrame).
        await self._connect()

    async def _connect(self) -> None:
        await super()._connect()
        await self._connect_websocket()
        if self._websocket and not self._receive_task:
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self) -> None:
        await super()._disconnect()
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self) -> None:
        try:
            if self._websocket and self._websocket.state is State.OPEN:
                return
            ws = await self._websocket_connect(
                self._url, additional_headers=self._headers, compression=None, max_size=None
            )
            # The server speaks first: `ready` with its speakers and limits.
            ready = decode_server_frame(await ws.recv())
            if not isinstance(ready, Ready):
                raise ConnectionError(f"expected `ready`, got {ready!r}")
            self.ready = ready
            self._websocket = ws
            # Contexts live on a socket: a new socket starts with none.
            self._opened.clear()
            self._streams.clear()
            await self._call_event_handler("on_connected")
        except Exception as e:
            self._websocket = None
            await self.push_error(error_msg=f"rtserver connection failed: {e}", exception=e)
            await self._call_event_handler("on_connection_error", f"{e}")

    async def _disconnect_websocket(self) -> None:
        try:
            await self.stop_all_metrics()
            if self._websocket:
                await self._websocket.close()
        finally:
            self._websocket = None
            await self._call_event_handler("on_disconnected")

    async def _send(self, msg: msgspec.Struct) -> None:
        if not self._websocket:
            raise ConnectionError("not connected to rtserver")
        await self._websocket.send(_encode(msg).decode())

    # ---- Pipecat hooks --------------------------------------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Append the text to the turn's server context, opening it on the first call."""
        try:
            if not self._websocket or self._websocket.state is not State.OPEN:
                await self._connect()
            if context_id not in self._opened:
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
                    )
                )
            # A sentence is complete as handed over: speak it now (flush) instead of waiting
            # for the next one. Tokens are left to the server's sentence buffering.
            await self._send(
                AppendText(context_id=context_id, text=text, flush=not self._is_streaming_tokens)
            )
            await self.start_tts_usage_metrics(text)
        except Exception as e:
            self._opened.pop(context_id, None)
            yield ErrorFrame(error=f"rtserver: {e}")
            yield TTSStoppedFrame(context_id=context_id)
            return
        yield None  # the audio arrives on the receive task

    async def flush_audio(self, context_id: str | None = None) -> None:
        """The turn's text is complete: `close` speaks the rest and ends with `done`."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id in self._opened and self._websocket:
            await self._send(Close(context_id=context_id))
        elif context_id in self._lapsed:
            self._lapsed.discard(context_id)
            await self._stop_audio_context(context_id)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Barge-in: `cancel` drops the job on the server within one engine step."""
        await self.stop_all_metrics()
        self._lapsed.discard(context_id)
        if context_id in self._opened and self._websocket:
            await self._send(Cancel(context_id=context_id))
        await super().on_audio_context_interrupted(context_id)

    # ---- receiving ------------------------------------------------------------------

    async def _receive_messages(self) -> None:
        assert self._websocket is not None
        async for frame in self._websocket:
            await self._handle(decode_server_frame(frame))

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
        elif isinstance(msg, Error):
            await self.push_error(error_msg=f"rtserver {msg.code}: {msg.message}")
            # An ending error, or a refused `start` (no `started` yet), ends the context.
            if context_id and (msg.code in ENDING_ERRORS or self._opened.get(context_id) is False):
                await self._end_context(context_id)
        else:
            logger.trace(f"{self}: {msg!r}")

    def _quiet(self, error: Error) -> bool:
        """Errors that are no news to the pipeline: an idle socket closed by the server (the
        service reconnects, as on any close), and text that was on its way to a context the
        server had already refused or ended (that was reported)."""
        if error.code == "idle_timeout":
            return True
        ended = ("unknown_context", "context_closed")  # the server forgets old ids in time
        return error.code in ended and error.context_id not in self._opened

    def _forget(self, context_id: str) -> bool:
        """Drop a server context this socket had opened; False if it had none by that id."""
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
