"""rtserver-client is its own distribution: it builds, needs none of the server's heavy
dependencies, and imports in a fresh environment that has only its own."""

from __future__ import annotations

import asyncio
import email
import re
import shutil
import subprocess
import zipfile

import httpx
import pytest
from serverproc import ROOT

CLIENT = ROOT / "clients" / "python"
SERVER_ONLY = {"torch", "torchaudio", "litestar", "av", "onnxruntime", "piper-tts", "numpy"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_client_wheel_installs_alone(tmp_path):
    uv = shutil.which("uv")
    assert uv, "the tests run under uv (README quickstart)"
    run = {"check": True, "capture_output": True, "timeout": 300}
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(CLIENT)], **run)
    (wheel,) = tmp_path.glob("rtserver_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    assert "rtserver_client/py.typed" in names and "rtserver_client/protocol.py" in names
    assert not any(n.startswith("rtserver/") for n in names), "the server must not ride along"

    requires = meta.get_all("Requires-Dist") or []
    base = {_name(r) for r in requires if "extra ==" not in r}
    assert base == {"msgspec", "websockets", "httpx"}, requires
    assert not base & SERVER_ONLY
    extras = {_name(r) for r in requires if "extra ==" in r}
    assert {"pipecat-ai", "livekit-agents"} <= extras, requires

    # A fresh venv with the wheel and its three dependencies only; the cache makes it quick.
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--python", shutil.which("python") or "python", str(venv)], **run)
    py = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "--python", str(py), str(wheel)], **run)
    probe = (
        "import importlib.util as u, rtserver_client as c\n"
        "from rtserver_client.protocol import Start, Words\n"
        "assert not any(u.find_spec(m) for m in ('torch', 'litestar', 'av', 'rtserver')), 'leak'\n"
        "assert {'TTSClient', 'ServerError', 'Words', 'Word'} <= set(c.__all__)\n"
        "assert b'timestamps' in __import__('msgspec').json.encode(\n"
        "    Start(context_id='a', spk_id='joe', timestamps=True))\n"
        "print(c.__file__)\n"
    )
    # From tmp_path: run from the repo root, Python would find the server's source tree.
    proc = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(venv) in proc.stdout, proc.stdout


def test_client_http_tts_formats_and_errors(server):
    """`TTSClient.tts` takes fmt "mp3" or "pcm" and refuses any other name (it used to return
    PCM for, say, "wav"); a refusal says the server's reason (httpx's message has only the
    status), still as an httpx.HTTPStatusError."""
    from rtserver_client.client import TTSClient

    async def go() -> tuple[bytes, httpx.HTTPStatusError]:
        async with TTSClient(server.base_url) as client:
            with pytest.raises(ValueError, match="'mp3' or 'pcm'"):
                async for _ in client.tts("Hello there.", "joe", fmt="wav"):
                    pass
            mp3 = b"".join([piece async for piece in client.tts("Hello there.", "joe")])
            with pytest.raises(httpx.HTTPStatusError) as refused:
                async for _ in client.tts("Hello there.", "nobody", fmt="pcm"):
                    pass
            return mp3, refused.value

    mp3, refused = asyncio.run(go())
    assert mp3[:3] == b"ID3" or mp3[0] == 0xFF, mp3[:4]  # an MP3 stream, not PCM
    assert refused.response.status_code == 400
    assert "nobody" in str(refused) and "joe" in str(refused), str(refused)  # the reason


async def _errors_arrive(conn, n: int = 1) -> None:
    """Wait until `n` errors without a context have come in on the socket."""
    async with asyncio.timeout(10):
        while conn.errors.qsize() < n:
            await asyncio.sleep(0.01)


def test_client_start_is_not_answered_by_an_older_error(server):
    """An error without a context about an earlier frame (here one that is not JSON) is not
    the answer to the next start. The start used to raise that `invalid_json`, though the
    server had opened its context, which then held a stream the client knew nothing of."""
    from rtserver_client.client import TTSClient

    async def go():
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            await conn.ws.send("{not json")
            await _errors_arrive(conn)
            ctx = await conn.start(spk_id="joe", context_id="turn-1", text="Hello there.")
            await ctx.close()
            return await ctx.collect(), conn.errors.get_nowait()

    result, earlier = asyncio.run(go())
    assert result.done is not None and result.audio
    assert earlier.code == "invalid_json" and earlier.context_id is None
    server.assert_idle()


def test_client_text_larger_than_a_frame_is_spoken(make_server):
    """Text over the server's max_message_bytes, in a start or a fragment, is all spoken: the
    client cuts it into frames that fit, between characters (quotes and accented letters
    take more than a byte each). The server used to refuse such a frame with
    `message_too_large`, without the context's id, and the text was lost."""
    from rtserver_client.client import TTSClient
    from rtserver_client.protocol import Error

    srv = make_server("--max-message-bytes", "1024", "--max-text-chars", "20000", "--no-warmup")
    sentence = 'Le "café" est prêt, mon ami. '
    first, second = sentence * 40, sentence.upper() * 40  # ~1.3 KB each

    async def go():
        async with TTSClient(srv.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", text=first)
            await ctx.send(second)
            await ctx.close()
            return await ctx.collect()

    result = asyncio.run(go())
    assert not [e for e in result.events if isinstance(e, Error)], result.events
    spoken = " ".join(s.text for s in result.segments)
    assert spoken.split() == (first + second).split()
    srv.assert_idle()


def test_client_refused_upgrade_says_why(make_server):
    """A refused WebSocket upgrade says the server's reason (the response's body): a missing
    key and a wrong one read differently. It used to be websockets' bare "HTTP 403"; it is
    still a websockets.InvalidStatus."""
    import websockets
    from rtserver_client.client import TTSClient

    srv = make_server("--api-key", "right-key-123", "--no-warmup")

    async def refusal(key: str | None) -> websockets.InvalidStatus:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with TTSClient(srv.base_url, api_key=key) as client, client.connect():
                pass
        return refused.value

    missing, wrong = asyncio.run(refusal(None)), asyncio.run(refusal("wrong-key-123"))
    assert missing.response.status_code == wrong.response.status_code == 403
    assert "an API key is required" in str(missing), str(missing)
    assert "this API key is not valid here" in str(wrong), str(wrong)


def test_client_socket_closed_for_idling_is_closed(make_server):
    """Once the server says it closes an idle socket (`idle_timeout`), the connection is
    `closed` (a plugin then opens another), and a start on it raises the package's
    ServerError (`connection_closed`, with the server's reason). `closed` used to stay False
    until the close frame was read, and a start raised websockets' ConnectionClosedOK."""
    from rtserver_client.client import ServerError, TTSClient

    srv = make_server("--ws-idle-timeout-s", "1", "--no-warmup")

    async def go() -> tuple[str, bool, ServerError]:
        async with TTSClient(srv.base_url) as client, client.connect() as conn:
            said = (await asyncio.wait_for(conn.errors.get(), 10)).code
            closed = conn.closed  # at once, before the close frame is read
            await conn.ws.wait_closed()
            with pytest.raises(ServerError) as refused:
                await conn.start(spk_id="joe")
            return said, closed, refused.value

    said, closed, refused = asyncio.run(go())
    assert said == "idle_timeout" and closed
    assert refused.error.code == "connection_closed" and "idle_timeout" in str(refused)


def test_client_send_on_a_gone_socket_raises_server_error(server):
    """A context's send, flush or cancel after its socket is gone raises the package's
    ServerError (`connection_closed`, saying who closed it), as a start does; it raised
    websockets' own ConnectionClosedOK."""
    from rtserver_client.client import ServerError, TTSClient

    async def go() -> list[ServerError]:
        async with TTSClient(server.base_url) as client, client.connect() as conn:
            ctx = await conn.start(spk_id="joe", text="Hello")
            await conn.aclose()
            refused = []
            for call in (ctx.send("there."), ctx.flush(), ctx.cancel()):
                with pytest.raises(ServerError) as e:
                    await call
                refused.append(e.value)
            return refused

    for e in asyncio.run(go()):
        assert e.error.code == "connection_closed" and "client closed" in str(e)


def test_client_http_tts_says_the_pcm_rate(server):
    """`TTSClient.tts(fmt="pcm")` tells the rate of its PCM (the response's X-Sample-Rate),
    still iterated as before: it used to yield bare samples at a rate the caller had to
    guess. MP3 says its own rate in its frames."""
    from rtserver_client.client import TTSClient

    async def go() -> tuple[int | None, int | None, int, int]:
        async with TTSClient(server.base_url) as client:
            pcm = client.tts("Hello there.", "joe", fmt="pcm")
            audio = b"".join([piece async for piece in pcm])
            mp3 = client.tts("Hello there.", "joe")
            async for _ in mp3:
                break
            await mp3.aclose()
            async with client.connect() as conn:
                assert conn.ready is not None
                return pcm.sample_rate, mp3.sample_rate, conn.ready.sample_rate, len(audio)

    pcm_rate, mp3_rate, speaker_rate, size = asyncio.run(go())
    assert pcm_rate == speaker_rate and mp3_rate is None and size > pcm_rate  # over 0.5 s
    server.assert_idle()
