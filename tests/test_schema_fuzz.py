"""A bounded schemathesis run against a real server: cases generated from our own OpenAPI
document, with speaker ids that exist (so synthesis really runs), must never get a 5xx and
must answer as the document says."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from serverproc import ServerProcess

SPEAKER_FIELDS = ("spk_id", "voice")
# Text can be schema-valid and still refused (nothing speakable, a control character): a 422
# the document's schema cannot express. Every other check, 5xx and conformance, stays on.
ACCEPTANCE = checks.positive_data_acceptance


@pytest.fixture(scope="module")
def fuzz_server():
    # A small text cap keeps each generated case cheap; no per-client cap (one client).
    srv = ServerProcess(
        "--max-text-chars", "60", "--max-client-streams", "0",
        "--max-streams", "4", "--max-queue", "64", "--no-warmup",
    ).wait_ready()  # fmt: skip
    yield srv
    srv.stop()


def with_real_speakers(doc: dict, speakers: list[str]) -> dict:
    """Speaker ids are free strings in the document; draw them from the real ones so cases
    get past the speaker check and synthesis really runs."""
    for schema in doc.get("components", {}).get("schemas", {}).values():
        for name in SPEAKER_FIELDS:
            if name in schema.get("properties", {}):
                schema["properties"][name] = {"type": "string", "enum": speakers}
    return doc


def operations(srv: ServerProcess) -> list:
    doc = httpx.get(f"{srv.base_url}/schema/openapi.json").json()
    speakers = [s["id"] for s in httpx.get(f"{srv.base_url}/speakers").json()]
    schema = schemathesis.openapi.from_dict(with_real_speakers(doc, speakers))
    return [result.ok() for result in schema.get_all_operations()]


# Schemathesis's own pytest plugin does not load under this pytest; Hypothesis drives it here.
@pytest.mark.slow
def test_no_server_errors_and_answers_match_the_schema(fuzz_server):
    ops = operations(fuzz_server)
    assert {op.label for op in ops} >= {"POST /tts", "POST /tts/pcm", "POST /v1/audio/speech"}
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            case.call_and_validate(
                base_url=fuzz_server.base_url, timeout=60, excluded_checks=[ACCEPTANCE]
            )

        check()
    fuzz_server.assert_idle(timeout=30)
