"""The wheel is a working install: it carries the web demo (GET / serves it from the package)."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

from serverproc import ROOT


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
