"""Server assembly and lifecycle: build the engine and the gRPC server, bind, drain, stop.

``create_server`` binds (port 0 = ephemeral) and returns ``(server, port)`` so tests run a real
server in-process. ``start`` imports the preload modules (a failure stops it) while the
runtimes start, loads the named pipelines (``pipelines_dir``) and starts watching their
directory, then serves with health NOT_SERVING until the start-up warm-up (``_warmup``) is done;
each named pipeline has a health service of its own (``PIPELINE_HEALTH_PREFIX`` + name).
``stop`` is idempotent: the pipeline watcher stops, health goes NOT_SERVING so balancers stop
sending, in-flight calls get the grace period, then the runtimes shut down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tensorline.oip.v2 import SERVICE_NAME as OIP_SERVICE_NAME
from tensorline.server._logging import console_line
from tensorline.server._memory import keep_heap_buffers
from tensorline.server._preload import preload
from tensorline.server._settings import Settings
from tensorline.server.executor import PipelineEngine
from tensorline.server.manifest import ManifestLimits
from tensorline.server.nodes import NodeRegistry
from tensorline.server.repository import PipelineRepository
from tensorline.server.runtime import InProcessRuntime, Runtime, SandboxRuntime
from tensorline.server.selector import INPROCESS, SANDBOX, Selector
from tensorline.server.service._admission import Admission
from tensorline.server.service._auth import BearerTokenInterceptor
from tensorline.server.service._inference import InferenceService
from tensorline.server.service._service import PipelineService
from tensorline.server.service._telemetry import Telemetry
from tensorline.server.service._warmup import warm_up
from tensorline.v1 import SERVICE_NAME

log = logging.getLogger(__name__)

# gRPC health service name of one named pipeline: this prefix + the pipeline's name.
PIPELINE_HEALTH_PREFIX = f"{SERVICE_NAME}/pipeline/"


def grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]
    if settings.max_connection_age_s is not None:
        # Behind an L4 balancer one HTTP/2 connection pins a client to one replica: closing
        # connections after an age makes clients reconnect and spread again.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    client_ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def build_engine(settings: Settings, registry: NodeRegistry | None = None) -> PipelineEngine:
    registry = registry or NodeRegistry.default(
        modules=settings.node_modules,
        untrusted_modules=settings.untrusted_modules,
        entry_points=settings.load_entry_points,
    )
    if registry.optional:  # once per server, not on every client-side catalogue
        by_missing: dict[tuple[str, ...], list[str]] = {}
        for node_type, missing in sorted(registry.optional.items()):
            by_missing.setdefault(missing, []).append(node_type)
        for missing, types in by_missing.items():
            log.info("node types %s not available: optional dependency %s not installed",
                     ", ".join(types), ", ".join(missing))
    runtimes: dict[str, Runtime] = {
        INPROCESS: InProcessRuntime(threads=settings.node_threads,
                                    shutdown_timeout_s=max(1.0, settings.grace_s),
                                    warm_capacity=settings.warm_instances,
                                    inline_max_s=settings.inline_sync_max_ms / 1000),
    }
    if settings.sandbox:
        runtimes[SANDBOX] = SandboxRuntime(
            workers=settings.sandbox_workers,
            max_workers=settings.sandbox_max_workers,
            memory_mb_default=settings.sandbox_memory_mb,
            domains=tuple(settings.untrusted_modules),
            cpu_seconds=settings.sandbox_cpu_seconds,
            call_timeout_s=settings.sandbox_call_timeout_s,
            scratch_root=(str(settings.sandbox_scratch_dir)
                          if settings.sandbox_scratch_dir else None),
            max_message_bytes=settings.max_message_bytes,
            namespaces=settings.sandbox_namespaces,
            landlock=settings.sandbox_landlock,
            seccomp=settings.sandbox_seccomp,
            devices=settings.sandbox_devices,
            threads=settings.sandbox_threads,
            scratch_mb=settings.sandbox_scratch_mb,
            fsize_mb=settings.sandbox_file_mb,
            nofile=settings.sandbox_open_files,
            read_paths=settings.sandbox_read_paths,
            model_paths=settings.model_roots,
            environment=settings.sandbox_env,
            separate_uids=settings.sandbox_separate_uids,
            max_calls=settings.sandbox_max_calls,
            recycle_rss_mb=settings.sandbox_recycle_rss_mb,
            probe_interval_s=settings.sandbox_probe_interval_s,
            idle_s=settings.sandbox_idle_s,
            required_layers=settings.sandbox_required_layers,
            preload_modules=settings.preload_modules,
            co_locate=settings.sandbox_co_locate,
            batch_wait_s=settings.sandbox_batch_wait_ms / 1000.0,
        )
    selector = Selector(env_runtime=settings.runtime, fallback_enabled=settings.enable_fallback,
                        sandbox_available="sandbox" in runtimes)
    return PipelineEngine(registry, selector, runtimes, plan_cache_size=settings.plan_cache_size,
                          plan_cache_bytes=settings.plan_cache_bytes,
                          limits=ManifestLimits(max_manifest_bytes=settings.max_manifest_bytes,
                                                max_json_depth=settings.max_json_depth),
                          model_roots=settings.model_roots)


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """gRPC health whose Watch calls end when the server stops. The stock servicer keeps a Watch
    open until the gRPC server cancels it, so one open Watch made every shutdown wait out its
    whole grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._ended = asyncio.Event()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watching = asyncio.ensure_future(super().Watch(request, context))
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({watching, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, ended):
                task.cancel()
            await asyncio.gather(watching, ended, return_exceptions=True)

    def end_watches(self) -> None:
        """End every Watch (with OK): called once NOT_SERVING has gone out and the work in
        flight is done, so the watchers have seen it and nothing waits on them."""
        self._ended.set()


class TensorlineServer:
    """A running tensorline server: gRPC server + health + engine."""

    def __init__(self, settings: Settings, engine: PipelineEngine, server: grpc.aio.Server,
                 health_servicer: HealthServicer, port: int, telemetry: Telemetry,
                 service: PipelineService, repository: PipelineRepository | None = None) -> None:
        self.service = service
        # The named pipelines (``pipelines_dir``), when this server serves any.
        self.repository = repository
        self.settings = settings
        self.engine = engine
        self.grpc = server
        self.health = health_servicer
        self.port = port
        self.telemetry = telemetry
        self.metrics_port: int | None = None
        self.draining = False
        self._stopping: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._serving: bool | None = None
        self._warming: asyncio.Task[None] | None = None
        # True from start() until the warm-up ends (a flag: the task's own end comes later).
        self._warm_up_running = False
        # Names whose pipeline health was ever set (a removed one is set NOT_SERVING).
        self._pipeline_names: set[str] = set()

    async def start(self) -> None:
        # The server imports what the operator named (PreloadError names a module that fails)
        # while the runtimes start: the sandbox launcher, a process of its own, imports the same
        # modules before its first fork (``runtime.sandbox._zygote``), so the two imports run
        # on two cores at once instead of one after the other. The import runs in a thread so
        # the loop can meanwhile start the launcher and ask it for the workers.
        starting = asyncio.ensure_future(self.engine.start())
        try:
            if self.settings.preload_modules:
                await asyncio.to_thread(preload, self.settings.preload_modules)
        except BaseException:
            await asyncio.gather(starting, return_exceptions=True)
            await self.engine.shutdown()
            raise
        await starting
        # The untrusted modules' catalogues come from sandboxed workers, so only now, and
        # before any request can be served.
        await self.engine.load_untrusted(self.settings.untrusted_modules)
        if self.repository is not None:
            # After the node modules: the manifests name their node types.
            self.repository.on_change = self._pipeline_health
            await self.repository.start()
            if self.settings.pipelines_watch:
                await self.repository.watch()
        await self.grpc.start()
        if self.settings.metrics_port is not None:
            self.metrics_port = self.telemetry.serve_http(self.settings.metrics_host,
                                                          self.settings.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics_host,
                     self.metrics_port)
        # (The sandbox runtime logs its layers once, when its workers have started.)
        if self.settings.warmup_nodes:
            # Calls are accepted meanwhile (they are just not warm yet); health says NOT_SERVING
            # so balancers and readiness probes send traffic only once the warm-up is done.
            self._warm_up_running = True
            self._warming = asyncio.ensure_future(self._warm_up())
        await self._set_health(serving=self._ready())
        self._watcher = asyncio.ensure_future(self._watch_health())
        log.info("tensorline serving on port %d (instance %s)", self.port,
                 self.settings.instance_id)

    async def _warm_up(self) -> None:
        try:
            await asyncio.wait_for(warm_up(self.engine, self.settings.warmup_nodes),
                                   self.settings.warmup_timeout_s)
        except TimeoutError:
            log.error("warm-up not finished within %.1f s (warmup_timeout_s): abandoned",
                      self.settings.warmup_timeout_s)
        except Exception:
            log.exception("warm-up failed (the server serves regardless)")
        finally:
            self._warm_up_running = False
        if not self.draining:
            serving = self._ready()
            log.info("warm-up over; health %s", "SERVING" if serving else "NOT_SERVING")
            await self._set_health(serving=serving)

    @property
    def warming(self) -> bool:
        """True while the start-up warm-up runs (health is NOT_SERVING meanwhile)."""
        return self._warm_up_running

    async def warmed(self) -> None:
        """Wait until the start-up warm-up (if any) is over, however it ended (also cancelled by
        ``stop``)."""
        if self._warming is not None:
            await asyncio.wait({self._warming})

    def _ready(self) -> bool:
        """What health reports: every runtime can execute, and the warm-up is over."""
        return self.engine.healthy() and not self.warming

    def ready(self) -> bool:
        """Whether the server takes work now: ready as health reports it, and not draining
        (the Open Inference Protocol's ServerReady)."""
        return self._ready() and not self.draining

    async def _set_health(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _pipeline_health(self) -> None:
        """Per named pipeline, health service ``PIPELINE_HEALTH_PREFIX + name``: SERVING while a
        version of it takes calls. A name no file defines any more goes NOT_SERVING (the stock
        servicer cannot forget a name; a Watch on it ends that way)."""
        if self.repository is None or self.draining:
            return
        serving = {state.name for state in self.repository.states() if state.state == "READY"}
        for name in self._pipeline_names | {s.name for s in self.repository.states()}:
            await self.health.set(PIPELINE_HEALTH_PREFIX + name,
                                  health_pb2.HealthCheckResponse.SERVING if name in serving
                                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self._pipeline_names |= {s.name for s in self.repository.states()}

    async def _watch_health(self) -> None:
        """Keep gRPC health in step with the engine: SERVING only while every runtime can
        execute (e.g. the sandbox pool has live workers), so balancers stop routing otherwise."""
        while not self.draining:
            serving = self._ready()
            if serving != self._serving:
                log.warning("health: %s", "SERVING" if serving else
                            "NOT_SERVING (a runtime cannot execute)")
                await self._set_health(serving)
            await asyncio.sleep(self.settings.health_interval_s)

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; safe to call more than once (later calls wait for the first)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(
                self.settings.grace_s if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        self.draining = True
        if self.repository is not None:
            # No pipeline is loaded or swapped while the server drains.
            await self.repository.stop_watching()
        for task in (self._watcher, self._warming):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay_s:
            # Keep serving while balancers and probes notice NOT_SERVING.
            await asyncio.sleep(self.settings.drain_delay_s)
            deadline += self.settings.drain_delay_s
        # New executions and streams are refused with UNAVAILABLE (clients retry elsewhere)
        # while the ones in flight finish; only then is the gRPC server stopped, because its
        # stop() cancels calls it accepted but had not yet handed to a handler.
        self.service.admission.draining = True
        if not await self.service.admission.wait_idle(grace):
            log.warning("drain: grace of %.1f s over with work in flight; cancelling it", grace)
        self.health.end_watches()
        await self.grpc.stop(max(0.0, deadline - loop.time()))
        if self.repository is not None:
            await self.repository.close()
        await self.engine.shutdown()
        self.telemetry.close()
        log.info("tensorline stopped")

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


async def create_server(
    settings: Settings | None = None,
    *,
    registry: NodeRegistry | None = None,
    engine: PipelineEngine | None = None,
) -> tuple[TensorlineServer, int]:
    """Build and bind a server (not started). Returns the server and its bound port."""
    settings = settings or Settings()
    # Process-wide: a server is what this process is for (0 in the settings opts out).
    keep_heap_buffers(settings.heap_buffer_bytes)
    engine = engine or build_engine(settings, registry)
    admission = Admission(settings.max_concurrent_executions, settings.max_concurrent_streams)
    telemetry = Telemetry(engine, admission)
    engine.executor.observer = telemetry.observe_node
    interceptors = [BearerTokenInterceptor(settings.auth_tokens)] if settings.auth_tokens else []
    server = grpc.aio.server(options=grpc_options(settings), interceptors=interceptors)
    repository = (PipelineRepository(engine, settings.pipelines_dir,
                                     warm_timeout_s=settings.warmup_timeout_s)
                  if settings.pipelines_dir is not None else None)
    service = PipelineService(engine, settings, admission, telemetry, repository)
    # The Open Inference Protocol on the same port, behind the same interceptors, admission
    # and telemetry.
    inference = InferenceService(engine, settings, admission, telemetry, repository)
    server.add_generic_rpc_handlers((service.handler(), inference.handler()))
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            server)
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    credentials = server_credentials(settings)
    address = f"{host}:{settings.port}"
    check_bindable(settings.host, settings.port)
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:  # gRPC's "Failed to bind ...; set GRPC_VERBOSITY=debug"
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    tensorline_server = TensorlineServer(settings, engine, server, health_servicer, port,
                                         telemetry, service, repository)
    inference.is_server_ready = tensorline_server.ready
    return tensorline_server, port


_BIND_REASONS = {
    errno.EADDRINUSE: "address already in use (is another server running on this port?)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def check_bindable(host: str, port: int) -> None:
    """OSError naming the address and the reason when ``host:port`` cannot be bound. gRPC's own
    failure says neither why nor, in its exception, much at all, and prints a C-level log line
    to stderr first: asking the OS beforehand gives one clear message instead."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: SO_REUSEADDR, so a port in TIME_WAIT is not "in use".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                # Other errors (e.g. no IPv6 for "localhost"'s ::1) are gRPC's to judge: it
                # listens when any one resolved address binds.
                if exc.errno in _BIND_REASONS:
                    raise OSError(f"cannot listen on {host}:{port}: "
                                  f"{_BIND_REASONS[exc.errno]}") from None


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain within ``settings.grace_s`` and return."""
    server, port = await create_server(settings)
    await server.start()
    scheme = "tls" if settings.tls_cert_file else "plaintext"
    # On stdout, for whoever started the server to read the port from: a log line under
    # --log-format json, so that every line the server prints is JSON.
    print(console_line(f"tensorline listening on {settings.host}:{port} ({scheme}, instance "
                       f"{settings.instance_id})", settings.log_format, logger=__name__),
          flush=True)
    loop = asyncio.get_running_loop()
    log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", settings.grace_s)
    await server.stop()
    log.info("drained; exiting")
