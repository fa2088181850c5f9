"""Loaded at interpreter start when this folder is on PYTHONPATH: a test server process gets
a limit lowered, or a step slowed, so that a test reaches in a second what takes minutes or
a lucky interleaving otherwise. Each hook is off unless its variable is set.

- RTSERVER_TEST_TOKEN_TEXT_RATIO: the LLM emits at most this many speech tokens per text
  token (CosyVoice's cap is 20).
- RTSERVER_TEST_DELETE_DELAY_S: a speaker's deletion waits this long before it reaches the
  store, so that other deletions of it pass the route's check meanwhile.
- RTSERVER_TEST_ESPEAK_CRASH: the phonemizer child (which loads this too) dies as espeak-ng
  does on a text containing this, now that no text known to crash it reaches it.
"""

import os
import time

if ratio := os.environ.get("RTSERVER_TEST_TOKEN_TEXT_RATIO"):
    import cosyvoice.llm.engine

    cosyvoice.llm.engine.MAX_TOKEN_TEXT_RATIO = int(ratio)

if delay := os.environ.get("RTSERVER_TEST_DELETE_DELAY_S"):
    from rtserver.engines.cosyvoice_engine import CosyVoiceEngine

    _delete = CosyVoiceEngine.delete_speaker

    def _slow_delete(self, spk_id: str) -> None:
        time.sleep(float(delay))
        _delete(self, spk_id)

    CosyVoiceEngine.delete_speaker = _slow_delete

if marker := os.environ.get("RTSERVER_TEST_ESPEAK_CRASH"):
    from piper.voice import PiperVoice

    _phonemize = PiperVoice.phonemize

    def _crashing(self, text: str):  # noqa: ANN202 - piper's own signature
        if marker in text:
            os.abort()
        return _phonemize(self, text)

    PiperVoice.phonemize = _crashing
