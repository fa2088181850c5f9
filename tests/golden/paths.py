"""Where the golden fixtures are, without pytest (bench/make_full_model.py uses it too, on a
bare GPU box): ``$COSYVOICE_GOLDEN``; else ``.golden`` in the checkout (git ignores it); else
a ``shared/golden`` folder beside the checkout. With none of them: ``.golden`` (the place
the skip messages name)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_golden_dir() -> Path:
    if env := os.environ.get("COSYVOICE_GOLDEN"):
        return Path(env).resolve()
    inside = REPO_ROOT / ".golden"
    beside = (REPO_ROOT.parent / "shared" / "golden").resolve()
    return beside if not inside.is_dir() and beside.is_dir() else inside
