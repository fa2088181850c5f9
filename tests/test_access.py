"""API keys, the admin key, origins and hosts, against a real server with real clients
(httpx, `websockets`, and the web demo in headless Chromium)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
import websockets
from audio_check import assert_speech, decode_mp3, decode_pcm
from serverproc import ServerProcess
from test_cli import rtserver

KEY, ADMIN = "user-key-0123456789", "admin-key-0123456789"
BODY = {"tts_text": "Only with a key.", "spk_id": "joe"}


@pytest.fixture(scope="module")
def locked():
    srv = ServerProcess(
        "--api-key", KEY, "--admin-key", ADMIN, "--allow-host", "127.0.0.1", "--no-warmup"
    ).wait_ready()
    yield srv
    srv.stop()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong-key-0123456789"), {"authorization": KEY}])
def test_http_without_the_key_is_401(locked, headers):
    for method, path, kw in [
        ("POST", "/tts/pcm", {"json": BODY}),
        ("POST", "/v1/audio/speech", {"json": {"input": "Hi there.", "voice": "joe"}}),
        ("GET", "/inference_sft", {"params": BODY}),
        ("GET", "/speakers", {}),
        ("GET", "/schema/openapi.json", {}),
    ]:
        r = httpx.request(method, f"{locked.base_url}{path}", headers=headers, **kw)
        assert r.status_code == 401, (path, r.status_code)
        if path.startswith("/v1/"):  # OpenAI's shape, as its SDKs read it
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and "key" in err["message"]
        else:
            assert r.json()["status_code"] == 401 and "key" in r.json()["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_the_openai_sdk_shows_why_its_key_was_refused(locked):
    import openai

    client = openai.OpenAI(base_url=f"{locked.base_url}/v1", api_key="wrong-0123456789",
                           max_retries=0)  # fmt: skip
    with pytest.raises(openai.AuthenticationError, match="not valid"):
        client.audio.speech.create(model="tts-1", voice="joe", input="Hello.")
    client = openai.OpenAI(base_url=f"{locked.base_url}/v1", api_key=KEY, max_retries=0)
    audio = client.audio.speech.create(model="tts-1", voice="joe", input="Hello there.")
    assert_speech(*decode_mp3(audio.content), min_seconds=0.3)


def test_a_wrong_key_is_told_apart_from_none(locked):
    for headers, says in [({}, "is required"), (bearer("wrong-key-0123456789"), "not valid")]:
        r = httpx.get(f"{locked.base_url}/speakers", headers=headers)
        assert r.status_code == 401 and says in r.json()["detail"]


def test_http_with_the_key_works_and_probes_stay_open(locked):
    r = httpx.post(f"{locked.base_url}/tts/pcm", json=BODY, headers=bearer(KEY), timeout=60)
    assert r.status_code == 200
    assert_speech(decode_pcm(r.content), 22050, min_seconds=0.5)
    assert httpx.get(f"{locked.base_url}/healthz").status_code == 200
    assert httpx.get(f"{locked.base_url}/").status_code == 200  # the page itself holds nothing
    locked.assert_idle()


def test_speakers_need_the_admin_key(locked):
    url = f"{locked.base_url}/speakers/joe"
    assert httpx.delete(url).status_code == 401
    assert httpx.delete(url, headers=bearer(KEY)).status_code == 403
    # the path as the router matches it: repeated, trailing or encoded slashes change nothing
    for path in ("//speakers/joe", "/speakers//joe/", "/%2Fspeakers/joe"):
        r = httpx.delete(locked.base_url + path, headers=bearer(KEY))
        assert r.status_code == 403, (path, r.status_code, r.text)
    form = {"spk_id": "x", "prompt_text": "Hello."}
    for path in ("//speakers", "/speakers/"):
        r = httpx.post(locked.base_url + path, headers=bearer(KEY), data=form)
        assert r.status_code == 403, (path, r.status_code, r.text)
    # Past access control: the built-in voice has no registered speakers to delete.
    assert httpx.delete(url, headers=bearer(ADMIN)).status_code == 400


def say(srv: ServerProcess, out: Path, *args: str) -> subprocess.CompletedProcess:
    return rtserver("say", "Spoken with a key.", "--url", srv.base_url, "-o", str(out), *args,
                    env={"RTSERVER_API_KEY": ""})  # fmt: skip


@pytest.mark.parametrize("route", [(), ("--ws",)])
def test_say_sends_its_key(locked, tmp_path, route):
    refused = say(locked, tmp_path / "no.mp3", *route)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "40" in lines[0], refused.stderr
    assert "--api-key" in lines[0], lines[0]  # how to give it
    ok = say(locked, tmp_path / "ok.mp3", "--api-key", KEY, *route)
    assert ok.returncode == 0, ok.stderr
    assert_speech(*decode_mp3((tmp_path / "ok.mp3").read_bytes()), min_seconds=0.5)
    locked.assert_idle()


def test_without_the_key_no_path_or_method_is_told(locked):
    """Keys are checked before routing: without one, a path that is not served or a method a
    route does not take gets the 401 every route gives, so a scanner learns nothing; with one,
    404 and 405 (an OPTIONS, Litestar's answer). Each is counted in /metrics and carries a
    request id."""
    unknown = [("GET", "/no-such-route"), ("PUT", "/tts"), ("DELETE", "/inference_sft"),
               ("GET", "/schema/nothing"), ("OPTIONS", "/tts")]  # fmt: skip
    for method, path in unknown:
        r = httpx.request(method, locked.base_url + path)
        assert r.status_code == 401 and "key" in r.json()["detail"], (method, path, r.text)
        assert r.headers["x-request-id"]
    keyed = [httpx.request(m, locked.base_url + p, headers=bearer(KEY)) for m, p in unknown]
    assert [r.status_code for r in keyed] == [404, 405, 405, 404, 204], [r.text for r in keyed]
    metrics = httpx.get(f"{locked.base_url}/metrics", headers=bearer(KEY)).text
    for status in ("401", "404", "405"):
        assert f'route="unmatched",status="{status}"' in metrics, metrics


def test_the_document_says_routes_take_the_key(locked):
    """With keys, the OpenAPI document declares the bearer scheme, so the docs page offers
    to send one (it had none: every "Try it out" got 401)."""
    assert httpx.get(f"{locked.base_url}/schema/openapi.json").status_code == 401
    doc = httpx.get(f"{locked.base_url}/schema/openapi.json", headers=bearer(KEY)).json()
    ((name, scheme),) = doc["components"]["securitySchemes"].items()
    assert scheme["scheme"] == "bearer" and doc["security"] == [{name: []}], doc["security"]
    for probe in ("/healthz", "/readyz"):  # no key
        assert doc["paths"][probe]["get"]["security"] == [{}], doc["paths"][probe]


def test_a_foreign_host_is_refused_but_the_probes_answer_any(locked):
    """The probes answer whatever the Host: a kubelet or load balancer names the pod by its
    address (with --allow-host, every probe got 400 and the pod never became ready)."""
    for path in ("/speakers", "/no-such-route", "/"):
        r = httpx.get(locked.base_url + path, headers={**bearer(KEY), "host": "evil.example"})
        assert r.status_code == 400 and "host" in r.json()["detail"], path
    for path in ("/healthz", "/readyz"):
        r = httpx.get(locked.base_url + path, headers={"host": "10.1.2.3:8000"})
        assert r.status_code == 200, (path, r.text)


async def ws_outcome(srv: ServerProcess, **kw) -> str:
    try:
        async with websockets.connect(f"{srv.ws_url}/ws/tts", compression=None, **kw) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            return f"ready {ws.subprotocol}"
    except websockets.InvalidStatus as exc:
        return f"refused {exc.response.status_code}"


def test_websocket_needs_the_key_and_a_allowed_origin(locked):
    def outcome(**kw) -> str:
        return asyncio.run(ws_outcome(locked, **kw))

    token = ["rtserver", f"rtserver.key.{KEY}"]
    own = f"http://127.0.0.1:{locked.port}"
    assert outcome() == "refused 403"
    assert outcome(subprotocols=["rtserver", "rtserver.key.nope-0123456789"]) == "refused 403"
    assert outcome(additional_headers=bearer(KEY)) == "ready None"
    assert outcome(subprotocols=token, origin=own) == "ready rtserver"
    assert outcome(subprotocols=token, origin="http://evil.example") == "refused 403"
    locked.assert_idle()


def test_a_refused_upgrade_says_why_and_carries_its_request_id(locked):
    """A refused WebSocket upgrade was a bare 403: a bad key could not be told from a refused
    origin, and no request id tied it to the server's log."""

    async def refusal(**kw) -> tuple[str, str]:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"{locked.ws_url}/ws/tts", **kw):
                pass
        response = info.value.response
        assert response.status_code == 403
        return json.loads(response.body)["detail"], response.headers.get("x-request-id", "")

    detail, rid = asyncio.run(refusal())
    assert "API key" in detail and rid, (detail, rid)
    detail, rid = asyncio.run(refusal(additional_headers=bearer(KEY), origin="http://evil.example"))
    assert "origin" in detail and rid, (detail, rid)
    locked.wait_log(rid, timeout=5)


def test_cors_follows_the_origin_list(make_server):
    srv = make_server("--api-key", KEY, "--allow-origin", "http://app.example", "--no-warmup")
    pre = {"access-control-request-method": "POST",
           "access-control-request-headers": "authorization,content-type,x-request-id"}  # fmt: skip
    ok = httpx.options(f"{srv.base_url}/tts", headers={"origin": "http://app.example", **pre})
    assert ok.status_code == 204, ok.text
    assert ok.headers.get("access-control-allow-origin") == "http://app.example"
    assert "authorization" in ok.headers.get("access-control-allow-headers", "").lower()
    other = httpx.options(f"{srv.base_url}/tts", headers={"origin": "http://evil.example", **pre})
    assert other.status_code == 400 and "Origin" in other.text
    assert other.headers.get("access-control-allow-origin") is None
    ws = asyncio.run(ws_outcome(srv, additional_headers=bearer(KEY), origin="http://app.example"))
    assert ws == "ready None"


@pytest.mark.browser
def test_web_demo_asks_for_the_key_then_speaks(locked, chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"],
        )  # fmt: skip
        page = browser.new_page()
        page.goto(f"{locked.base_url}/")
        page.wait_for_selector("#auth:not([hidden])", timeout=10_000)
        assert "needs an API key" in page.text_content("#status")
        page.fill("#key", KEY)
        page.click("#auth button")
        page.wait_for_function("rtDemo.speakersLoaded === true", timeout=10_000)
        page.fill("#text", "A key opened this door.")
        page.click("#speak")
        page.wait_for_function("rtDemo.samplesPlayed > 0", timeout=20_000)
        # The key travels as a subprotocol: the URL and the server's log never carry it.
        assert KEY not in page.url
        browser.close()
    assert KEY not in locked.log()


def test_cors_allows_the_headers_clients_send_and_exposes_what_they_read(server):
    # What the OpenAI JS SDK sends from a browser, and a request id the server keeps.
    sent = ["content-type", "authorization", "x-request-id", "x-stainless-os",
            "x-stainless-retry-count"]  # fmt: skip
    pre = {"origin": "https://app.example", "access-control-request-method": "POST",
           "access-control-request-headers": ",".join(sent)}  # fmt: skip
    r = httpx.options(f"{server.base_url}/v1/audio/speech", headers=pre)
    assert r.status_code == 204, r.text
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert set(sent) <= allowed
    r = httpx.get(f"{server.base_url}/v1/audio/voices", headers={"origin": "https://app.example"})
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    readable = {"x-request-id", "x-sample-rate", "x-channels", "x-bit-depth", "retry-after"}
    assert readable <= exposed


# GET routes, and what GET answers on a path that is not one (HEAD must answer the same).
HEAD_LIKE_GET = ["/", "/healthz", "/readyz", "/speakers", "/metrics", "/schema",
                 "/schema/openapi.json", "/v1/audio/voices", "/demo/index.html",
                 "/docs-assets/swagger-ui.css", "/no-such-route", "/tts"]  # fmt: skip


def test_head_answers_as_get_without_a_body(server):
    for path in HEAD_LIKE_GET:
        get, head = httpx.get(server.base_url + path), httpx.head(server.base_url + path)
        assert head.status_code == get.status_code, (path, head.status_code, get.status_code)
        assert head.content == b"", path
        assert set(head.headers) == set(get.headers), path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert httpx.head(f"{server.base_url}/healthz").status_code == 200


def test_head_then_get_on_one_connection(server):
    """A HEAD's response carries no body on the wire, so a keep-alive connection stays in step:
    each GET after a HEAD on it is answered, and the server logs no broken response."""
    with httpx.Client(base_url=server.base_url) as c:
        for path in ("/healthz", "/speakers", "/metrics", "/", "/no-such-route"):
            head, get = c.head(path), c.get(path)
            assert head.status_code == get.status_code and head.content == b"", path
    log = server.log_path.read_text(errors="replace")
    assert "Content-Length" not in log and "Traceback" not in log, log[-2000:]


def test_head_on_the_audio_get_route_starts_no_synthesis(server):
    before = server.wait_idle()
    r = httpx.head(f"{server.base_url}/inference_sft", params=BODY)
    assert r.status_code == 405 and {"GET", "POST"} <= set(r.headers["allow"].split(", "))
    after = server.healthz()
    counters = ("active", "queued", "completed", "cancelled", "failed", "rejected", "steps")
    assert {k: after[k] for k in counters} == {k: before[k] for k in counters}


@pytest.mark.parametrize(
    "path",
    [
        "/demo/%00", "/docs-assets/%00",  # a NUL byte: no file name can hold one
        "/demo/" + "a" * 256, "/docs-assets/" + "a" * 256,  # a name over the 255-byte limit
        "/demo/" + "a/" * 3000,  # a path over the 4096-byte limit
        "/demo/index.html/x",  # a file taken for a folder
        "/demo/%FF%FE",  # not UTF-8
    ],
)  # fmt: skip
def test_a_path_no_static_file_can_have_is_404(server, path):
    rid = f"static-{zlib.crc32(path.encode()):08x}"  # to find this request's log lines
    for method in ("GET", "HEAD"):
        r = httpx.request(method, server.base_url + path, headers={"x-request-id": rid})
        assert r.status_code == 404, (method, r.status_code, r.text[:200])
    logged = [line for line in server.log_path.read_bytes().splitlines() if rid.encode() in line]
    assert logged and not any(b"ERROR" in line or b"\x00" in line for line in logged), logged
