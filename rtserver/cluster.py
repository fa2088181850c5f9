"""`rtserver serve --replicas N`: the same app in N Ray Serve replicas behind one endpoint.

Each replica is a Ray actor that builds the app exactly as `rtserver serve` does, with its own
engine, scheduler and limits. Serve's HTTP proxy (one per node, on --host/--port) sends each
request or WebSocket to a replica with room, and a WebSocket stays on the replica it opened
on. A replica's room is its scheduler's --max-streams (Serve's `max_ongoing_requests`); when
every replica is full, requests wait at the proxy, at most --max-queue of them, and the rest
get 503 with Retry-After.

The command starts a Ray cluster on this machine, or joins one (--ray-address), deploys the
app and waits. SIGTERM or SIGINT undeploys it: every replica drains as `rtserver serve` does,
then stops; Serve, and the Ray cluster, stop too when this command started them. A second
signal exits at once. Only `rtserver serve` with a cluster flag imports this module, so plain
`serve` never imports ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.config
import os
import signal
import socket
import threading
import time
from types import FrameType
from typing import Any

import ray
from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from ray import serve
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from rtserver.memory import arena_env
from rtserver.settings import Settings, SettingsError
from rtserver.signals import StopSignals

APP = "rtserver"  # the Serve application's name; one per Ray cluster
DEPLOYMENT = "tts"
NAMESPACE = "rtserver"
DRAIN_ORDER = "drain-order"  # the DrainOrder actor's name
STOP_MARGIN_S = 5.0  # beyond --drain-timeout-s: to tell the sockets, and let them close

log = logging.getLogger("rtserver.cluster")
ACCESS = logging.getLogger("rtserver.access")  # configured as uvicorn.access (rtserver.logs)


@ray.remote(num_cpus=0)
class DrainOrder:
    """Set by the command on SIGTERM; every replica waits on it. Serve's own stop only waits
    for requests to end, and a WebSocket never ends by itself, so each replica first drains
    as `rtserver serve` does: no new sessions, streams get --drain-timeout-s, sockets are told
    `shutting_down`. The command owns this actor: a replica whose command is gone (or that
    was deployed without one) never drains this way and stops as Serve stops it. Each replica
    reports when its drain is over, and the app is deleted only then (or at the deadline)."""

    def __init__(self) -> None:
        self.given = asyncio.Event()
        self.drained = 0

    async def wait(self) -> None:
        await self.given.wait()

    def give(self) -> None:
        self.given.set()

    def done(self) -> None:
        self.drained += 1

    def count(self) -> int:
        return self.drained


@serve.ingress()  # the app is built on the replica (__serve_build_asgi_app__), not pickled
class Replica:
    """One replica: the whole app, its engine loaded in the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.litestar: Litestar | None = None
        self.drain_order: asyncio.Task | None = None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from rtserver.app import create_app, served, with_replica
        from rtserver.logs import log_config

        s = self.settings
        logging.config.dictConfig(log_config(s.log_level, s.log_format))
        replica = serve.get_replica_context().replica_id.unique_id
        self.litestar = create_app(s, replica=replica)
        self.drain_order = asyncio.get_running_loop().create_task(self._drain_when_told())
        return _access_log(_one_request_id(with_replica(served(self.litestar), replica)))

    async def _drain_when_told(self) -> None:
        try:
            order = ray.get_actor(DRAIN_ORDER, namespace=NAMESPACE)
            await order.wait.remote()
        except (ValueError, RayActorError):  # no such actor, or its command died
            return
        service = getattr(self.litestar.state, "service", None) if self.litestar else None
        if service is not None:
            await service.drain(self.settings.drain_timeout_s)
        with contextlib.suppress(RayActorError):  # the command gave up waiting and went
            await order.done.remote()


def _one_request_id(app: ASGIApp) -> ASGIApp:
    """Serve's proxy answers `x-request-id` on HTTP responses itself, with the id it put in
    the request, which the app adopted: drop the app's copy there so the header comes once.
    WebSocket accepts keep the app's (the proxy adds none)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, sending)

    return wrapped


def _access_log(app: ASGIApp) -> ASGIApp:
    """Serve's access lines name the route prefix, not the path: `POST / 200` for /tts and
    /v1/audio/speech alike. The replica writes the plain server's lines instead (uvicorn's
    format, the query's values left out, the flood bound; a WebSocket's upgrade as its 101
    or refusal), and Serve's are off. Not on uvicorn.access: a uvicorn.Config made in the
    replica without an access log removes that logger's handlers."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        method = scope.get("method", "WebSocket")

        async def sending(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start", "websocket.accept"):
                status = message.get("status", 101)
                ACCESS.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), method,
                            get_path_with_query_string(scope), scope["http_version"],
                            status)  # fmt: skip
            await send(message)

        await app(scope, receive, sending)

    return wrapped


def application(settings: Settings) -> serve.Application:
    s = settings
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {
            "num_cpus": s.replica_cpus,
            "num_gpus": s.replica_gpus,
            "runtime_env": {"env_vars": arena_env(s.malloc_arenas)},
        },
        "max_ongoing_requests": s.streams,
        "max_queued_requests": s.max_queue,
        "backpressure_config": {"retry_after_s": 1},  # as the replicas' own 503s say
        "graceful_shutdown_timeout_s": s.drain_timeout_s + STOP_MARGIN_S,
        "graceful_shutdown_wait_loop_s": 0.5,
        # A replica that cannot start (a bad model dir) fails the same way each time: say so
        # after a few tries instead of Serve's default twenty.
        "max_constructor_retry_count": 3,
        "logging_config": {"enable_access_log": False},  # the replica's own: _access_log
    }
    if s.max_replicas:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "initial_replicas": s.initial_replicas,
            "max_replicas": s.max_replicas,
            # Scale out at half of a replica's room: a new one takes a while to load its model.
            "target_ongoing_requests": max(1, s.streams // 2),
        }
    else:
        options["num_replicas"] = s.initial_replicas
    return serve.deployment(Replica, **options).bind(settings)


def app(args: dict[str, Any]) -> serve.Application:
    """The application for a Serve config file, where no `rtserver serve` command runs (e.g.
    a KubeRay RayService, docs/deploy.md): `import_path: rtserver.cluster:app`, and `args`
    are settings by name (`model: /models/CosyVoice2-0.5B`, `replicas: 2`, ...) over the
    RTSERVER_* variables. Without the command no drain order comes: Serve stops replicas
    by its own rules."""
    settings = Settings.from_env().replace(**args)
    settings.check_cluster()
    return application(settings)


def run(settings: Settings) -> None:
    """Start or join a Ray cluster, deploy, serve until a signal, undeploy."""
    started_ray = _connect(settings)
    stop = threading.Event()
    signals = _catch_signals(stop)
    started_serve = False
    drain_order = None
    stage = "connected"  # -> "deploying" -> "serving": what there is to undo
    try:
        status = serve.status()
        if APP in status.applications:
            raise SettingsError(
                f"an app named {APP!r} already runs on this Ray cluster (another `rtserver "
                "serve`?): stop it first"
            )
        started_serve = not status.proxies
        if not started_serve:
            log.warning("Serve already runs on this cluster: its proxies keep their host/port")
        serve.start(http_options={"host": settings.host, "port": settings.port})
        drain_order = DrainOrder.options(name=DRAIN_ORDER, namespace=NAMESPACE).remote()
        stage = "deploying"
        target = serve.RunTarget(application(settings), name=APP, route_prefix="/")
        serve.run_many([target], wait_for_applications_running=False)
        if not _wait_running(stop):
            return
        stage = "serving"
        log.info("ready: %d replicas on http://%s:%d (Ray cluster %s)", _replicas(),
                 settings.host, settings.port, ray.get_runtime_context().gcs_address)  # fmt: skip
        stop.wait()
    finally:
        if stop.is_set():
            log.info("stopping (a second signal exits at once)")
        try:
            _undeploy(settings, stage, started_serve, drain_order)
        finally:
            ray.shutdown()  # stops the cluster if this process started it, else disconnects
            for sig, previous in signals.items():
                signal.signal(sig, previous)
            log.info("stopped%s", " and the local Ray cluster" if started_ray else "")


def _wait_running(stop: threading.Event) -> bool:
    """Wait for every replica to be up (models load meanwhile); False if a signal came
    first. A signal handler must not raise into Ray's blocking calls, hence this poll."""
    while not stop.wait(0.5):
        app = serve.status().applications.get(APP)
        if app is None or app.status == "DEPLOY_FAILED":
            raise SettingsError(f"the deployment failed: {app.message if app else 'gone'}")
        if app.status == "RUNNING":
            return True
    return False


def _replicas(state: str | None = None) -> int:
    """The app's replicas (in ``state`` only, if given: RUNNING, STARTING, ...)."""
    deployments = serve.status().applications[APP].deployments.values()
    return sum(
        sum(n for s, n in d.replica_states.items() if state in (None, s)) for d in deployments
    )


def _wait_drained(order: ActorHandle, limit_s: float) -> None:
    """Until every running replica has drained, or ``limit_s``. Meanwhile the app stays
    routed, so new requests and /readyz get the replicas' 503, as from `rtserver serve`,
    not the proxy's 404 for an app that is gone."""
    deadline = time.monotonic() + limit_s
    while ray.get(order.count.remote()) < _replicas("RUNNING") and time.monotonic() < deadline:
        time.sleep(0.2)


def _connect(settings: Settings) -> bool:
    """Join the cluster at --ray-address, or start one on this machine: True if started."""
    # Ray's own logs of the replicas come to this terminal, prefixed with the replica's pid.
    options: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING}
    if settings.ray_address:
        _check_reachable(settings.ray_address)
        try:
            ray.init(address=settings.ray_address, **options)
        except ConnectionError as exc:
            raise SettingsError(f"--ray-address: {exc}") from None
        return False
    # "local": a new cluster of this process even when `ray start` runs on this machine; its
    # processes share this one's fate. No dashboard: nothing here uses it.
    ray.init(address="local", include_dashboard=False, **options)
    return True


def _check_reachable(address: str) -> None:
    """ray.init retries a cluster it cannot reach for good, a warning every 20 s (a wrong
    --ray-address hung 13 minutes; `auto` follows a dead cluster's note in Ray's temp dir):
    one TCP connect first, 5 s at most."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    try:
        if address.startswith("ray://"):  # Ray Client: its server's host:port
            target = address.removeprefix("ray://")
        else:
            target = canonicalize_bootstrap_address_or_die(address)
        host, _, port = target.rpartition(":")
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:  # (ConnectionError: no cluster found for `auto`)
        raise SettingsError(f"--ray-address {address}: no Ray cluster answers ({exc})") from None


def _catch_signals(stop: threading.Event) -> dict[int, Any]:
    """Install the handlers (after ray.init, which installs its own); returns the previous."""

    signals = StopSignals()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not signals.received(signum):
            return
        if stop.is_set():  # a second signal: exit at once (a local cluster dies with us)
            os._exit(128 + signum)
        stop.set()

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def _undeploy(
    settings: Settings, stage: str, started_serve: bool, drain_order: ActorHandle | None
) -> None:
    if stage == "serving" and drain_order is not None:
        log.info("draining the replicas for up to %gs", settings.drain_timeout_s)
        ray.get(drain_order.give.remote())
        _wait_drained(drain_order, settings.drain_timeout_s + STOP_MARGIN_S)
    if stage != "connected":
        serve.delete(APP)  # returns once every replica finished its requests and stopped
    if started_serve and not serve.status().applications:
        serve.shutdown()
