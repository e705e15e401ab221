"""Server settings: one pydantic-settings model read from ``TENSORLINE_*`` environment
variables, an optional YAML/JSON config file, and ``tensorline serve`` flags (highest first:
flags > environment > file > defaults)."""

from __future__ import annotations

import difflib
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

MiB = 1024 * 1024

# Device nodes a GPU node opens read/write: NVIDIA (CUDA), DRM render nodes (Vulkan, OpenCL,
# VA-API) and AMD's compute driver (ROCm). The selector sends ``needs_gpu`` nodes to the sandbox,
# so its workers get these (those that exist) by default.
# Sandbox layers untrusted code requires by default: those a default container profile (no
# namespaces, a non-root user) still provides. See docs/security.md.
DEFAULT_REQUIRED_LAYERS = ("rlimits", "environment", "descriptors", "capabilities", "landlock",
                           "seccomp")
GPU_DEVICES = ("/dev/nvidia*", "/dev/nvidia-caps/*", "/dev/dri/renderD*", "/dev/kfd")


# TENSORLINE_* variables that are not server settings: read by Settings.load (CONFIG), by the
# client commands (SERVER, TOKEN), by docker compose (LB_PORT); TENSORLINE_TEST_* belong to the
# test suite.
NOT_SETTINGS = frozenset({"TENSORLINE_CONFIG", "TENSORLINE_SERVER", "TENSORLINE_TOKEN",
                          "TENSORLINE_LB_PORT"})
_RESERVED_PREFIX = "TENSORLINE_TEST_"


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Settings(BaseSettings):
    """Every knob of the server. Environment: ``TENSORLINE_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(env_prefix="TENSORLINE_", extra="forbid",
                                      validate_default=True)

    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = ephemeral)")
    instance_id: str = Field(default_factory=_default_instance_id,
                             description="replica id reported by GetServerInfo")

    max_message_bytes: int = Field(256 * MiB, gt=0,
                                   description="gRPC send/receive message limit")
    max_tensor_bytes: int = Field(192 * MiB, gt=0, description="largest single tensor accepted")
    plan_cache_size: int = Field(256, ge=0, description="compiled manifests kept")
    plan_cache_bytes: int = Field(64 * MiB, ge=0, description="manifest text the plan cache "
                                                             "keeps at most, bytes")
    max_manifest_bytes: int = Field(4 * MiB, gt=0, description="largest manifest accepted, "
                                                              "bytes of JSON")
    max_json_depth: int = Field(64, ge=1, description="deepest nesting of arrays/objects in a "
                                                      "manifest or a JSON value")
    warm_instances: int = Field(32, ge=0,
                                description="warm reusable node instances kept (LRU)")
    node_threads: int = Field(8, ge=1, description="threads running sync in-process nodes")
    inline_sync_max_ms: float = Field(
        1.0, ge=0, description="a sync in-process node type whose calls all take less than this "
                               "runs on the event loop, without a thread hop; one slower call "
                               "sends it back to the threads (0: always in the threads)")
    stream_queue_size: int = Field(16, ge=1, description="StreamPipeline: values buffered per "
                                                         "node before its producers wait")
    stream_buffer_bytes: int = Field(64 * MiB, gt=0, description="StreamPipeline: bytes "
                                                                 "buffered per node inbox")

    node_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra trusted node modules (comma-separated)")
    untrusted_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="node modules that always run sandboxed")
    load_entry_points: bool = Field(True, description="load the tensorline.nodes entry points")
    preload_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="trusted modules imported at start, in the server and "
                                          "in the sandbox launcher before it forks any worker "
                                          "(comma-separated); never an untrusted module")
    warmup_nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="node types whose declared warm-up inputs run once at "
                                          "start, before health is SERVING (comma-separated; "
                                          "* = every node type that declares some)")
    warmup_timeout_s: float = Field(
        120.0, gt=0, description="longest the start-up warm-up may take; then it is abandoned "
                                 "(logged) and the server reports SERVING")

    pipelines_dir: Path | None = Field(
        None, description="a directory of manifests served as named pipelines (the pipeline "
                          "repository); each is compiled and warmed at start")
    pipelines_watch: bool = Field(
        True, description="with pipelines_dir: pick up new, changed and removed manifests "
                          "without a restart (each is compiled and warmed before it takes "
                          "calls; the version it replaces drains)")
    model_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="directories model files named in node params may come from, besides "
                    "pipelines_dir (comma-separated); sandboxed workers may read them")

    runtime: Literal["inprocess", "sandbox", "auto"] | None = Field(
        None, description="TENSORLINE_RUNTIME: runtime override for nodes without a hint")
    enable_fallback: bool = Field(True, description="TENSORLINE_ENABLE_FALLBACK: run a trusted "
                                                    "node in-process when the sandbox cannot "
                                                    "host it (never after a denial)")

    sandbox: bool = Field(True, description="run the sandboxed worker pool")
    sandbox_workers: int = Field(2, ge=1, description="worker processes started up front")
    sandbox_max_workers: int | None = Field(
        None, ge=1, description="worker processes each trust domain's pool grows to on demand "
                                "(as many more for streaming sessions; default: workers + 2)")
    sandbox_idle_s: float = Field(
        60.0, ge=0, description="retire workers the pool grew for after this long idle "
                                "(0 = never)")
    sandbox_memory_mb: int = Field(
        2048, ge=256, description="default memory cap of a worker (RLIMIT_DATA, RLIMIT_AS), MiB")
    sandbox_cpu_seconds: float = Field(60.0, gt=0, description="CPU seconds one call may use")
    sandbox_call_timeout_s: float = Field(
        300.0, gt=0, description="wall-clock limit of one sandboxed call without a deadline")
    sandbox_scratch_dir: Path | None = Field(
        None, description="where workers get writable scratch dirs (default: a temp dir)")
    sandbox_namespaces: bool = Field(True, description="isolate workers in user+net namespaces")
    sandbox_landlock: bool = Field(True, description="restrict worker file writes with Landlock")
    sandbox_seccomp: bool = Field(True, description="apply the seccomp denylist in workers")
    sandbox_devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(GPU_DEVICES),
        description="device nodes workers may open read/write (comma-separated globs; "
                    "default: the GPU devices)")
    sandbox_threads: int = Field(64, ge=4, description="threads a worker may run (RLIMIT_NPROC; "
                                                       "enforced under a uid of the worker's own or "
                                                       "in its own user namespace)")
    sandbox_scratch_mb: int = Field(512, ge=1, description="disk quota of a worker's scratch "
                                                           "dir (a private tmpfs), MiB")
    sandbox_file_mb: int = Field(256, ge=1, description="largest file a worker may write, MiB")
    sandbox_open_files: int = Field(256, ge=32, description="file descriptors a worker may hold")
    sandbox_read_paths: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra paths workers may read (comma-separated), "
                                          "e.g. a model directory")
    sandbox_env: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="server environment variables passed to workers "
                                          "(comma-separated names); nothing else is")
    sandbox_separate_uids: bool = Field(
        True, description="run each worker under a uid of its own when the server is root")
    sandbox_max_calls: int = Field(0, ge=0, description="replace a worker after this many "
                                                        "calls (0 = never)")
    sandbox_recycle_rss_mb: int | None = Field(
        None, ge=0, description="replace a worker whose peak RSS passes this, MiB (default: "
                                "3/4 of its memory cap; 0 = never)")
    sandbox_probe_interval_s: float = Field(
        30.0, ge=0, description="health-probe workers idle this long (0 = never)")
    sandbox_co_locate: bool = Field(
        True, description="run the worker of a short sandboxed call on the event loop's CPU "
                          "while calls do not overlap (saves two cross-CPU wake-ups)")
    sandbox_batch_wait_ms: float = Field(
        0.0, ge=0, le=100, description="while sandboxed calls overlap, how long a call of a "
                                       "short one-shot node may wait to share its worker round "
                                       "trip with calls of the same node (0: never; pays with "
                                       "many callers at once, costs with a few)")
    sandbox_required_layers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_REQUIRED_LAYERS),
        description="sandbox layers untrusted code requires (comma-separated); missing = "
                    "untrusted nodes refused with FAILED_PRECONDITION")

    max_concurrent_executions: int = Field(
        256, ge=0, description="unary executions in progress before RESOURCE_EXHAUSTED (0 = no limit)")
    max_concurrent_streams: int = Field(
        256, ge=0, description="streaming sessions open before RESOURCE_EXHAUSTED (0 = no limit)")

    auth_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer tokens (comma-separated); empty = no auth")
    tls_cert_file: Path | None = Field(None, description="server certificate chain (PEM)")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA (PEM) for client certificates: set = mutual TLS required")

    metrics_host: str = Field("0.0.0.0", description="address of the Prometheus endpoint")
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="Prometheus /metrics port (unset = off, 0 = ephemeral)")
    log_level: str = Field("INFO", description="logging level")
    log_format: Literal["text", "json"] = Field("text", description="log line format")

    grace_s: float = Field(10.0, ge=0, description="drain grace period on SIGTERM")
    drain_delay_s: float = Field(
        0.0, ge=0, description="seconds between health NOT_SERVING and refusing new calls "
                               "(lets balancers notice first)")
    keepalive_time_s: float = Field(30.0, gt=0, description="HTTP/2 keepalive ping interval")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="keepalive ping timeout")
    max_connection_age_s: float | None = Field(
        300.0, gt=0, description="close connections after this age so clients rebalance")
    max_connection_age_grace_s: float = Field(
        30.0, ge=0, description="time in-flight calls get after max connection age")
    health_interval_s: float = Field(
        1.0, gt=0, description="how often gRPC health is re-checked against the runtimes")
    heap_buffer_bytes: int = Field(
        32 * MiB, ge=0, description="glibc: allocations up to this size (at most 32 MiB) come "
                                    "from the heap and freed ones are kept for reuse, so that "
                                    "large messages do not page-fault on every call; the "
                                    "process keeps up to twice this free per heap (0: the "
                                    "allocator's defaults)")
    reflection: bool = Field(True, description="serve gRPC reflection")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto", description="event loop of `tensorline serve`: uvloop (auto: when installed) "
                            "or the standard asyncio loop")

    @field_validator("node_modules", "untrusted_modules", "preload_modules", "warmup_nodes",
                     "auth_tokens", "sandbox_devices", "sandbox_read_paths", "sandbox_env",
                     "sandbox_required_layers", "model_dirs", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("runtime", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        """Case-insensitive, with the hint aliases the selector accepts (cpython, rust_python...)."""
        if not isinstance(value, str):
            return value
        from tensorline.server.selector import normalize_hint

        return normalize_hint(value)

    @property
    def model_roots(self) -> tuple[str, ...]:
        """Where model files named in params (``nodes.ModelPath``) may come from: the pipeline
        repository, then ``model_dirs``, as absolute paths (each once)."""
        roots = [self.pipelines_dir] if self.pipelines_dir is not None else []
        roots += self.model_dirs
        return tuple(dict.fromkeys(os.path.abspath(root) for root in roots))

    @model_validator(mode="after")
    def _preload_trusted(self) -> Settings:
        """Untrusted code only ever runs in a sandboxed worker: preloading imports in the server
        and in the launcher, outside every isolation layer, so no untrusted module (nor a module
        inside one) may be preloaded."""
        for name in self.preload_modules:
            for untrusted in self.untrusted_modules:
                if name == untrusted or name.startswith(untrusted + "."):
                    raise ValueError(f"preload module {name!r} is (inside) the untrusted module "
                                     f"{untrusted!r}: untrusted code is never imported outside "
                                     "a sandboxed worker")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("mutual TLS (tls_client_ca_file) needs tls_cert_file/tls_key_file")
        return self

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Defaults < config file < environment < ``overrides`` (CLI flags; None = not given)."""
        file_values: dict[str, Any] = {}
        path = config_file or os.environ.get("TENSORLINE_CONFIG")
        if path:
            loaded = yaml.safe_load(Path(path).read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"config file {path} must hold a mapping")
            file_values = loaded
        given = {k: v for k, v in overrides.items() if v is not None}
        cls.check_environment(os.environ)
        env_values = cls().model_dump(exclude_unset=True)
        return cls.model_validate({**file_values, **env_values, **given})

    @classmethod
    def from_values(cls, **values: Any) -> Settings:
        """Defaults < ``values``, reading neither the environment nor a config file: for a
        self-contained run that the operator's settings must not change."""
        return _ValuesOnly(**values)

    @classmethod
    def check_environment(cls, environ: Mapping[str, str]) -> None:
        """ValueError naming each ``TENSORLINE_*`` variable that is no setting (a typo would
        otherwise be ignored without a word, and the server run with the default instead),
        with the closest known name."""
        known = sorted({f"TENSORLINE_{name.upper()}" for name in cls.model_fields} | NOT_SETTINGS)
        problems = []
        for name in sorted(environ):
            if (not name.upper().startswith("TENSORLINE_") or name.upper() in known
                    or name.upper().startswith(_RESERVED_PREFIX)):
                continue
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"unknown environment variable {name}{hint}")
        if problems:
            raise ValueError("; ".join(problems) + "; fix or unset it (the TENSORLINE_* "
                             "settings are listed in the README, Configuration)")


class _ValuesOnly(Settings):
    """Settings from the constructor's values alone (``Settings.from_values``)."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)
