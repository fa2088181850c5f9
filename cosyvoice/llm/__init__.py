"""Speech-token language models and their batched step API.

* :mod:`.engine`: :class:`LLMRequest` (per-request state) and :class:`LLMEngine` (``step``);
* :mod:`.qwen2` / :mod:`.lm`: v2/v3 Qwen2 LM; :mod:`.transformer_lm`: v1 TransformerLM;
* :mod:`.sampling`: RAS sampling; :mod:`.bistream`: text-streaming input; :mod:`.silence`:
  the v3 silent-token filter.
"""

from .engine import LLMEngine, LLMRequest

__all__ = ["LLMEngine", "LLMRequest"]
