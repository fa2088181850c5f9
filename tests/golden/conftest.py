"""Golden-fixture folder resolution and shared helpers for tests/golden.

The folder: see ``golden/paths.py`` (``$COSYVOICE_GOLDEN``, else ``.golden`` in the checkout).
Tests discover fixtures from the folder's contents, so any folder of the same format can be
checked: ``COSYVOICE_GOLDEN=DIR pytest tests/golden``.

* fixture ``golden_dir`` -> Path (skips if the folder is missing);
* parameter ``family_dir``: every ``<golden>/<name>/`` holding a ``model/`` dir with a CosyVoice
  yaml. A test marked ``@pytest.mark.unsupported_families("v1", reason=...)`` gets those
  families as ``xfail(strict=True)`` params, so an unimplemented family never silently passes;
* fixture ``family``: the family name of a module-scoped indirect parametrisation over the
  fixed family folders (``_fixtures.family_params``), as test_flow / test_hift / test_token2wav
  / test_e2e use;
* ``config.cosyvoice_golden`` holds the resolved Path for module-level parametrisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from golden.paths import REPO_ROOT, resolve_golden_dir  # noqa: F401  (the tests import them here)


def family_dirs(golden: Path) -> list[Path]:
    if not golden.is_dir():
        return []
    out = []
    for d in sorted(golden.iterdir()):
        m = d / "model"
        if m.is_dir() and any(
            (m / n).is_file() for n in ("cosyvoice.yaml", "cosyvoice2.yaml", "cosyvoice3.yaml")
        ):
            out.append(d)
    return out


def family_of(family_dir: Path) -> str:
    from cosyvoice.config import detect_family

    return detect_family(family_dir / "model")[0]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "unsupported_families(*families, reason): strict-xfail those golden families"
    )
    config.cosyvoice_golden = resolve_golden_dir()
    if os.environ.get("COSYVOICE_TEST_DEVICE", "cpu").startswith("cuda"):
        import torch

        # parity on CUDA (bench/bench_gpu.py) means float32 math: no TF32 convolutions/matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "family_dir" not in metafunc.fixturenames:
        return
    golden = metafunc.config.cosyvoice_golden
    mark = metafunc.definition.get_closest_marker("unsupported_families")
    unsupported = set(mark.args) if mark else set()
    reason = mark.kwargs.get("reason", "family not implemented") if mark else ""
    params = []
    for d in family_dirs(golden):
        marks = []
        if family_of(d) in unsupported:
            marks = [pytest.mark.xfail(strict=True, reason=reason)]
        params.append(pytest.param(d, id=d.name, marks=marks))
    if not params:
        params = [
            pytest.param(None, marks=pytest.mark.skip(reason=f"no golden model dirs in {golden}"))
        ]
    metafunc.parametrize("family_dir", params)


@pytest.fixture(scope="module")
def family(request: pytest.FixtureRequest) -> str:
    """The family ("v1", "v2", "v3") of a module-scoped indirect parametrisation
    (``_fixtures.family_params``): module-scoped model fixtures load once per family."""
    return request.param


@pytest.fixture(scope="session")
def golden_dir(pytestconfig: pytest.Config) -> Path:
    p = pytestconfig.cosyvoice_golden
    if not p.is_dir():
        pytest.skip(f"golden folder {p} not found (put it at .golden/ or set COSYVOICE_GOLDEN)")
    return p


def assert_close(got, expected, atol: float, rtol: float = 0.0, what: str = "") -> float:
    """Compare as float64 numpy arrays (shape included); returns the max abs error."""
    import numpy as np

    g = np.asarray(got, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != {e.shape}"
    err = float(np.abs(g - e).max()) if g.size else 0.0
    np.testing.assert_allclose(g, e, atol=atol, rtol=rtol, err_msg=what)
    return err


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model tests on one torch thread.

    On the shared 2-core machine, 2 OpenMP threads under contention make microsecond-sized ops
    wait on thread barriers (measured 6-15x slower). Use via
    ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
