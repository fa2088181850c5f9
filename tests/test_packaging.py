"""The wheel is a working install: it carries the web demo (GET / serves it from the package),
and the quickstart's server runs on the dependencies the project declares."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import httpx
from audio_check import assert_speech, decode_mp3
from serverproc import ROOT, ServerProcess


def test_wheel_includes_the_web_demo(tmp_path):
    uv = shutil.which("uv")
    assert uv, "the tests run under uv (README quickstart)"
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("rtserver-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("index.html", "app.js", "pcm-worklet.js", "style.css"):
        assert f"rtserver/web_demo/{part}" in names
    assert "rtserver/app.py" in names and "cosyvoice/__init__.py" in names


def locked_closure(extras: list[str]) -> set[str]:
    """The distributions uv.lock installs for the project's dependencies and `extras` (markers
    ignored: a superset on any one platform), without the dev group or other extras."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    by_name: dict[str, list[dict]] = {}
    for package in lock["package"]:
        by_name.setdefault(package["name"], []).append(package)
    (project,) = by_name["rtserver"]
    todo = [*project["dependencies"]]
    todo += [d for e in extras for d in project["optional-dependencies"][e]]
    seen: set[tuple[str, str | None]] = set()
    while todo:
        dep = todo.pop()
        for extra in [None, *dep.get("extra", [])]:
            if (dep["name"], extra) in seen:
                continue
            seen.add((dep["name"], extra))
            for package in by_name[dep["name"]]:
                key = "dependencies" if extra is None else "optional-dependencies"
                found = package.get(key, [])
                todo += found if extra is None else found.get(extra, [])
    return {"rtserver", *(name for name, _ in seen)}


def guarded_env() -> dict[str, str]:
    """Environment for a Python that refuses modules outside the dependencies and the voice
    extra (tests/import_guard/sitecustomize.py)."""
    return {
        "PYTHONPATH": str(ROOT / "tests" / "import_guard"),
        "RTSERVER_ALLOWED_DISTS": json.dumps(sorted(locked_closure(["voice"]))),
    }


def test_the_quickstart_server_needs_only_declared_dependencies(tmp_path):
    """`uv run --extra voice rtserver serve` on a fresh machine installs the project's
    dependencies, the voice extra and the dev group; the test environment has the cluster
    extra too, which once hid a module the server imports (httptools, pulled in only by Ray).
    The server runs here with every module outside the dependencies and the voice extra
    refused on import, and speaks."""
    srv = ServerProcess(env=guarded_env(), log_path=tmp_path / "server.log")
    try:
        srv.wait_ready()
        body = {"tts_text": "Installed from the lock file.", "spk_id": "joe"}
        r = httpx.post(f"{srv.base_url}/tts", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert_speech(*decode_mp3(r.content), min_seconds=1.0)
        assert "ModuleNotFoundError" not in srv.log()
    finally:
        srv.stop()


def test_the_built_in_voice_without_its_extra_is_one_line_naming_it():
    """`uv run rtserver serve` without `--extra voice`: the server says which extra to add,
    before binding or loading, instead of a traceback from its startup."""
    env = {**os.environ, **guarded_env(),
           "RTSERVER_ALLOWED_DISTS": json.dumps(sorted(locked_closure([])))}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "rtserver", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert done.returncode != 0
    assert "--extra voice" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_every_module_imports_on_the_declared_dependencies():
    """Each module of the server and the model package imports under the same guard, those
    of routes and engines the quickstart test does not reach too; only rtserver.cluster needs
    the cluster extra."""
    code = (
        "import importlib, pkgutil, cosyvoice, rtserver\n"
        "for pkg in (rtserver, cosyvoice):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if m.name != 'rtserver.cluster' and not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
    )
    env = {**os.environ, **guarded_env()}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_without_the_golden_fixtures_the_skips_are_a_few_lines(tmp_path):
    """A fresh clone has no fixtures: the CosyVoice tests skip, said once per reason."""
    env = {**os.environ, "COSYVOICE_GOLDEN": str(tmp_path / "none")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/golden/test_flow.py", "tests/golden/test_flow_cache.py"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert done.returncode == 0 and " skipped" in done.stdout, done.stdout[-2000:]
    assert 1 <= len(skipped) <= 3, "\n".join(skipped[:20])
