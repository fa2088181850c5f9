"""Server settings: defaults, overridden by RTSERVER_* environment variables, then by CLI flags.

One msgspec Struct holds every setting with its type, bounds and help text; the CLI flags and
the environment variables are both generated from it and both validated by msgspec, so a bad
value anywhere gets one clear line (`SettingsError`) instead of a traceback.
"""

from __future__ import annotations

import functools
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

DEFAULT_PORT = 50000  # upstream CosyVoice's FastAPI server port, so its client works unchanged
ENV_PREFIX = "RTSERVER_"


def _doc(text: str, **bounds: Any) -> Meta:
    return Meta(description=text, **bounds)


Count = Annotated[int, Meta(ge=0)]
# A key travels in a header, and for browsers in a WebSocket subprotocol: token characters only.
Key = Annotated[str, Meta(min_length=8, pattern=r"^[A-Za-z0-9._~+-]+$")]
Seconds = Annotated[float, Meta(gt=0)]
# --max-streams' defaults: what a 2-core CPU keeps real time with the built-in voice
# (docs/benchmarks.md), and the count one H100/H200 is built to keep real time in bf16
# (`just bench-gpu` measures a GPU's own).
CPU_STREAMS, GPU_STREAMS = 6, 64


class Settings(msgspec.Struct, kw_only=True):
    host: Annotated[str, _doc("address to listen on")] = "127.0.0.1"
    port: Annotated[int, _doc("port to listen on", ge=1, le=65535)] = DEFAULT_PORT
    model: Annotated[Path | None, _doc("a CosyVoice model dir; none: the built-in voice")] = None
    voices_dir: Annotated[Path, _doc("extra Piper voices (*.onnx + *.onnx.json)")] = Path(
        "pretrained_models"
    )
    speaker_dir: Annotated[
        Path | None, _doc("where registered CosyVoice speakers are kept; none: in the model dir")
    ] = None
    max_speakers: Annotated[
        int,
        _doc("speakers kept, built-in ones included; a registration past it gets 409 (each "
             "registered one holds up to 0.5 MB in memory and on disk)", ge=1),
    ] = 256  # fmt: skip
    api_key: Annotated[
        list[Key],
        _doc(
            "a key clients must send as `Authorization: Bearer KEY` (repeatable; 8 or more "
            "of A-Za-z0-9._~+-)"
        ),
    ] = msgspec.field(default_factory=list)
    admin_key: Annotated[
        list[Key], _doc("a key required to register or delete speakers (repeatable; as --api-key)")
    ] = msgspec.field(default_factory=list)
    allow_origin: Annotated[
        list[str],
        _doc("a browser origin allowed for CORS and WebSockets (repeatable; `*` for any); "
             "none: any without a key, same-origin only with one"),
    ] = msgspec.field(default_factory=list)  # fmt: skip
    voice_alias: Annotated[
        list[Annotated[str, Meta(pattern=r"^[^=]+=.+$")]],
        _doc("an OpenAI voice name for a speaker, `alloy=SPEAKER` (repeatable); unmapped "
             "OpenAI names speak as the first speaker"),
    ] = msgspec.field(default_factory=list)  # fmt: skip
    allow_host: Annotated[
        list[str], _doc("a Host header the server answers to (repeatable); none: any")
    ] = msgspec.field(default_factory=list)
    max_streams: Annotated[
        Count,
        _doc("streams synthesizing at once, also the largest batch the engine prepares for "
             f"(0: {CPU_STREAMS}, or {GPU_STREAMS} for CosyVoice on a GPU)"),
    ] = 0  # fmt: skip
    max_queue: Annotated[Count, _doc("streams waiting beyond that; more get 503 / busy")] = 16
    max_text_chars: Annotated[int, _doc("text per request or WebSocket context", ge=1)] = 5000
    max_audio_s: Annotated[Seconds, _doc("audio one request or context may produce")] = 600.0
    max_client_streams: Annotated[
        Count, _doc("streams open at once per client address (0: no limit, and none on uploads)")
    ] = 8
    max_client_sockets: Annotated[
        Count, _doc("WebSockets open at once per client address (0: no limit)")
    ] = 16
    read_timeout_s: Annotated[
        Seconds, _doc("drop a stream whose client reads none of its audio this long")
    ] = 30.0
    max_connections: Annotated[
        Count, _doc("connections open at once, HTTP and WebSocket (0: no limit)")
    ] = 1000
    max_client_connections: Annotated[
        Count,
        _doc("connections (HTTP and WebSocket) open at once per client address (0: no limit; "
             "a proxy trusted for X-Forwarded-For is exempt)"),
    ] = 32  # fmt: skip
    request_timeout_s: Annotated[
        Seconds, _doc("a request's headers and body must arrive within this")
    ] = 30.0
    min_upload_kib_s: Annotated[
        Count,
        _doc("while uploads wait for a place, one that has come slower than this (KiB/s, "
             "after 3 s) gives its place up: 408 (0: never)"),
    ] = 32  # fmt: skip
    max_contexts: Annotated[int, _doc("open contexts per WebSocket", ge=1)] = 8
    max_message_bytes: Annotated[
        int, _doc("largest client WebSocket frame", ge=1024, le=4 * 1024 * 1024)
    ] = 64 * 1024
    ws_idle_timeout_s: Annotated[
        Seconds, _doc("close a WebSocket with no message and no audio this long")
    ] = 60.0
    ws_ping_interval_s: Annotated[
        Seconds,
        _doc("ping each WebSocket this often (proxies and NATs see traffic); no pong is "
             "awaited: a dead peer is found by the write watch and the idle timeout"),
    ] = 20.0  # fmt: skip
    context_idle_timeout_s: Annotated[
        Seconds, _doc("end a WebSocket context that has nothing to say this long")
    ] = 30.0
    slot_lease_s: Annotated[
        Seconds,
        _doc("while streams wait for a slot, a WebSocket context that has held one this long "
             "ends at its next pause"),
    ] = 20.0  # fmt: skip
    auto_flush_ms: Annotated[
        int, _doc("WebSocket: speak buffered text after this much silence", ge=1)
    ] = 1500
    min_sentence_chars: Annotated[Count, _doc("merge shorter sentences with the next")] = 12
    first_segment_chars: Annotated[
        Count, _doc("cut the first segment at a clause past this, for a fast first audio")
    ] = 60
    llm_fixed_tokens: Annotated[
        Count, _doc("benchmarks only: every LLM run emits exactly this many tokens")
    ] = 0
    device: Annotated[
        str, _doc("torch device for CosyVoice (auto: cuda when a GPU is visible, else cpu)")
    ] = "auto"
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        _doc("CosyVoice precision (auto: bfloat16 on cuda, float32 on cpu)"),
    ] = "auto"
    flow_cache_mb: Annotated[
        Annotated[float, Meta(ge=0)] | None,
        _doc("CosyVoice2/3 streaming: flow state all streams together may keep so a chunk costs "
             "its own frames, not a recompute of the utterance so far; a stream whose state "
             "would pass it recomputes instead (same audio, quadratic time); 0: never keep; "
             "none: 8192 on the CPU, on a GPU half its memory free after loading, lowered "
             "at warm-up to what fits in 0.6 of it with one call of the largest batch"),
    ] = None  # fmt: skip
    exact_final: Annotated[
        bool,
        _doc("CosyVoice2/3 streaming: end each stream as upstream does, rerunning the flow over "
             "the whole utterance with full attention (bit parity, one non-stream pass more)"),
    ] = False  # fmt: skip
    vocoder_thread: Annotated[
        Literal["auto", "on", "off"],
        _doc("CosyVoice: vocode on a thread (and CUDA stream) of its own, so decode steps go "
             "on while a batch is vocoded (auto: on with a GPU; off on a CPU, where the two "
             "would fight for the cores)"),
    ] = "auto"  # fmt: skip
    graphs: Annotated[
        Literal["auto", "on", "off"],
        _doc("CosyVoice2/3: run decode steps, first inputs, flow calls and the vocoder's filter "
             "at static shapes, replayed as CUDA graphs (auto: on with a GPU; off: eagerly at "
             "each call's shapes; on a CPU, on runs the static shapes eagerly, which only tests "
             "them); /metrics counts the calls of each way"),
    ] = "auto"  # fmt: skip
    packed: Annotated[
        Literal["auto", "on", "off"],
        _doc("CosyVoice: run the LLM's linears over weights packed once for oneDNN (auto: on an "
             "x86 CPU in float32, decode steps 1.5-1.9x faster at batch 8-64 and up to 10% slower "
             "at batch 1, or in bfloat16 on bf16 matrix units, 1.2-1.3x at batch 1-16), in "
             "float32 the flow's too (a first chunk 1.14x faster); off: torch's kernels"),
    ] = "auto"  # fmt: skip
    scheduler: Annotated[
        Literal["batch", "serial"], _doc("serial: one job at a time (benchmark baseline)")
    ] = "batch"
    warmup: Annotated[bool, _doc("synthesize once before serving")] = True
    malloc_arenas: Annotated[
        Count,
        _doc("glibc malloc arenas; fewer hand back more of what a long request used "
             "(0: glibc's default, 8 per core; MALLOC_ARENA_MAX in the environment wins)"),
    ] = 4  # fmt: skip
    drain_timeout_s: Annotated[
        Seconds, _doc("on SIGTERM, let streams finish this long, then end the rest")
    ] = 30.0
    replicas: Annotated[
        Count,
        _doc("run this many replicas on Ray Serve behind one endpoint (needs the `cluster` "
             "extra); 0: one server in this process, no Ray"),
    ] = 0  # fmt: skip
    ray_address: Annotated[
        str | None,
        _doc("join this Ray cluster (`HOST:PORT` of `ray start --head`, or `auto`) instead "
             "of starting one on this machine; implies at least one replica"),
    ] = None  # fmt: skip
    replica_cpus: Annotated[
        float, _doc("CPUs Ray reserves for each replica (fractions pack several on a core)", ge=0)
    ] = 1.0
    replica_gpus: Annotated[
        float, _doc("GPUs for each replica (0.5: two replicas share a GPU); not with --device cpu",
                    ge=0),
    ] = 0.0  # fmt: skip
    min_replicas: Annotated[Count, _doc("autoscaling: fewest replicas")] = 1
    max_replicas: Annotated[
        Count, _doc("autoscaling: most replicas (0: a fixed --replicas, no autoscaling)")
    ] = 0
    log_format: Annotated[Literal["text", "json"], _doc("log lines as text or JSON")] = "text"
    log_level: Annotated[
        Literal["critical", "error", "warning", "info", "debug"], _doc("log level")
    ] = "info"

    @property
    def on_ray(self) -> bool:
        """Whether `serve` deploys replicas on Ray Serve instead of serving in-process."""
        return bool(self.replicas or self.ray_address or self.max_replicas)

    @property
    def streams(self) -> int:
        """--max-streams, or (0) its default for where the engine runs."""
        return self.max_streams or (GPU_STREAMS if self.on_gpu else CPU_STREAMS)

    @property
    def on_gpu(self) -> bool:
        """Whether the engine runs on a GPU: CosyVoice with --device cuda (auto: one is
        visible), or replicas given GPUs (the driver that deploys them may have none)."""
        if self.model is None:  # the built-in voice runs on the CPU
            return False
        if self.replica_gpus:
            return True
        from cosyvoice.devices import resolve_device  # the engine's own rule for `auto`

        try:
            return resolve_device(self.device).type == "cuda"
        except RuntimeError:  # not a device: check_engine says so, in one line
            return False

    @property
    def initial_replicas(self) -> int:
        return max(self.replicas, 1)  # --ray-address alone: one replica

    def check_cluster(self) -> None:
        """The rules between cluster settings that no flag's own bounds can say. Not checked
        on every Settings: the environment alone may be half of a valid configuration."""
        if self.replica_gpus and self.device == "cpu":
            raise SettingsError(
                "--replica-gpus: set --device cuda too (each replica sees its GPUs)"
            )
        if self.max_replicas and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise SettingsError(
                "--max-replicas: autoscaling needs --min-replicas <= --replicas <= "
                f"--max-replicas (got {self.min_replicas}, {self.initial_replicas}, "
                f"{self.max_replicas})"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        raw: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            value = env.get(f"{ENV_PREFIX}{name.upper()}")
            if value is not None:  # lists: comma-separated, and empty when the variable is
                raw[name] = [v for v in value.split(",") if v] if name in LIST_SETTINGS else value
        return load(raw, source="environment")

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (CLI flags) applied and validated."""
        return load({**msgspec.structs.asdict(self), **changes}, source="flags")


# Repeatable settings (a list in Settings): repeated flags, comma-separated variables.
LIST_SETTINGS = tuple(
    k for k, v in msgspec.structs.asdict(Settings()).items() if isinstance(v, list)
)
SECRET_SETTINGS = ("api_key", "admin_key")  # never shown in help or logs
OPTIONAL_SETTINGS = ("model", "speaker_dir", "ray_address", "flow_cache_mb")  # None by default


class SettingsError(ValueError):
    """A setting that does not parse or is out of bounds; the message is one line for a person."""


def _decode(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(kind)


def load(raw: dict[str, Any], source: str) -> Settings:
    # Empty strings mean "unset" for the optional settings (RTSERVER_MODEL= on the command line).
    raw = {k: (None if v == "" and k in OPTIONAL_SETTINGS else v) for k, v in raw.items()}
    try:
        return msgspec.convert(raw, Settings, strict=False, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        raise SettingsError(_explain(str(exc), source)) from None


def _explain(message: str, source: str) -> str:
    """msgspec's "... - at `$.port`" as the flag or variable the person typed."""
    text, _, where = message.partition(" - at `$.")
    name = where.rstrip("`").split("[")[0]  # api_key[0]: a value of a repeatable flag
    if not name:
        return f"invalid settings ({source}): {text}"
    flag = f"--{name.replace('_', '-')}" if source == "flags" else f"{ENV_PREFIX}{name.upper()}"
    one_of = choices().get(name)
    return f"{flag}: {text}" + (f" (one of: {', '.join(one_of)})" if one_of else "")


def help_texts() -> dict[str, str]:
    """Each setting's help text (its Meta description), with its values where they are few."""
    hints = typing.get_type_hints(Settings, include_extras=True)
    texts = {
        name: next((m.description for m in getattr(hint, "__metadata__", ()) if m.description), "")
        for name, hint in hints.items()
    }
    for name, values in choices().items():
        texts[name] += f"; one of: {', '.join(values)}"
    return texts


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """The settings that take one of a few values (a Literal), and those values."""
    hints = typing.get_type_hints(Settings)
    return {
        name: typing.get_args(hint)
        for name, hint in hints.items()
        if typing.get_origin(hint) is Literal
    }
