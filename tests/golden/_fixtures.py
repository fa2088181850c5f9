"""Fixture loading shared by the per-family golden test modules (test_e2e_*, test_flow_*,
test_hift_*, test_token2wav_*): where a family's fixtures live, the skip-if-missing mark, the
one-thread mark and the npz / json loaders.

Imported as a plain module (``from _fixtures import ...``): tests/golden is not a package and
pytest puts it on ``sys.path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest


def golden_root() -> Path:
    """``$COSYVOICE_GOLDEN``, else ``<repo>/../shared/golden``."""
    env = os.environ.get("COSYVOICE_GOLDEN")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "golden"


def family_dir(name: str) -> Path:
    """The folder of one family's fixtures, e.g. ``family_dir("cosyvoice2")``."""
    return golden_root() / name


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip unless the fixture file ``path`` exists."""
    return pytest.mark.skipif(not path.is_file(), reason=f"no golden fixtures at {path.parent}")


# One intra-op thread for a module's tiny-model tests (see conftest.torch_single_thread).
ONE_THREAD = pytest.mark.usefixtures("torch_single_thread")


def load_arrays(path: Path) -> dict:
    """An npz file as a dict of numpy arrays."""
    return dict(np.load(path))


def load_tensors(path: Path) -> dict:
    """An npz file as a dict of torch tensors."""
    import torch

    return {k: torch.from_numpy(v) for k, v in np.load(path).items()}


def e2e_runs(d: Path, version: str) -> list[dict]:
    """The ``e2e_sft`` run list of ``<d>/fixtures_<version>.json`` ([] if the npz is missing)."""
    if not (d / "e2e_sft.npz").is_file():
        return []
    return json.loads((d / f"fixtures_{version}.json").read_text())["e2e_sft"]["runs"]
