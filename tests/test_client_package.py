"""rtserver-client is its own distribution: it builds, needs none of the server's heavy
dependencies, and imports in a fresh environment that has only its own."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import zipfile

from serverproc import ROOT

CLIENT = ROOT / "clients" / "python"
SERVER_ONLY = {"torch", "torchaudio", "litestar", "av", "onnxruntime", "piper-tts", "numpy"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_client_wheel_installs_alone(tmp_path):
    uv = shutil.which("uv")
    assert uv, "the tests run under uv (README quickstart)"
    run = {"check": True, "capture_output": True, "timeout": 300}
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(CLIENT)], **run)
    (wheel,) = tmp_path.glob("rtserver_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    assert "rtserver_client/py.typed" in names and "rtserver_client/protocol.py" in names
    assert not any(n.startswith("rtserver/") for n in names), "the server must not ride along"

    requires = meta.get_all("Requires-Dist") or []
    base = {_name(r) for r in requires if "extra ==" not in r}
    assert base == {"msgspec", "websockets", "httpx"}, requires
    assert not base & SERVER_ONLY
    extras = {_name(r) for r in requires if "extra ==" in r}
    assert {"pipecat-ai", "livekit-agents"} <= extras, requires

    # A fresh venv with the wheel and its three dependencies only; the cache makes it quick.
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "--python", shutil.which("python") or "python", str(venv)], **run)
    py = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "--python", str(py), str(wheel)], **run)
    probe = (
        "import importlib.util as u, rtserver_client as c\n"
        "from rtserver_client.protocol import Start, Words\n"
        "assert not any(u.find_spec(m) for m in ('torch', 'litestar', 'av', 'rtserver')), 'leak'\n"
        "assert {'TTSClient', 'ServerError', 'Words', 'Word'} <= set(c.__all__)\n"
        "assert b'timestamps' in __import__('msgspec').json.encode(\n"
        "    Start(context_id='a', spk_id='joe', timestamps=True))\n"
        "print(c.__file__)\n"
    )
    # From tmp_path: run from the repo root, Python would find the server's source tree.
    proc = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(venv) in proc.stdout, proc.stdout
