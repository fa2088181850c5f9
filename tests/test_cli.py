"""`rtserver serve` settings: every flag documented with its default and variable, and a bad
value is one clear line, not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from audio_check import assert_speech, decode_audio, decode_pcm
from serverproc import ROOT

from rtserver.settings import CPU_STREAMS, ENV_PREFIX, GPU_STREAMS, Settings


def rtserver(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`rtserver ARGS` in a process of its own (a minute at most)."""
    return subprocess.run(
        [sys.executable, "-m", "rtserver", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return rtserver("serve", *args, env=env)


def test_help_shows_each_flag_with_its_default_and_variable():
    out = " ".join(serve("--help").stdout.split())
    for name in Settings.__struct_fields__:
        assert f"--{name.replace('_', '-')}" in out
        assert f"{ENV_PREFIX}{name.upper()}" in out
    assert "(default: 0; env RTSERVER_MAX_STREAMS)" in out
    assert "one of: auto, float32, bfloat16, float16 (default: auto" in out  # --dtype's values
    # a percent sign in a help text is printed as it is (argparse read it as a format and
    # printed its whole action in the middle of --packed's)
    assert "up to 10% slower" in out and "option_strings" not in out


@pytest.mark.parametrize(
    "args, env, says",
    [
        ((), {"RTSERVER_PORT": "abc"}, "RTSERVER_PORT"),
        (("--max-streams", "-1"), {}, "--max-streams"),
        (("--dtype", "int8"), {}, "--dtype: Invalid enum value 'int8' (one of: auto, float32"),
        (("--read-timeout-s", "soon"), {}, "--read-timeout-s"),
        (("--voice-alias", "alloy"), {}, "--voice-alias"),
        (("--replicas", "2", "--replica-gpus", "1", "--device", "cpu"), {}, "--replica-gpus"),
        (("--replicas", "1", "--max-replicas", "3", "--min-replicas", "2"), {}, "--max-replicas"),
        ((), {"RTSERVER_REPLICA_CPUS": "-1"}, "RTSERVER_REPLICA_CPUS"),
        (("--api-key", "short"), {}, "--api-key: Expected `str` of length >= 8"),
    ],
)
def test_a_bad_setting_is_one_clear_line(args, env, says):
    r = serve(*args, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "given, streams",
    [
        ({}, CPU_STREAMS),  # the built-in voice runs on the CPU
        ({"device": "cuda"}, CPU_STREAMS),  # ... whatever --device says (it is for CosyVoice)
        ({"model": "m", "device": "cpu"}, CPU_STREAMS),
        ({"model": "m", "device": "cuda"}, GPU_STREAMS),
        ({"model": "m", "device": "cuda:1"}, GPU_STREAMS),
        ({"model": "m", "device": "cpu", "replicas": 2}, CPU_STREAMS),
        ({"model": "m", "replicas": 2, "replica_gpus": 0.5}, GPU_STREAMS),  # the driver: no GPU
        ({"model": "m", "device": "cuda", "max_streams": 3}, 3),  # a number given is kept
    ],
)
def test_max_streams_defaults_to_where_the_engine_runs(given, streams):
    assert Settings().replace(**given).streams == streams


def test_the_default_server_admits_the_cpu_default(server):
    assert server.healthz()["max_streams"] == CPU_STREAMS


def test_plain_serve_never_imports_ray(server):
    """Ray is for --replicas and --ray-address only: the plain server never loads it."""
    assert "site-packages/ray/" not in Path(f"/proc/{server.proc.pid}/maps").read_text()


@pytest.mark.parametrize(
    "model, device, says",
    [
        ("missing", "auto", "missing: not a folder"),  # a path with nothing there
        ("empty", "auto", "cosyvoice2.yaml"),  # a folder without a CosyVoice yaml
        ("model", "tpu", "--device"),
        ("model", "cuda:x", "--device"),
    ],
)
def test_a_model_that_cannot_load_is_one_clear_line(tmp_path, model, device, says):
    """Checked before the app starts: not a traceback from its startup, ending in exit 3."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "cosyvoice2.yaml").write_text("")  # the file names the family
    r = serve("--model", str(tmp_path / model), "--device", device, "--port", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and says in lines[0], r.stderr
    if model != "model":
        assert lines[0].startswith("rtserver: --model"), lines[0]


def test_a_port_in_use_fails_before_the_model_loads(server):
    """The port is taken (here by the shared server): the bind fails first. It was tried only
    after the model had loaded (minutes for a full one) and the log had said "ready"."""
    r = serve("--port", str(server.port))
    assert r.returncode != 0 and "address already in use" in r.stderr.lower(), r.stderr[-2000:]
    assert "ready:" not in r.stderr and "piper voice" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()  # one line that says which setting to change
    assert len(lines) == 1 and f"--port {server.port}" in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("model", ["missing", "empty"])
def test_replicas_check_the_model_before_ray_starts(tmp_path, model):
    """A cluster the command starts loads the model on this machine: a --model that cannot
    load is one line at once, as for plain serve. It was over a minute of starting Ray and
    three tries per replica, their tracebacks, and "the deployment failed"."""
    (tmp_path / "empty").mkdir()
    r = serve("--replicas", "1", "--model", str(tmp_path / model))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "--model" in lines[0], r.stderr[-2000:]


def test_replicas_on_a_port_in_use_fail_before_ray_starts():
    """Serve's proxy would find the port taken only after Ray had started (40 s here), and
    said so in a page of tracebacks."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        r = serve("--replicas", "1", "--port", str(taken.getsockname()[1]))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert "--port" in lines[0] and "address already in use" in lines[0].lower(), lines[0]


def test_a_ray_address_where_nothing_answers_is_one_clear_line():
    """ray.init retries a cluster it cannot reach for good: a wrong --ray-address printed
    Ray's warnings for 13 minutes, and `auto` followed a dead cluster's note the same way."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed below: nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", "no-such-host.invalid:6379"):
        r = serve("--replicas", "1", "--ray-address", address, "--port", str(port))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
        assert f"--ray-address {address}: no Ray cluster answers" in lines[0], lines[0]


def test_say_without_a_server_is_one_clear_line(tmp_path):
    for route in ((), ("--ws",)):
        r = rtserver("say", "Hello.", "--url", "http://127.0.0.1:1", "-o", str(tmp_path / "x.mp3"),
                     *route)  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "cannot reach" in lines[0], r.stderr


def test_say_writes_what_its_output_is_named(server, tmp_path):
    """`-o x.wav` is a WAV file (it was MP3 bytes under that name), over HTTP and --ws; a name
    that says no format it writes is one line, not a file of another format."""
    for route in ((), ("--ws",)):
        out = tmp_path / "x.wav"
        r = rtserver("say", "Written as a wave file.", "--url", server.base_url, "-o", str(out),
                     *route)  # fmt: skip
        assert r.returncode == 0, r.stderr
        audio, rate = decode_audio(out.read_bytes(), "wav")
        assert rate == 22050
        assert_speech(audio, rate, min_seconds=1.0)
        # headerless PCM: the line says how to read it (over HTTP the rate is not in the bytes)
        r = rtserver("say", "Raw samples.", "--url", server.base_url, "-o", str(tmp_path / "x.pcm"),
                     *route)  # fmt: skip
        assert r.returncode == 0 and "s16le mono, 22050 Hz" in r.stderr, r.stderr
        assert_speech(decode_pcm((tmp_path / "x.pcm").read_bytes()), 22050, min_seconds=0.5)
    r = rtserver("say", "Hi.", "--url", server.base_url, "-o", str(tmp_path / "x.ogg"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and ".wav" in lines[0], r.stderr
    assert not (tmp_path / "x.ogg").exists()
    r = rtserver("say", "Hi.", "--url", server.base_url, "-o", str(tmp_path / "no" / "x.wav"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "cannot write" in lines[0], r.stderr
