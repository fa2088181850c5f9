"""Text-streaming ("bistream") input for the v2/v3 LM (spec §8.6), as a per-request state
machine driven by :meth:`cosyvoice.llm.engine.LLMEngine.step`.

The model was trained on interleaved blocks ``5 text tokens, 15 speech tokens`` and predicts a
*fill* token when a block's speech is done and it needs more text. Inputs, in order:
``sos, [v3 system prompt], t[0:5], p[0:15], t[5:10], p[15:30], ...`` while prompt speech lasts,
then ``t[5 more]`` each time the model asks for text (after a fill), and at the end
``text_rest, task_id, prompt_speech_rest`` after which it decodes to eos.

Deliberate differences from upstream (spec §8.6 lists these quirks):
* every input is fed exactly once (upstream re-feeds the last speech token at the final stage);
* while text is streaming, eos and the other specials are masked but *fill* may be sampled;
* prompt speech left over when the text ends goes after the task id (the training layout)
  instead of being dropped;
* the final stage has a length bound (``MAX_TOKEN_TEXT_RATIO`` x all text tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

TEXT_CHUNK = 5
SPEECH_CHUNK = 15


@dataclass
class BistreamState:
    prompt_speech_left: list[int]
    text_buf: list[int] = field(default_factory=list)
    pending: list[tuple[str, list[int]]] = field(default_factory=list)  # inputs not yet fed
    waiting: bool = True  # the model wants text before it can continue
    closed: bool = False
    final: bool = False  # text ended: decode to eos
    next_fill: int = 0
    n_text: int = 0  # all text tokens seen (for the length bound)

    @classmethod
    def start(
        cls, prompt_text: list[int], prompt_speech: list[int], eop_id: int | None
    ) -> BistreamState:
        st = cls(prompt_speech_left=list(prompt_speech))
        st.pending.append(("sos", []))
        if eop_id is not None and eop_id in prompt_text:  # v3: the system part goes first, whole
            cut = prompt_text.index(eop_id) + 1
            st.pending.append(("text", prompt_text[:cut]))
            prompt_text = prompt_text[cut:]
        # the prompt transcript is streamed exactly like new text
        st.text_buf = list(prompt_text)
        p = len(prompt_speech)
        st.next_fill = (p // SPEECH_CHUNK + 1) * SPEECH_CHUNK - p
        return st

    def push(self, ids: list[int]) -> None:
        if self.closed:
            raise ValueError("text already closed")
        self.text_buf.extend(ids)
        self.n_text += len(ids)

    def advance(self) -> None:
        """Move buffered text / prompt speech into ``pending`` where the rules allow it."""
        if self.final:
            return
        interleaved = False
        while self.prompt_speech_left and len(self.text_buf) >= TEXT_CHUNK:
            self.pending.append(("text", self.text_buf[:TEXT_CHUNK]))
            self.pending.append(("speech", self.prompt_speech_left[:SPEECH_CHUNK]))
            del self.text_buf[:TEXT_CHUNK]
            del self.prompt_speech_left[:SPEECH_CHUNK]
            interleaved = True
        if not self.waiting:
            return
        if interleaved and not self.prompt_speech_left:
            # the prompt's last block may be partial: the model first completes it
            self.waiting = False
        elif not self.prompt_speech_left and len(self.text_buf) >= TEXT_CHUNK:
            self.pending.append(("text", self.text_buf[:TEXT_CHUNK]))
            del self.text_buf[:TEXT_CHUNK]
            self.waiting = False
        elif self.closed:
            self.final = True
            self.waiting = False
            if self.text_buf:
                self.pending.append(("text", self.text_buf))
            self.pending.append(("task", []))
            if self.prompt_speech_left:
                self.pending.append(("speech", self.prompt_speech_left))
            self.text_buf, self.prompt_speech_left = [], []

    @property
    def ready(self) -> bool:
        """True when the next step has something to feed."""
        self.advance()
        return not self.waiting
