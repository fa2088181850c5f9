"""Text and prompt-audio frontend.

:class:`Frontend` bundles the text normaliser/splitter (:mod:`.text`), the family's tokenizer
(:mod:`.tokenizer`), the incremental splitter (:mod:`.incremental`) and the prompt-audio DSP
(:mod:`.audio`). Not supported yet: v3's 176 pinyin special tokens (ids 151748..151923;
their exact list is not in our facts), so v3 texts must not contain them.
"""

from __future__ import annotations

from pathlib import Path

from .audio import AudioError, decode_audio
from .incremental import IncrementalSplitter
from .text import Steps, TextNormalizer
from .tokenizer import QwenTokenizer, WhisperTokenizer

__all__ = ["AudioError", "Frontend", "IncrementalSplitter", "decode_audio"]


class Frontend:
    """``normalize``/``split`` text, ``encode`` it to token ids, split incrementally."""

    def __init__(self, model_dir: str | Path, family: str, use_wetext: bool = True) -> None:
        self.family = family
        self.tokenizer: QwenTokenizer | WhisperTokenizer
        if family == "v1":
            self.tokenizer = WhisperTokenizer()
        else:
            self.tokenizer = QwenTokenizer(Path(model_dir) / "CosyVoice-BlankEN", family)
        self.normalizer = TextNormalizer(lambda s: len(self.tokenizer.encode(s)), use_wetext)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def normalize(self, text: str) -> str:
        """Normalised text without splitting (what upstream does to a prompt transcript)."""
        return self.normalizer.normalize(text, split=False)

    def split(self, text: str, text_frontend: bool = True) -> list[str]:
        """Normalised segments; each is synthesised by its own LLM run."""
        return self.normalizer.normalize(text, split=True, text_frontend=text_frontend)

    def split_steps(self, text: str, text_frontend: bool = True) -> Steps[list[str]]:
        """:meth:`split`, pausing between groups of sentences (a long text takes seconds)."""
        return self.normalizer.normalize_steps(text, split=True, text_frontend=text_frontend)

    def incremental(self, min_len: int = 60, first_min_len: int = 1) -> IncrementalSplitter:
        return IncrementalSplitter(self.split, min_len=min_len, first_min_len=first_min_len)
