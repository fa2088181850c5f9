"""Prometheus metrics (prometheus-client), one registry per server.

Counts that the scheduler already keeps (completed, cancelled, failed, ...) and its live
gauges are read from it at scrape time, so nothing is counted twice; what only exists as
events (time to first audio, real-time factor, batch sizes, requests by route and status) is
observed as it happens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rtserver.engine import Job

# Prometheus text format 0.0.4; Litestar adds "; charset=utf-8" to a text/* media type.
CONTENT_TYPE = "text/plain; version=0.0.4"
# In a request's scope: the status the connection under the app (rtserver/api/connection.py)
# answered itself while the app still read the request (408: it did not arrive in time).
ANSWERED = "rtserver.answered"
CLIENT_GONE = 499  # nginx's "client closed request": the client left before any answer
SCHEDULER_COUNTERS = {
    "completed": "Jobs that finished with all their audio.",
    "cancelled": "Jobs cancelled by their client (disconnect, cancel, barge-in).",
    "failed": "Jobs the engine failed on.",
    "dropped": "Jobs ended by a limit (the audio cap, a client that stopped reading, an idle "
    "context, the drain's deadline) or whose speaker was deleted while they waited.",
    "rejected": "Jobs refused at capacity (503 / busy).",
    "steps": "Engine steps run.",
}


class _SchedulerCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.snapshot()
        for name, doc in SCHEDULER_COUNTERS.items():
            yield CounterMetricFamily(f"rtserver_jobs_{name}", doc, value=s[name])
        yield CounterMetricFamily(
            "rtserver_audio_seconds", "Audio produced, all jobs.", value=s["audio_s"]
        )
        yield CounterMetricFamily(
            "rtserver_segments_truncated", "Segments (sentences, text-streaming pieces) whose speech "
            "ended at a limit of the model (its length cap, the flow's 300 s, a full KV pool) "
            "before all their text was spoken.", value=s["segments_truncated"],
        )  # fmt: skip
        yield GaugeMetricFamily("rtserver_jobs_active", "Jobs admitted now.", value=s["active"])
        yield GaugeMetricFamily("rtserver_jobs_queued", "Jobs waiting now.", value=s["queued"])
        yield GaugeMetricFamily(
            "rtserver_max_streams", "Admission capacity.", value=s["max_streams"]
        )
        for name, value in s.items():
            if name.startswith("held_"):
                yield GaugeMetricFamily(
                    f"rtserver_engine_{name}", "Engine memory units jobs hold now.", value=value
                )


class _HeldCollector(Collector):
    """What the server holds for its clients now (sessions, sockets): each must come back to
    zero when its client is gone, so a leak shows as a gauge that never falls."""

    def __init__(self, held: Callable[[], dict[str, int]]) -> None:
        self.held = held

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, value in self.held().items():
            yield GaugeMetricFamily(f"rtserver_{name}", f"Client {name.replace('_', ' ')}.",
                                    value=value)  # fmt: skip


ENGINE_STATS = {  # name in an engine's stats(): (counter?, help)
    "prompts": (False, "Speakers' prompts the flow keeps computed, for streams to start from."),
    "prompt_bytes": (False, "Memory those prompts take."),
    "prompt_hits": (True, "Streams that started from a kept prompt."),
    "prompt_misses": (True, "Streams with a prompt that was not kept (yet)."),
}


class _EngineCollector(Collector):
    """What an engine keeps between jobs (CosyVoice2/3: the flow's prompt store)."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, value in self.stats().items():
            counter, doc = ENGINE_STATS[name]
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(f"rtserver_flow_{name}", doc, value=value)


class _GraphCollector(Collector):
    """How each CosyVoice stage (llm, flow, vocoder) runs: whether at CUDA graphs' static
    shapes, and its calls by way. On a GPU every call that is not ``replayed`` launches its
    kernels one by one: a failed capture (graphs 0) or calls past the largest bucket show
    here before they show in the time to first audio."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        on = GaugeMetricFamily(
            "rtserver_engine_graphs", "1 while the stage runs at CUDA graphs' static shapes "
            "(0: off, or dropped after a failed capture).", labels=["stage"],
        )  # fmt: skip
        calls = CounterMetricFamily(
            "rtserver_engine_calls", "A stage's calls: replayed (a captured CUDA graph), static "
            "(its static shapes run eagerly: a CPU, or a bucket waiting for its capture) or "
            "dynamic (eagerly at the call's own shapes).", labels=["stage", "mode"],
        )  # fmt: skip
        for stage, s in self.stats().items():
            on.add_metric([stage], s["graphs"])
            for mode, n in s["calls"].items():
                calls.add_metric([stage, mode], n)
        yield on
        yield calls


class Metrics:
    def __init__(self, replica: str | None = None) -> None:
        self.registry = CollectorRegistry()
        if replica is not None:  # one of several replicas: a scrape says whose numbers these are
            Info("rtserver_replica", "The Ray Serve replica these metrics are from.",
                 registry=self.registry).info({"replica": replica})  # fmt: skip
        self.requests = Counter(
            "rtserver_http_requests", "HTTP requests by route and status.",
            ["route", "status"], registry=self.registry,
        )  # fmt: skip
        self.ttfa = Histogram(
            "rtserver_ttfa_seconds", "A stream's first text to its first audio.",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
        )  # fmt: skip
        self.rtf = Histogram(
            "rtserver_rtf", "Processing time over audio time, per finished job.",
            registry=self.registry, buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10),
        )  # fmt: skip
        self.batch = Histogram(
            "rtserver_batch_size", "Jobs advanced by one engine step.", registry=self.registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
        )  # fmt: skip

    def watch(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_SchedulerCollector(snapshot))

    def watch_held(self, held: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_HeldCollector(held))

    def watch_engine(self, stats: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_EngineCollector(stats))

    def watch_graphs(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_GraphCollector(stats))

    # ---- called by the scheduler (inference thread; prometheus-client is thread-safe) -------

    def step(self, batch: int) -> None:
        self.batch.observe(batch)

    def first_audio(self, job: Job) -> None:
        if job.ttfa is not None:
            self.ttfa.observe(job.ttfa)

    def done(self, job: Job) -> None:
        if job.rtf is not None:
            self.rtf.observe(job.rtf)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def count_requests(app: ASGIApp, metrics: Metrics) -> ASGIApp:
    """Middleware: count each HTTP response by its route template (bounded labels) and the
    status its client got. An app that learns the client is gone before it answers (the
    connection dropped, or refused the request itself: 408) answers into the void, often a
    500 for the body it could not read; that status is not the one the client got."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        gone = False

        async def watching_receive() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = scope.get(ANSWERED, CLIENT_GONE) if gone else message["status"]
                route = scope.get("path_template", "unmatched")
                metrics.requests.labels(route, str(status)).inc()
            await send(message)

        await app(scope, watching_receive, counting_send)

    return wrapped
