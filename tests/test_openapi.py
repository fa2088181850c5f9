"""The OpenAPI document is valid and complete, and its docs page works offline."""

from __future__ import annotations

import re

import httpx
from openapi_spec_validator import validate


def test_document_validates(server):
    doc = httpx.get(f"{server.base_url}/schema/openapi.json").json()
    validate(doc)  # raises with the first problem
    paths = doc["paths"]
    sft = paths["/inference_sft"]["get"]
    assert {p["name"] for p in sft["parameters"]} >= {"tts_text", "spk_id"}
    for path in ("/tts/pcm", "/inference_sft"):
        for method in paths[path].values():
            assert "audio/L16" in method["responses"]["200"]["content"], path
    # the routes that take a recording read their form by hand: documented all the same, so
    # the docs page can send one
    for path, field in [("/inference_zero_shot", "prompt_text"),
                        ("/inference_cross_lingual", "tts_text"),
                        ("/inference_instruct2", "instruct_text")]:  # fmt: skip
        form = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert {field, "prompt_wav", "seed", "speed"} <= set(form["properties"]), path
        assert {field, "prompt_wav"} <= set(form["required"]) and "seed" not in form["required"]
    speech = paths["/v1/audio/speech"]["post"]["responses"]["200"]["content"]
    assert {"audio/mpeg", "audio/wav", "text/event-stream"} <= set(speech)
    assert "application/json" not in speech


def test_speech_documents_what_each_format_sends(server):
    """/v1/audio/speech's pcm was documented as audio/pcm, without the rate headers it sends
    as audio/L16 (as /tts/pcm, documented so)."""
    doc = httpx.get(f"{server.base_url}/schema/openapi.json").json()
    ok = doc["paths"]["/v1/audio/speech"]["post"]["responses"]["200"]
    for fmt in ("mp3", "pcm", "wav", "opus", "aac", "flac", "mulaw", "alaw"):
        body = {"input": "Hi there.", "voice": "joe", "response_format": fmt}
        r = httpx.post(f"{server.base_url}/v1/audio/speech", json=body, timeout=60)
        assert r.status_code == 200 and r.content, (fmt, r.text)
        assert r.headers["content-type"].split(";")[0] in ok["content"], (fmt, r.headers)
        if "x-sample-rate" in r.headers:
            assert "X-Sample-Rate" in ok["headers"], fmt


def test_each_route_documents_the_errors_it_answers(server):
    """Every route listed the same errors: /v1/audio/speech 413 and 422 (OpenAI's routes
    answer 400), POST /speakers "unknown spk_id" and no 409, DELETE none of its own, a GET
    of one model text limits. And the forms /inference_sft reads had no body to send."""
    paths = httpx.get(f"{server.base_url}/schema/openapi.json").json()["paths"]

    def codes(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert {"400", "429", "503"} <= codes("/v1/audio/speech", "post")
    assert not {"413", "422"} & codes("/v1/audio/speech", "post")
    assert {"409", "403", "408"} <= codes("/speakers", "post") and "429" not in codes(
        "/speakers", "post"
    )
    assert "404" in codes("/speakers/{spk_id}", "delete")
    assert codes("/v1/models/{model_id}", "get") <= {"200", "404", "400"}
    assert "408" in codes("/inference_zero_shot", "post") and "408" not in codes("/tts", "post")
    form = paths["/inference_sft"]["post"]["requestBody"]
    assert not form["required"] and "application/x-www-form-urlencoded" in form["content"]
    assert {"tts_text", "spk_id"} <= set(
        form["content"]["multipart/form-data"]["schema"]["properties"]
    )


def test_docs_page_loads_its_assets_from_the_server(server):
    page = httpx.get(f"{server.base_url}/schema")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert refs and not [r for r in refs if "//" in r], refs  # nothing from another host
    for ref in refs:
        assert httpx.get(f"{server.base_url}{ref}").status_code == 200, ref
