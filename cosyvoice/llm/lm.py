"""Text-to-speech-token LM of CosyVoice2 (``Qwen2LM``) and CosyVoice3 (``CosyVoice3LM``).

Module names follow the checkpoint so ``llm.pt`` loads with strict key matching:
``llm_embedding`` (v2 only: row 0 sos, row 1 task id), ``llm.model.model.*`` (Qwen2),
``llm_decoder``, ``speech_embedding``. ``llm.model.lm_head.weight`` (tied to the text embedding,
unused by CosyVoice) must be present in the file but is not kept in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import LLMConfig
from .kv import KVCache, KVPool
from .qwen2 import Qwen2Model, last_positions

UNUSED_KEYS = ("llm.model.lm_head.weight",)


class _CausalLM(nn.Module):
    def __init__(self, model: Qwen2Model) -> None:
        super().__init__()
        self.model = model


class _Encoder(nn.Module):
    def __init__(self, model: Qwen2Model) -> None:
        super().__init__()
        self.model = _CausalLM(model)


class QwenSpeechLM(nn.Module):
    """The network only; the request/step logic lives in :mod:`cosyvoice.llm.engine`."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        if cfg.qwen is None:
            raise ValueError("QwenSpeechLM needs a Qwen config (v2/v3)")
        self.cfg = cfg
        d = cfg.llm_input_size
        s = cfg.speech_token_size
        self.family = cfg.family
        if cfg.family == "v2":
            self.llm_embedding = nn.Embedding(2, d)
            n_out = s + 3  # eos, second stop id, fill
            self.llm_decoder = nn.Linear(cfg.llm_output_size, n_out, bias=True)
            self.stop_ids = range(s, s + 3)
        else:  # v3: sos/eos/task/fill + reserved = 200 special ids, decoder without bias
            n_out = s + 200
            self.llm_decoder = nn.Linear(cfg.llm_output_size, n_out, bias=False)
            self.stop_ids = range(s, s + 200)
        self.speech_embedding = nn.Embedding(n_out, d)
        self.llm = _Encoder(Qwen2Model(cfg.qwen))

    @property
    def qwen(self) -> Qwen2Model:
        return self.llm.model.model

    @property
    def speech_token_size(self) -> int:
        return self.cfg.speech_token_size

    @property
    def fill_id(self) -> int:
        """Bistream "need more text" token (v2: S+2, v3: S+3)."""
        return self.speech_token_size + (2 if self.family == "v2" else 3)

    def embed_item(self, kind: str, ids: list[int]) -> torch.Tensor:
        """Embeddings of one bistream input item (sos / task / text ids / speech ids)."""
        if kind == "sos":
            return self.sos_embed()
        if kind == "task":
            return self.task_embed()
        t = torch.tensor(ids, dtype=torch.long, device=self.speech_embedding.weight.device)
        return self.qwen.embed_tokens(t) if kind == "text" else self.speech_embedding(t)

    def sos_embed(self) -> torch.Tensor:
        if self.family == "v2":
            return self.llm_embedding.weight[0:1]
        return self.speech_embedding.weight[self.speech_token_size : self.speech_token_size + 1]

    def task_embed(self) -> torch.Tensor:
        if self.family == "v2":
            return self.llm_embedding.weight[1:2]
        s = self.speech_token_size + 2
        return self.speech_embedding.weight[s : s + 1]

    def new_cache(self, dtype=None, device=None) -> KVCache:
        return self.qwen.new_cache(dtype, device)

    def kv_pool(self, dtype=None, device=None, **kw) -> KVPool:
        return self.qwen.kv_pool(dtype, device, **kw)

    def prefix_embeds(
        self,
        text_ids: torch.Tensor,
        prompt_speech: torch.Tensor,
        embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sos ++ E_t(prompt_text ++ text) ++ task ++ E_s(prompt speech): (L, d).

        ``embedding`` (speaker x-vector) is accepted for API symmetry with v1 and ignored, as
        upstream's v2/v3 LLM ignores it."""
        return torch.cat(
            [
                self.sos_embed(),
                self.qwen.embed_tokens(text_ids),
                self.task_embed(),
                self.speech_embedding(prompt_speech),
            ]
        )

    def forward_packed(
        self, x: torch.Tensor, caches: list[KVCache], seg_lens: list[int], last_only: bool = True
    ) -> torch.Tensor:
        """Packed embeddings -> llm_decoder logits (of each segment's last position if last_only)."""
        h = self.qwen(x, caches, seg_lens)
        return self.llm_decoder(last_positions(h, seg_lens) if last_only else h)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load ``llm.pt`` requiring exactly our keys (+ the unused tied lm_head)."""
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        expected = set(self.state_dict()) | set(UNUSED_KEYS)
        got = set(state)
        if got != expected:
            missing = sorted(expected - got)
            unexpected = sorted(got - expected)
            raise KeyError(
                f"{path}: key mismatch; missing={missing[:10]} unexpected={unexpected[:10]}"
            )
        for k in UNUSED_KEYS:
            state.pop(k)
        self.load_state_dict(state, strict=True)
