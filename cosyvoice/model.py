"""The loaded model object returned by :func:`cosyvoice.load`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Family, LLMConfig, llm_config, load_model_yaml
from .frontend import Frontend
from .llm.engine import LLMEngine, LLMRequest
from .llm.lm import QwenSpeechLM
from .llm.transformer_lm import TransformerSpeechLM
from .speakers import SpeakerStore

V3_SYSTEM_PREFIX = "You are a helpful assistant.<|endofprompt|>"


@dataclass
class CosyVoiceModel:
    """``frontend`` (text), ``llm`` (batched step API), ``speakers`` (store) of one model dir.

    ``config`` is the parsed yaml (plain dicts, see :mod:`cosyvoice.config`), from which the
    token2wav half builds its own configs.
    """

    model_dir: Path
    family: Family
    config: dict[str, Any]
    llm_config: LLMConfig
    frontend: Frontend
    llm: LLMEngine
    speakers: SpeakerStore
    device: torch.device
    dtype: torch.dtype

    @property
    def sample_rate(self) -> int:
        return int(self.config.get("sample_rate", 24000))

    def new_request(
        self,
        text: str,
        speaker: str | None = None,
        seed: int = 0,
        greedy: bool = False,
    ) -> LLMRequest:
        """LLM request for one already-normalised text segment (see ``frontend.split``), with
        the zero-shot prompt of ``speaker`` if it has one.

        v3 needs ``<|endofprompt|>`` in prompt text ++ text (spec §5.3); if it is missing, the
        canonical system prefix is put in front of the prompt transcript (zero-shot) or of
        the text (SFT), as upstream's examples do."""
        prompt_text: list[int] = []
        prompt_speech: list[int] = []
        embedding = None
        if speaker is not None:
            spk = self.speakers.get(speaker)
            prompt_text, prompt_speech = list(spk.prompt_text_ids), spk.prompt_speech_tokens
            embedding = spk.embedding  # only the v1 LLM reads it
        text_ids = self.frontend.encode(text)
        if self.family == "v3":
            eop = self.frontend.tokenizer.token_to_id("<|endofprompt|>")
            if eop not in prompt_text and eop not in text_ids:
                prefix = self.frontend.encode(V3_SYSTEM_PREFIX)
                if prompt_speech:
                    prompt_text = prefix + prompt_text
                else:
                    text_ids = prefix + text_ids
        return LLMRequest(
            text_ids=text_ids,
            prompt_text_ids=prompt_text,
            prompt_speech_tokens=prompt_speech,
            seed=seed,
            greedy=greedy,
            embedding=embedding,
        )

    def new_stream_request(
        self, speaker: str | None = None, seed: int = 0, greedy: bool = False
    ) -> LLMRequest:
        """Bistream LLM request (v2/v3): feed text with ``r.push_text(frontend.encode(piece))``
        as it arrives, end with ``r.close_text()``; step it whenever ``r.ready``."""
        if self.family == "v1":
            raise NotImplementedError("text-streaming input needs a v2/v3 model")
        prompt_text: list[int] = []
        prompt_speech: list[int] = []
        if speaker is not None:
            spk = self.speakers.get(speaker)
            prompt_text, prompt_speech = list(spk.prompt_text_ids), spk.prompt_speech_tokens
        eop = None
        if self.family == "v3":
            eop = self.frontend.tokenizer.token_to_id("<|endofprompt|>")
            if eop not in prompt_text:
                prompt_text = self.frontend.encode(V3_SYSTEM_PREFIX) + prompt_text
        return LLMRequest.streaming(
            prompt_text, prompt_speech, seed=seed, greedy=greedy, eop_id=eop
        )


def load(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    speaker_dir: str | Path | None = None,
    use_wetext: bool = True,
) -> CosyVoiceModel:
    model_dir = Path(model_dir)
    family, cfg = load_model_yaml(model_dir)
    device = torch.device(device)
    lcfg = llm_config(family, cfg, model_dir)
    net = TransformerSpeechLM(lcfg) if family == "v1" else QwenSpeechLM(lcfg)
    net.load_checkpoint(model_dir / "llm.pt")
    net = net.to(device=device, dtype=dtype).eval()
    frontend = Frontend(model_dir, family, use_wetext=use_wetext)
    speakers = SpeakerStore(
        model_dir,
        family,
        cfg,
        frontend.encode,
        speaker_dir=speaker_dir,
        normalize_text=frontend.normalize,
    )
    return CosyVoiceModel(
        model_dir=model_dir,
        family=family,
        config=cfg,
        llm_config=lcfg,
        frontend=frontend,
        llm=LLMEngine(net, lcfg.sampling),
        speakers=speakers,
        device=device,
        dtype=dtype,
    )
