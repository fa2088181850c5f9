"""Qwen2 byte-level BPE text tokenizer (v2/v3) built with the ``tokenizers`` library.

The released ``CosyVoice-BlankEN/`` has no ``tokenizer.json``; we assemble the same pipeline
that HF's converter builds from ``vocab.json`` + ``merges.txt`` (spec §5.2), then add
CosyVoice's special tokens in upstream's order so they land on the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers as pre

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

V2_SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endofprompt|>",
    "[breath]",
    "<strong>",
    "</strong>",
    "[noise]",
    "[laughter]",
    "[cough]",
    "[clucking]",
    "[accent]",
    "[quick_breath]",
    "<laughter>",
    "</laughter>",
    "[hissing]",
    "[sigh]",
    "[vocalized-noise]",
    "[lipsmack]",
    "[mn]",
]

# v3 adds <|endofsystem|>, 84 ARPAbet phones and 176 pinyin initials/finals (spec §5.3).
_ARPABET = (  # noqa: SIM905 - one compact line per phone group
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 "
    "B CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 "
    "IY2 JH K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 "
    "UW2 V W Y Z ZH"
).split()


class QwenTokenizer:
    """``encode(text) -> list[int]`` with CosyVoice's special tokens matched atomically."""

    def __init__(self, blanken_dir: str | Path, family: str = "v2") -> None:
        d = Path(blanken_dir)
        vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for line in (d / "merges.txt").read_text(encoding="utf-8").splitlines():
            if not line or line.startswith("#version"):
                continue
            a, b = line.split(" ")
            merges.append((a, b))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        # Base added tokens from tokenizer_config.json, in id order.
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            added = cfg.get("added_tokens_decoder", {})
            for idx in sorted(added, key=int):
                a = added[idx]
                tok.add_special_tokens([_added(a["content"])])
                got = tok.token_to_id(a["content"])
                if got != int(idx):
                    raise ValueError(f"added token {a['content']!r} got id {got}, want {idx}")
        specials = list(V2_SPECIALS)
        if family == "v3":
            specials += ["<|endofsystem|>"] + [f"[{p}]" for p in _ARPABET] + _pinyin_tokens()
        for s in specials:  # one at a time so new ids follow list order
            if tok.token_to_id(s) is None:
                tok.add_special_tokens([_added(s)])
        self._tok = tok
        self.family = family

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _added(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False)


def _pinyin_tokens() -> list[str]:
    # The exact 176-entry list of v3 is not reproduced in our facts; v3 tokenization is not
    # supported yet (see cosyvoice.frontend docstring).
    return []


class WhisperTokenizer:
    """v1 text tokenizer: openai-whisper's multilingual tiktoken encoding (51866 ids), called
    exactly as the v1 yaml does; special tokens such as ``<|en|>`` are matched atomically."""

    def __init__(self) -> None:
        # imported lazily: whisper pulls numba/torch, only v1 needs it
        from whisper.tokenizer import get_tokenizer

        tok = get_tokenizer(multilingual=True, num_languages=100, language="en", task="transcribe")
        self._enc = tok.encoding
        self.family = "v1"

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, allowed_special="all")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i < self._enc.eot_token]
        return self._enc.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            return None

    def __len__(self) -> int:
        return self._enc.n_vocab
