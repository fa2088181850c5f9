"""Registered speakers across replicas: two CosyVoice replicas (the tiny golden model dir) share
one speaker dir, on a Ray cluster that `ray start --head` runs and the command joins
(--ray-address). A speaker registered through one replica speaks on the other, a deletion is
seen by both, and SIGTERM removes the app but leaves the cluster it joined running."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from audio_check import assert_speech, decode_pcm
from serverproc import ROOT, ServerProcess, alive, descendants, free_port
from test_cosyvoice_server import MODEL, prompt_wav, register

pytest.importorskip("ray", reason="needs the cluster extra: uv run --extra cluster pytest")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"no golden model dir at {MODEL}"),
]

# The cluster and the command that joins it share a token of their own (docs/deploy.md).
ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
TEXT = "你好，今天天气很好。"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, subprocess.Popen]]:
    """A one-node Ray cluster as an operator starts one: `ray start --head` (in the foreground,
    so that a SIGTERM to it stops it and everything it started)."""
    port = free_port()
    log_path = ROOT / "tests" / "out" / f"ray-head-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2",
             "--include-dashboard", "false", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENV},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "will now block" not in log_path.read_text():
            assert head.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", head
    finally:
        processes = descendants(head.pid)
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in alive(processes):  # what a stuck shutdown left behind
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cv_cluster(ray_head, tmp_path_factory) -> Iterator[ServerProcess]:
    address, _ = ray_head
    srv = ServerProcess(
        "--ray-address", address, "--replicas", "2", "--replica-cpus", "0.5",
        "--model", str(MODEL), "--speaker-dir", str(tmp_path_factory.mktemp("speakers")),
        "--no-warmup", env=ENV,
    )  # fmt: skip
    try:
        srv.wait_log(r"ready: 2 replicas on ", timeout=240)
        yield srv
    finally:
        srv.stop()


def speak(srv: ServerProcess, spk_id: str) -> httpx.Response:
    body = {"tts_text": TEXT, "spk_id": spk_id, "seed": 1}
    return httpx.post(f"{srv.base_url}/tts/pcm", json=body, timeout=120)


def on_each_replica(srv: ServerProcess, call, timeout: float = 60) -> dict[str, httpx.Response]:
    """`call(srv)` through the proxy until both replicas answered: {replica: response}."""
    answers: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < 2:
        assert time.monotonic() < deadline, f"only {set(answers)} answered"
        r = call(srv)
        answers.setdefault(r.headers["x-replica"], r)
    return answers


def test_a_speaker_registered_on_one_replica_speaks_on_the_other(cv_cluster):
    r = register(cv_cluster, "shared_voice", prompt_wav())
    assert r.status_code == 201, r.text
    home = r.headers["x-replica"]
    answers = on_each_replica(cv_cluster, lambda srv: speak(srv, "shared_voice"))
    assert home in answers  # ... and the one that never saw the registration:
    for r in answers.values():
        assert r.status_code == 200, r.text
        assert_speech(decode_pcm(r.content), 24000, min_seconds=0.5)
    first, second = answers.values()
    assert first.content == second.content  # one seed, one speaker: the same audio
    for r in on_each_replica(
        cv_cluster, lambda srv: httpx.get(f"{srv.base_url}/speakers")
    ).values():
        assert "shared_voice" in {s["id"] for s in r.json()}


def test_a_deletion_is_seen_by_every_replica(cv_cluster):
    assert register(cv_cluster, "short_lived", prompt_wav()).status_code == 201
    r = httpx.delete(f"{cv_cluster.base_url}/speakers/short_lived")
    assert r.status_code == 204, r.text
    for r in on_each_replica(cv_cluster, lambda srv: speak(srv, "short_lived")).values():
        assert r.status_code == 400 and "short_lived" not in r.json()["extra"]["valid_speakers"]


def test_one_name_registers_once_across_replicas(cv_cluster):
    async def four(name: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cv_cluster.base_url, timeout=120) as c:
            files = {"prompt_wav": ("p.wav", prompt_wav(), "audio/wav")}
            data = {"spk_id": name, "prompt_text": "希望你以后能够做的比我还好呦。"}
            return await asyncio.gather(
                *(c.post("/speakers", data=data, files=files) for _ in range(4))
            )

    # Serve's router may send all four to one replica; contest fresh names until a contest
    # spans both (every contest must still have exactly one winner).
    for attempt in range(5):
        responses = asyncio.run(four(f"contested{attempt}"))
        assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]
        if len({r.headers["x-replica"] for r in responses}) == 2:
            return
    pytest.fail("five contests of four registrations never reached both replicas")


def test_sigterm_removes_the_app_and_leaves_the_joined_cluster(cv_cluster, ray_head):
    _, head = ray_head
    cv_cluster.proc.send_signal(signal.SIGTERM)
    assert cv_cluster.proc.wait(timeout=90) == 0, cv_cluster.log()
    with pytest.raises(httpx.ConnectError):  # Serve, which the command started, is gone
        httpx.get(f"{cv_cluster.base_url}/healthz")
    assert head.poll() is None and len(alive(descendants(head.pid))) >= 2
