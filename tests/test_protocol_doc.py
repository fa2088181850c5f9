"""docs/websocket.md carries the JSON Schema of the msgspec wire types: keep it current."""

import json
import re
from pathlib import Path

from rtserver.protocol import ERROR_CODES, json_schema

DOC = Path(__file__).resolve().parent.parent / "docs" / "websocket.md"


def test_schema_in_docs_matches_code():
    text = DOC.read_text()
    block = re.search(r"## JSON Schema.*?```json\n(.*?)```", text, re.S)
    assert block, "docs/websocket.md has no JSON Schema block"
    assert json.loads(block.group(1)) == json.loads(json.dumps(json_schema()))


def test_every_error_code_is_documented():
    text = DOC.read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in text
