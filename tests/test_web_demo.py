"""The web demo in a real browser: headless Debian Chromium against a real server.

Each test opens the page fresh and drives it the way a person would (click Speak, click Stop),
then reads what happened from `window.rtDemo`, the page's read-only test surface. Sample counts
come from the AudioWorklet itself (its message port), so "audio was played" means the playback
cursor really moved, not merely that frames arrived on the socket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from golden.conftest import resolve_golden_dir
from serverproc import eventually

pytestmark = pytest.mark.browser

from playwright import sync_api as playwright_api  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"

# ~6 s of speech: played to the end in the PCM test.
SHORT_TEXT = (
    "Streaming speech should start quickly and never stutter. "
    "This second sentence arrives while the first one is already playing."
)
# ~20 s of speech: long enough that the server is still busy whenever we press Stop.
LONG_TEXT = (
    "Streaming speech should start quickly and never stutter. "
    "This sentence arrives while the first one is already playing. "
    "The browser keeps one ring buffer and one playback cursor, so chunk seams are inaudible. "
    "If you press stop, the server cancels the work and the speakers go quiet at once. "
    "That is what a voice agent needs when a person interrupts it. "
    "And this last sentence is only here to make the text a little longer."
)


@contextmanager
def headless(chromium: str) -> Iterator:
    """The browser. Playwright's sync API runs an event loop in this thread while it is open:
    close it before anything here calls asyncio.run()."""
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator:
    with headless(chromium) as b:
        yield b


class Page:
    """A fresh tab on the demo, with its console errors collected."""

    def __init__(self, browser, base_url: str, path: str = "/") -> None:
        self.page = browser.new_page(viewport={"width": 900, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(f"{base_url}{path}")
        self.page.wait_for_function("window.rtDemo && rtDemo.state !== 'loading'", timeout=10_000)

    def demo(self, key: str):
        return self.page.evaluate(f"rtDemo.{key}")

    def wait(self, js: str, timeout_s: float = 15.0, what: str = "") -> None:
        try:
            self.page.wait_for_function(js, timeout=timeout_s * 1000, polling=50)
        except playwright_api.TimeoutError:
            snap = self.page.evaluate("rtDemo.snapshot()")
            pytest.fail(f"timed out waiting for {what or js}; rtDemo = {snap}")

    def shot(self, name: str) -> Path:
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser, server) -> Iterator[Page]:
    p = Page(browser, server.base_url)
    yield p
    p.page.close()


def test_page_loads_and_lists_speakers(page: Page, server) -> None:
    assert page.demo("lastError") is None
    options = page.page.eval_on_selector_all("#speaker option", "os => os.map(o => o.value)")
    expected = {s["id"] for s in server_speakers(server)}
    assert expected and set(options) == expected
    assert page.page.is_enabled("#speak")
    assert page.page.is_disabled("#stop")
    assert not page.page.is_visible("#instructions")  # the built-in voice takes none
    assert page.errors == []


def test_speak_plays_pcm_through_the_worklet(page: Page) -> None:
    page.page.fill("#text", SHORT_TEXT)
    page.page.click("#speak")
    page.wait("rtDemo.sampleRate > 0", what="`started`")
    rate = page.demo("sampleRate")
    # The worklet's cursor must really move: 2 s of samples consumed at playback speed.
    page.wait(f"rtDemo.samplesPlayed >= {2 * rate}", timeout_s=25, what="2 s played")
    assert page.demo("samplesReceived") >= page.demo("samplesPlayed")
    assert page.demo("ttfaMs") > 0
    assert page.demo("state") in ("speaking", "idle")
    page.shot("web_demo_speaking.png")

    page.wait("rtDemo.rtf !== null", what="`done`")
    rtf_text = page.page.text_content("#stat-rtf")
    assert rtf_text and rtf_text != "—"
    assert page.demo("segments") == 2
    # After `done`, the tail plays out and the page settles by itself, with every sample played.
    page.wait("rtDemo.state === 'idle'", timeout_s=30, what="play-out to finish")
    assert page.demo("samplesPlayed") == page.demo("samplesReceived")
    assert page.page.text_content("#stat-ttfa-server").startswith("server ")
    page.shot("web_demo_done.png")
    assert page.demo("lastError") is None
    assert page.errors == []


def test_stop_barges_in_and_the_server_cancels(page: Page, server) -> None:
    before = server.healthz()["cancelled"]
    # Agent mode types one word every 50-80 ms, so the server is certainly still busy with this
    # context when we stop: the cancel has real work to cancel.
    page.page.check("#agent")
    page.page.fill("#text", LONG_TEXT + " " + LONG_TEXT)
    page.page.click("#speak")
    page.wait("rtDemo.sampleRate > 0 && rtDemo.samplesPlayed > rtDemo.sampleRate / 2",
              what="audio to start playing")  # fmt: skip
    page.page.click("#stop")
    page.wait("rtDemo.state === 'idle'", timeout_s=5, what="the cancel to be confirmed")
    assert page.demo("cancelsSent") == 1
    assert page.demo("lastEvent") == "cancelled"
    assert "Stopped" in page.page.text_content("#status")

    # Playback ends: the ring buffer is empty and the cursor stops moving.
    time.sleep(0.3)
    played = page.demo("samplesPlayed")
    time.sleep(0.4)
    assert page.demo("samplesPlayed") == played
    assert page.demo("bufferedMs") == 0
    assert page.demo("rtf") is None  # a cancelled context never gets `done`

    health = server.wait_idle()
    assert health["cancelled"] > before
    assert health["active"] == 0
    assert page.errors == []


def test_unknown_speaker_is_shown_to_the_person(page: Page) -> None:
    # Inject a speaker the server does not have, as if the list were stale.
    page.page.evaluate(
        """() => {
            const sel = document.querySelector('#speaker');
            sel.append(new Option('nobody', 'nobody'));
            sel.value = 'nobody';
        }"""
    )
    page.page.click("#speak")
    page.wait("rtDemo.lastError !== null", timeout_s=10, what="the error")
    assert page.demo("lastError")["code"] == "unknown_speaker"
    assert page.page.is_visible("#error")
    assert "Unknown speaker" in page.page.text_content("#error")
    assert page.demo("state") == "idle"
    page.shot("web_demo_error.png")

    # The same mistake over HTTP (MP3 mode) is shown too, with the server's own message.
    page.page.check("input[name=mode][value=mp3]")
    page.page.click("#speak")
    page.wait("rtDemo.lastError && rtDemo.lastError.code === 'bad_request'", timeout_s=10,
              what="the HTTP 400")  # fmt: skip
    assert "HTTP 400" in page.page.text_content("#error")


@pytest.mark.parametrize("query, transport", [("", "mse"), ("?nomse", "blob")])
def test_mp3_mode_plays_through_the_audio_element(browser, server, query, transport) -> None:
    # Chromium streams into MediaSource; `?nomse` forces the whole-file fallback that browsers
    # without MP3 MediaSource (Firefox, iOS < 17.1) get.
    page = Page(browser, server.base_url, f"/{query}")
    page.page.check("input[name=mode][value=mp3]")
    page.page.fill("#text", SHORT_TEXT)
    page.page.click("#speak")
    page.wait("document.querySelector('#player').currentTime > 0.5", timeout_s=20,
              what="<audio> to play")  # fmt: skip
    assert page.demo("mp3Transport") == transport
    assert page.demo("mp3Bytes") > 0
    assert page.demo("state") == "speaking"
    page.page.click("#stop")
    page.wait("rtDemo.state === 'idle'", timeout_s=5, what="Stop in MP3 mode")
    assert page.page.evaluate("document.querySelector('#player').paused")
    assert page.demo("lastError") is None
    assert page.errors == []
    page.page.close()


# Feeds a 440 Hz sine through pcm-worklet.js in an OfflineAudioContext, cut into odd-sized
# chunks, and compares what comes out with the ideal sine at the context's rate.
WORKLET_PROBE = """
async ([ctxRate, inRate, chunk]) => {
  const freq = 440, amp = 16000, n = Math.round(inRate * 0.5);
  const ctx = new OfflineAudioContext(1, Math.round(ctxRate * 0.75), ctxRate);
  await ctx.audioWorklet.addModule("/demo/pcm-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm-player",
    {numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1]});
  node.connect(ctx.destination);
  node.port.postMessage({type: "begin", id: 1, inRate, prebufferMs: 20});
  for (let i = 0; i < n; i += chunk) {
    const m = Math.min(chunk, n - i);
    const buf = new ArrayBuffer(4 + 2 * m);  // same layout as a /ws/tts frame
    const pcm = new Int16Array(buf, 4, m);
    for (let k = 0; k < m; k++) pcm[k] = Math.round(amp * Math.sin(2 * Math.PI * freq * (i + k) / inRate));
    node.port.postMessage({type: "pcm", id: 1, buf, offset: 4, length: m}, [buf]);
  }
  node.port.postMessage({type: "end", id: 1});
  await new Promise((r) => setTimeout(r, 100));  // let the port deliver before rendering starts
  const out = (await ctx.startRendering()).getChannelData(0);
  // sin(0) = 0, so playback began one frame before the first non-zero sample.
  const start = out.findIndex((v) => v !== 0) - 1;
  let end = out.length - 1;
  while (end > 0 && out[end] === 0) end--;
  // The last input sample has no successor to interpolate towards: skip the held tail.
  const stop = end - Math.ceil(ctxRate / inRate);
  let maxErr = 0;
  for (let j = start; j <= stop; j++) {
    const ideal = (amp / 32768) * Math.sin(2 * Math.PI * freq * (j - start) / ctxRate);
    maxErr = Math.max(maxErr, Math.abs(out[j] - ideal));
  }
  return {frames: end - start + 1, expected: n * ctxRate / inRate, maxErr};
}
"""


@pytest.mark.parametrize(
    "ctx_rate, in_rate, chunk, tolerance",
    [
        (22050, 22050, 137, 1e-4),  # 1:1: chunk seams must be bit-exact, i.e. inaudible
        (48000, 22050, 333, 3e-3),  # the server could not give the context's rate: upsample
        (16000, 24000, 100, 3e-3),  # ...or downsample
    ],
)
def test_worklet_plays_chunks_as_one_continuous_signal(
    page: Page, ctx_rate: int, in_rate: int, chunk: int, tolerance: float
) -> None:
    r = page.page.evaluate(WORKLET_PROBE, [ctx_rate, in_rate, chunk])
    assert abs(r["frames"] - r["expected"]) <= 2, r
    assert r["maxErr"] < tolerance, r


def test_busy_server_and_closed_socket_are_shown(browser, make_server) -> None:
    srv = make_server("--max-streams", "1", "--max-queue", "0")
    first, second = Page(browser, srv.base_url), Page(browser, srv.base_url)
    try:
        # The first tab takes the only synthesis slot (agent mode keeps it open while it types,
        # about 9 s here: past the busy check and the screenshot on a slow machine too)...
        first.page.check("#agent")
        first.page.fill("#text", LONG_TEXT + " " + LONG_TEXT)
        first.page.click("#speak")
        first.wait("rtDemo.samplesPlayed > 0", what="the first tab to play")

        # ...so the second is refused, and says so.
        second.page.click("#speak")
        second.wait("rtDemo.lastError !== null", timeout_s=10, what="the busy error")
        assert second.demo("lastError")["code"] == "busy"
        assert "Server busy" in second.page.text_content("#error")
        assert second.demo("state") == "idle"
        second.shot("web_demo_busy.png")

        # Speaking again while speaking is a barge-in too. With a single slot, the new context
        # only fits if the page waits for the server's `cancelled` before its `start`.
        first.page.click("#speak")
        first.wait("rtDemo.utterances === 2 && rtDemo.samplesPlayed > 0", what="the re-spoken text")
        assert first.demo("cancelsSent") == 1
        assert first.demo("lastError") is None

        # The server goes away mid-stream: the first tab tells the person.
        srv.stop()
        first.wait("rtDemo.lastError !== null", timeout_s=20, what="the closed-socket error")
        assert first.demo("lastError")["code"] == "socket_closed"
        assert "Connection closed" in first.page.text_content("#error")
        assert first.page.text_content("#conn") == "disconnected"
        first.wait("rtDemo.state === 'idle'", timeout_s=30, what="play-out after the close")
    finally:
        first.page.close()
        second.page.close()


@pytest.mark.parametrize(
    "limits, text, says",
    [
        ((), "Here is the first sentence of a turn. Then a bell\x07 rings.", "Text rejected"),
        (("--max-text-chars", "60"), SHORT_TEXT, "Text too long"),
    ],
)
def test_a_dropped_fragment_cancels_its_context(browser, make_server, limits, text, says) -> None:
    """Agent mode sends a word the server drops (a control character: `invalid_text`; the
    same for `text_too_long`). The page shows the error and ends the utterance; the server
    keeps such a context open, so the page cancels it. It did not: the context, never closed,
    went on speaking unheard and held the only synthesis slot until its idle timeout (30 s),
    and the next Speak was refused as busy."""
    srv = make_server("--max-streams", "1", "--max-queue", "0", *limits)
    page = Page(browser, srv.base_url)
    try:
        page.page.check("#agent")
        page.page.fill("#text", text)
        page.page.click("#speak")
        page.wait("rtDemo.lastError !== null", what=f"the error ({says})")
        assert says in page.page.text_content("#error") and page.demo("state") == "idle"
        health = eventually(srv.healthz, lambda h: h["streams_open"] == 0, timeout=5)
        assert health["streams_open"] == health["active"] == 0, health

        page.page.uncheck("#agent")
        page.page.fill("#text", "The next turn.")
        page.page.click("#speak")
        page.wait("rtDemo.utterances === 2 && rtDemo.samplesPlayed > 0", what="the next turn")
        assert page.demo("errorCount") == 1 and not page.page.is_visible("#error")
        assert page.errors == []
    finally:
        page.page.close()


def test_text_past_the_servers_limit_is_refused_before_it_is_sent(browser, make_server) -> None:
    """The page knew no limit: it sent its own pieces, and the server's refusal of the one
    that crossed it named that piece's size ("text has 16321 characters"), not the text's."""
    srv = make_server("--max-text-chars", "60")
    page = Page(browser, srv.base_url)
    try:
        text = SHORT_TEXT + " Und noch ein Satz, über alles."
        page.page.fill("#text", text)
        page.page.click("#speak")
        page.wait("rtDemo.lastError !== null", what="the error")
        said = page.page.text_content("#error")
        assert "Text too long" in said and f"has {len(text)} characters" in said, said
        assert "at most 60 at a time" in said and page.demo("state") == "idle", said
        assert srv.healthz()["completed"] == srv.healthz()["rejected"] == 0
        # Text with nothing to speak ends at once: said so, not "Done. 0.0 s of audio."
        page.page.fill("#text", "...!!! ,,,")
        page.page.click("#speak")
        page.wait("rtDemo.utterances === 2 && rtDemo.state === 'idle'", what="the second")
        assert "nothing to speak" in page.page.text_content("#status")
        assert page.errors == []
    finally:
        page.page.close()


def server_speakers(server) -> list[dict]:
    import httpx

    return httpx.get(f"{server.base_url}/speakers", timeout=10).json()


def test_instructions_are_offered_where_the_model_takes_them_and_sent(
    browser, make_server, tmp_path
):
    """On CosyVoice2 (the tiny golden dir) the page offers an instructions field and sends
    what is typed there with the WebSocket `start` and with the MP3 request."""
    model = resolve_golden_dir() / "cosyvoice2" / "model"
    if not model.is_dir():
        pytest.skip(f"no golden model dir at {model}")
    srv = make_server("--model", str(model), "--speaker-dir", str(tmp_path), "--no-warmup")
    page = Page(browser, srv.base_url)
    frames: list[str] = []
    page.page.on("websocket", lambda ws: ws.on("framesent", lambda f: frames.append(f)))
    bodies: list[dict] = []
    page.page.on("request", lambda r: r.url.endswith("/tts") and bodies.append(r.post_data_json))
    assert page.page.is_visible("#instructions")
    page.page.fill("#text", "你好，今天天气很好。")
    page.page.fill("#instructions", "用四川话说这句话")
    page.page.click("#speak")
    page.wait("rtDemo.state === 'idle' && rtDemo.samplesPlayed > 0", timeout_s=60,
              what="PCM played")  # fmt: skip
    starts = [json.loads(f) for f in frames if isinstance(f, str) and '"start"' in f]
    assert [m.get("instructions") for m in starts] == ["用四川话说这句话"], frames
    page.page.check("input[name=mode][value=mp3]")
    page.page.click("#speak")
    page.wait("rtDemo.utterances === 2 && rtDemo.mp3Bytes > 0", timeout_s=60, what="MP3 bytes")
    assert [b.get("instructions") for b in bodies] == ["用四川话说这句话"], bodies
    page.page.click("#stop")
    page.wait("rtDemo.state === 'idle'", timeout_s=10, what="Stop")
    assert page.demo("lastError") is None and page.errors == []
    page.page.close()
    srv.assert_idle()
