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


def test_docs_page_loads_its_assets_from_the_server(server):
    page = httpx.get(f"{server.base_url}/schema")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    refs = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
    assert refs and not [r for r in refs if "//" in r], refs  # nothing from another host
    for ref in refs:
        assert httpx.get(f"{server.base_url}{ref}").status_code == 200, ref
