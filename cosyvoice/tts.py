"""End-to-end text-to-speech for one request: text + speaker -> 24 kHz audio chunks.

Composes the front half (:func:`cosyvoice.load`: frontend, LLM, speakers) with the back half
(:class:`cosyvoice.token2wav.Token2Wav`). Each text segment is one LLM run and one token2wav
state, as upstream ``inference_sft`` / ``inference_zero_shot`` do. For serving many requests at
once, a scheduler drives ``model.llm.step`` and ``Token2Wav.step`` itself; this module is the
single-request reference path (tests, CLI).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cosyvoice.flow import load_flow
from cosyvoice.hift import HiFTConfig, load_hift
from cosyvoice.token2wav import Token2Wav, Token2WavV1, make_token2wav


@dataclass
class TTS:
    model: object  # cosyvoice.model.CosyVoiceModel
    token2wav: Token2Wav | Token2WavV1

    @property
    def sample_rate(self) -> int:
        return self.token2wav.sample_rate

    @classmethod
    def load(cls, model_dir: str | Path, device="cpu", **kw) -> TTS:
        from cosyvoice.model import load

        model = load(model_dir, device=device, **kw)
        flow = load_flow(model_dir, device=device)
        hift = load_hift(model_dir, HiFTConfig.from_yaml(model.config), device=device)
        return cls(model, make_token2wav(flow, hift))

    def tts(
        self,
        text: str,
        speaker: str,
        stream: bool = False,
        speed: float = 1.0,
        seed: int = 0,
        greedy: bool = False,
        noise: bool = True,
        text_frontend: bool = True,
        state_hook: Callable[[object, int], None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield float32 audio chunks (1-D, ``sample_rate``). ``seed`` (0 = random) drives LLM
        sampling and the vocoder noise; ``greedy`` = argmax decoding and ``noise=False`` = zero
        vocoder noise give the deterministic output the golden fixtures were recorded with.
        With ``stream=False`` one chunk per text segment is yielded. ``state_hook(state, i)`` sees
        each segment's token2wav state before use (tests replay recorded v1 flow noise with it)."""
        m = self.model
        spk = m.speakers.get(speaker)
        if seed == 0:
            seed = secrets.randbits(63) or 1
        for i, seg in enumerate(m.frontend.split(text, text_frontend=text_frontend)):
            req = m.new_request(seg, speaker, seed=seed + i, greedy=greedy)
            st = self.token2wav.new_state(
                spk.embedding,
                torch.tensor(spk.prompt_speech_tokens, dtype=torch.long),
                spk.prompt_feat,
                stream=stream,
                speed=speed,
                seed=(seed + i) if noise else None,
            )
            if state_hook is not None:
                state_hook(st, i)
            while not st.done:
                new: list[int] = []
                if not req.done:
                    tok = m.llm.step([req])[0]
                    new = [] if tok is None else [tok]
                (chunk,) = self.token2wav.step([(st, new, req.done)])
                if chunk is not None and chunk.numel():
                    yield chunk


def tts(
    model_dir: str | Path, text: str, speaker: str, stream: bool = False, **kw
) -> Iterator[torch.Tensor]:
    """One-shot helper: load ``model_dir`` and synthesize (reloads every call; keep a :class:`TTS`
    around for repeated use)."""
    yield from TTS.load(model_dir).tts(text, speaker, stream=stream, **kw)
