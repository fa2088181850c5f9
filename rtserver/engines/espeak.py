"""Piper's phonemizer (espeak-ng) in a child process of its own.

espeak-ng is C that some texts crash: in piper-tts 1.8, 97 dotted letters in a row ("a.a.a...",
"U.S.U.S...") overrun a buffer and kill the process. In the server's process that takes every
stream and connection with it. Such runs are cut by a line break before they reach it (read
letter by letter all the same). Another crash, or a text that takes over TIMEOUT_S, fails that
one text (PhonemizerFailed) and the next call starts a fresh child: a wait of a second or so
for its imports, which held every stream's step while one client sent crashing text. The
child imports only Piper (no onnxruntime session, no server), about 50 MB; it speaks JSON
lines on its stdin and stdout: first `ready`, then [voice, text] in, [true, phonemes by
sentence] or [false, message] out.

    python -m rtserver.engines.espeak '{"joe": "/path/to/voice.onnx.json"}'
"""

from __future__ import annotations

import json
import logging
import re
import select
import signal
import subprocess
import sys
import threading

import msgspec

log = logging.getLogger("rtserver.piper")

TIMEOUT_S = 5.0  # a 5000-character text takes about 0.1 s: this is a hang, not work
START_S = 60.0  # for a fresh child's imports (a cold disk, a busy host) before its first call
READY = b"ready\n"  # what a child says once it can phonemize
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(tuple[bool, list[list[str]] | str]).decode


# A run of dotted letters longer than espeak-ng's buffer takes (it overran from 97): cut
# after every 32 by a line break. A space, "; " or ". " there did not stop "a.a.a..." from
# crashing it (about half of 28 tries); a line break did in every one of 65.
_DOTTED_RUN = re.compile(r"(?:[^\W\d_]\.){32}(?=[^\W\d_]\.)")


def defused(text: str) -> str:
    """``text`` with no run of dotted letters that crashes espeak-ng."""
    return _DOTTED_RUN.sub(lambda m: m.group() + "\n", text)


class PhonemizerFailed(RuntimeError):
    pass


class Phonemizer:
    """Phonemes by sentence, from a child process; one call at a time."""

    def __init__(self, configs: dict[str, str]) -> None:
        self._configs = configs  # voice id -> its .onnx.json
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._fresh = False  # the child has not said `ready` yet
        self._start()  # it imports while the server loads

    def __call__(self, voice: str, text: str) -> list[list[str]]:
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                self._start()
            child = self._child
            assert child is not None and child.stdin and child.stdout
            try:
                if self._fresh and self._read(child, START_S) != READY:
                    raise PhonemizerFailed("it did not start")
                self._fresh = False
                child.stdin.write(_encode((voice, text)) + b"\n")
                child.stdin.flush()
                answer = self._read(child, TIMEOUT_S)
            except (OSError, PhonemizerFailed) as exc:
                self._stop()
                why = f"the phonemizer (espeak-ng) failed on this text: {exc}"
                raise PhonemizerFailed(why) from exc
        ok, value = _decode(answer)
        if not ok:
            raise PhonemizerFailed(f"the phonemizer (espeak-ng) failed: {value}")
        return value  # type: ignore[return-value]

    @staticmethod
    def _read(child: subprocess.Popen[bytes], limit: float) -> bytes:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], limit)
        if not ready:
            raise PhonemizerFailed(f"no answer in {limit:g} s")
        line = child.stdout.readline()
        if not line.endswith(b"\n"):  # EOF: the child died (a crash, or killed)
            raise PhonemizerFailed(f"it exited ({child.wait()})")
        return line

    def _start(self) -> None:
        cmd = [sys.executable, "-m", __name__, json.dumps(self._configs)]
        self._child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._fresh = True
        log.debug("phonemizer child %d started", self._child.pid)

    def _stop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            for pipe in (self._child.stdin, self._child.stdout):
                if pipe:
                    pipe.close()
            self._child = None


def _serve(configs: dict[str, str]) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server drains, then closes
    # the pipe, which ends this loop. A KeyboardInterrupt here only printed a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from piper.config import PiperConfig
    from piper.voice import PiperVoice

    voices = {}
    for vid, path in configs.items():
        with open(path, encoding="utf-8") as f:
            voices[vid] = PiperVoice(session=None, config=PiperConfig.from_dict(json.load(f)))
    out = sys.stdout.buffer
    out.write(READY)
    out.flush()
    for line in sys.stdin.buffer:  # ends when the server closes the pipe (or exits)
        vid, text = msgspec.json.decode(line, type=tuple[str, str])
        try:
            answer: tuple[bool, object] = (True, voices[vid].phonemize(defused(text)))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the child goes on
            answer = (False, f"{type(exc).__name__}: {exc}")
        out.write(_encode(answer) + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
