"""`rtserver say "text" --spk joe -o out.mp3`: speak through a running server (HTTP or --ws)."""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
from websockets.exceptions import InvalidStatus

from rtserver.client import ServerError, TTSClient
from rtserver.settings import DEFAULT_PORT, Settings

FORMATS = ["mp3", "wav", "pcm"]
DEFAULT_SPEAKER = "joe"


def add_say_args(p: argparse.ArgumentParser, env: Settings) -> None:
    p.add_argument("text", help="what to say ('-' reads stdin)")
    p.add_argument("--spk",
                   help=f"speaker id (default: {DEFAULT_SPEAKER}, the built-in voice, where the "
                        "server has it, else the first of its speakers; GET /speakers lists them)")  # fmt: skip
    p.add_argument("-o", "--output", type=Path,
                   help="write here (.mp3, .wav or .pcm); default: say.mp3")  # fmt: skip
    url = f"http://{env.host}:{env.port or DEFAULT_PORT}"
    p.add_argument("--url", default=url,
                   help=f"the server (default: {url}, from RTSERVER_HOST and RTSERVER_PORT)")  # fmt: skip
    p.add_argument("--api-key", default=(env.api_key or [None])[0],
                   help="a key of a server started with --api-key (default: the first of "
                        "RTSERVER_API_KEY)")  # fmt: skip
    p.add_argument("--format", choices=FORMATS, help="default: from the output suffix")
    p.add_argument("--ws", action="store_true", help="use /ws/tts, sending the text word by word")
    p.add_argument("--play", action="store_true", help="play with ffplay/mpv when one exists")
    p.add_argument("--speed", type=float, default=1.0,
                   help="speaking rate, 0.25 to 4 (default: 1.0)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed, honoured by CosyVoice (default: 0, a random one)")  # fmt: skip
    p.add_argument("--stream", action="store_true", help="finest chunks (HTTP)")


async def say(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    out: Path = args.output or Path("say.mp3")
    fmt = args.format or out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        return _error(f"{out}: name it .mp3, .wav or .pcm, or say which with --format")
    t0 = time.monotonic()
    try:
        async with TTSClient(args.url, api_key=args.api_key) as client:
            args.spk = args.spk or await _default_speaker(client)
            if not args.spk:
                return _error("the server has no speakers yet: register one (POST /speakers)")
            audio, rate, first = await _speak(client, args, text, "pcm" if fmt == "wav" else fmt)
            if fmt != "mp3":  # a .pcm file's is only told; a .wav file needs it
                rate = rate or await _rate_of(client, args.spk)
            if fmt == "wav":
                if not rate:
                    return _error(f"speaker {args.spk!r} is gone: its sample rate is unknown")
                audio = _wav(audio, rate)
    except ServerError as exc:
        return _error(str(exc))
    except httpx.HTTPStatusError as exc:
        return _refused(exc.response.status_code, exc.response.text)
    except InvalidStatus as exc:  # the WebSocket upgrade refused (a key missing, say)
        body = (exc.response.body or b"").decode(errors="replace")
        return _refused(exc.response.status_code, body)
    except (httpx.TransportError, OSError) as exc:
        return _error(f"cannot reach {args.url}: {exc or type(exc).__name__}")
    try:
        out.write_bytes(audio)
    except OSError as exc:  # a directory, a folder that is not there, no permission
        return _error(f"cannot write {out}: {exc.strerror or exc}")
    ttfa = (first - t0) * 1000 if first else float("nan")
    kind = "headerless s16le mono" if fmt == "pcm" else fmt  # what a player must be told
    print(f"wrote {out} ({len(audio)} bytes, {kind}{f', {rate} Hz' if rate else ''}); "
          f"first audio after {ttfa:.0f} ms", file=sys.stderr)  # fmt: skip
    if args.play:
        player = shutil.which("ffplay") or shutil.which("mpv")
        if not player:
            print("no player found (ffplay or mpv)", file=sys.stderr)
            return 0
        if fmt == "pcm":
            print("--play supports mp3 and wav output", file=sys.stderr)
            return 0
        cmd = (
            [player, "-nodisp", "-autoexit", str(out)] if "ffplay" in player else [player, str(out)]
        )
        subprocess.run(cmd, check=False)
    return 0


async def _speak(
    client: TTSClient, args: argparse.Namespace, text: str, fmt: str
) -> tuple[bytes, int, float | None]:
    """The audio, its sample rate (0: not told) and when its first piece came."""
    first: float | None = None
    audio = b""
    if not args.ws:
        async for piece in client.tts(text, args.spk, fmt, args.stream, args.speed, args.seed):
            first = first or time.monotonic()
            audio += piece
        return audio, 0, first
    async with client.connect() as conn:
        ctx = await conn.start(spk_id=args.spk, format=fmt, speed=args.speed, seed=args.seed)
        for word in text.split(" "):
            await ctx.send(word + " ")
        await ctx.close()
        async for item in ctx.events():
            if isinstance(item, bytes):
                first = first or time.monotonic()
                audio += item
        return audio, ctx.sample_rate, first


async def _default_speaker(client: TTSClient) -> str | None:
    """The built-in voice where the server has it (a CosyVoice server has not), else its first
    speaker; None when it has none (a CosyVoice2 dir before any registration)."""
    ids = [s["id"] for s in await client.speakers()]
    return DEFAULT_SPEAKER if DEFAULT_SPEAKER in ids else next(iter(ids), None)


async def _rate_of(client: TTSClient, spk_id: str) -> int:
    """The sample rate of `spk_id`'s PCM (the HTTP route sends it as a header, which the
    client's byte stream does not carry)."""
    rates = [int(s["sample_rate"]) for s in await client.speakers() if s["id"] == spk_id]
    return rates[0] if rates else 0  # 0: deleted since it spoke


def _wav(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def _refused(status: int, body: str) -> int:
    # 401 over HTTP; a WebSocket upgrade is refused with a bare 403 (docs/websocket.md)
    keyed = status in (401, 403)
    hint = " (a server started with --api-key: give one with --api-key KEY)" if keyed else ""
    return _error(f"{status} {body}{hint}")


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
