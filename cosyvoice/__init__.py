"""Clean-room, inference-only CosyVoice: text -> speech for all three families.

Families (detected from the yaml file name): v1 ``CosyVoice-300M-SFT`` (``cosyvoice.yaml``:
rel-pos Transformer LM, whisper tokenizer), v2 ``CosyVoice2-0.5B`` (``cosyvoice2.yaml``: Qwen2
LM), v3 ``Fun-CosyVoice3-0.5B`` (``cosyvoice3.yaml``; its 176 pinyin special tokens are not
supported by the tokenizer yet). Streamed text can either be cut into sentences by
``frontend.incremental()`` (each one its own LLM run, like upstream's non-streaming text) or
fed token by token into one "bistream" LLM run (v2/v3, ``new_stream_request``).

Public API: one object owns the whole pipeline::

    import cosyvoice
    m = cosyvoice.load("pretrained_models/CosyVoice2-0.5B",
                       device=None,               # None/"auto": cuda if visible, else cpu
                       dtype=None,                # None/"auto": bfloat16 on cuda, float32 on cpu
                       speaker_dir=None,          # default <model_dir>/registered_speakers
                       use_wetext=True,
                       token2wav=True)            # False: front half only (text -> tokens)
    m.family, m.config, m.sample_rate             # "v1" | "v2" | "v3", parsed yaml, 24000/22050

    # one utterance in-process
    from cosyvoice.tts import synthesize
    for chunk in synthesize(m, "Hello.", "spk", stream=True, seed=1, speed=1.0): ...

    # many at once (what a serving scheduler does): each step is ONE packed LLM forward for
    # every utterance, then one batched flow + HiFT call for those with a chunk ready
    u = m.start("spk", seed=0, speed=1.0, stream=True)  # seed 0 = random; -> Utterance
    m.add_text(u, "First sentence. Second one.", tag=0)   # normalized + split, one LLM run each
    m.close_text(u)                                       # no more text
    for out in m.step([u, ...], slack=None):              # -> list[Output]
        out.utterance, out.audio, out.tag, out.tag_end, out.done, out.error
    m.cancel(u)                                           # frees its KV blocks now
    u.status                                              # WAITING | RUNNING | FINISHED

v1 cannot time-scale while streaming, so ``start`` turns streaming off for v1 at speed != 1.
A bfloat16 request on a CPU without bf16 matrix units falls back to float32 (``devices``).

Text frontend (``m.frontend``, :class:`cosyvoice.frontend.Frontend`)::

    segs = m.frontend.split("long text ...")      # normalised segments, one LLM run each
    ids = m.frontend.encode(segs[0])              # list[int] Qwen2 BPE ids (+ CosyVoice specials)
    s = m.frontend.incremental()                  # streaming text input
    s.push("Hello wor") -> []; s.push("ld. How") -> ["Hello world."]; s.flush() -> ["How."]

The stages underneath, for tests and tools. LLM step API (``m.llm``,
:class:`cosyvoice.llm.engine.LLMEngine`); a request is a :class:`cosyvoice.llm.engine.LLMRequest`
and its keys/values live in blocks of one paged pool per model (``m.llm.net.kv_pool()``,
:mod:`cosyvoice.llm.kv`)::

    r = m.new_request(segs[0], speaker="my_voice", seed=1234)   # or LLMRequest(text_ids=...)
    m.llm.prefill([r1, r2])        # -> list[int | None]: first token of each (None = finished)
    m.llm.decode([r1, r2, r3])     # -> one more token each
    m.llm.step(reqs)               # any mix: un-started requests are prefilled, others decode,
                                   # all in ONE packed forward (ragged batch, per-request KV cache)
    r.out_tokens, r.done, r.finish_reason ("stop" | "length" | "cancelled"), r.last_logits
    r.flow_tokens                  # the tokens for token2wav (= out_tokens except v3's dropped
                                   # silent runs); read the new ones after every step
    r.cancel()                     # frees its KV cache; just stop passing it to step()
    m.llm.prefill_chunk = 128      # the default: step() feeds <= 128 input positions of a request
                                   # (prefix or streamed text) per step and returns None for it
                                   # until all are in; None: all at once (prefill() always is)

    # bistream (spec §8.6; v2/v3): text arrives while speech tokens are generated
    r = m.new_stream_request(speaker="my_voice", seed=1)
    r.push_text(m.frontend.encode("Hello, ")); r.push_text(...); r.close_text()
    r.ready                        # False while it waits for 5 more text tokens: don't step it
    m.llm.step([r, ...])           # None also when it produced a "fill" (then waits for text);
                                   # r.out_tokens includes fills, r.flow_tokens never does

Sampling: RAS (top-p 0.8 / top-k 25 / repetition fallback, from the yaml) on the model's
device, with random numbers that are a function of the request's ``seed`` and the draw's number
(0 = random; the seed used is kept in ``r.seed``), so a request's tokens never depend on its
batch-mates. ``min_len = 2 * len(text_ids)``
(every special id is masked before that), ``max_len = 20 * len(text_ids)``. ``greedy=True``
takes the argmax instead. v1 requests also take the speaker x-vector (``embedding``; set by
``new_request`` from the speaker).

Speakers (``m.speakers``, :class:`cosyvoice.speakers.SpeakerStore`)::

    m.speakers.list() -> list[str]               # spk2info.pt speakers + registered ones
    m.speakers.get(name) -> Speaker               # embedding, prompt ids/tokens/feat
    m.speakers.register(name, audio, prompt_text, overwrite=False, normalize=True)
                                                  # audio: path | bytes | file | (samples, sr)
    m.speakers.delete(name)

Errors: :class:`cosyvoice.frontend.audio.AudioError` (``ValueError``) for unusable prompt audio
(not decodable / no audio stream, shorter than 1 s, longer than 30 s, silent, below 16 kHz);
:class:`cosyvoice.speakers.SpeakerError` (``KeyError``) for unknown/duplicate/built-in names;
:class:`cosyvoice.config.ConfigError` for a bad model dir.
"""

from .model import CosyVoiceModel, load

__all__ = ["CosyVoiceModel", "load"]
