"""The runtime selector: the only place that decides where a node runs, and why.

Order, per node (the first rule that applies wins; every decision carries its reason):

1. Trust policy: nodes from untrusted modules always run sandboxed. A hint asking for
   in-process is refused (PERMISSION_DENIED); the environment and fallback cannot move them.
2. The manifest's ``runtime_hint`` (``inprocess`` | ``sandbox`` | ``auto``, plus the reference
   aliases ``cpython`` = inprocess and ``rust_python`` / ``cpython_wasm`` = sandbox).
3. The ``TENSORLINE_RUNTIME`` environment override (same values, case-insensitive).
4. Auto-detection: the node's declared traits (isolation, GPU, memory > 4 GiB, CPU-bound pure
   Python), then heavy-library keywords in the node type or its module -> sandbox.
5. Default: in-process for trusted nodes.

Fallback (``TENSORLINE_ENABLE_FALLBACK``, default on) moves a trusted sandbox node in-process
only when the sandbox could not host it at all: the sandbox runtime is unavailable
(``decide()`` when the server has none, ``runtime_missing()`` when it is gone at run time), or
the worker cannot load the node or exchange its values (``fallback()``, for the failure kinds in
``FALLBACK_KINDS``). What the sandbox denied or stopped (a blocked syscall, a resource cap, a
crash, a deadline, a protocol violation) is never re-run in-process. Every fallback decision
carries ``fallback`` (the cause, for the response metrics) and ``fallback_reason`` (a bounded
label for the counter), and is logged as a warning.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from tensorline.server._errors import PermissionDenied, RuntimeUnavailable, SandboxFailure
from tensorline.server.nodes import NodeEntry

log = logging.getLogger(__name__)

RuntimeName = Literal["inprocess", "sandbox"]
INPROCESS: RuntimeName = "inprocess"
SANDBOX: RuntimeName = "sandbox"

# Hint spellings -> canonical value; the reference design's names are accepted as aliases.
HINT_ALIASES: Mapping[str, str] = {
    "inprocess": "inprocess",
    "in_process": "inprocess",
    "cpython": "inprocess",
    "sandbox": "sandbox",
    "sandboxed": "sandbox",
    "rust_python": "sandbox",
    "cpython_wasm": "sandbox",
    "auto": "auto",
}

# Heavy libraries (from the reference design) whose presence in a node's type or module asks
# for a process of its own: crash isolation, its own GIL, its own memory cap. onnxruntime is
# ours: a native runtime parsing model files, whose crash must not take the server with it.
HEAVY_LIBRARIES: tuple[str, ...] = (
    "torch", "transformers", "tensorflow", "keras", "jax", "sklearn",
    "cv2", "opencv", "pandas", "scipy", "pil", "pillow", "onnxruntime",
)
# Short names only match as whole words ("pil" must not match "compile").
_SHORT = frozenset({"jax", "cv2", "pil"})
# Word boundaries in CamelCase, acronyms included: "PILResize" -> "PIL_Resize".
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_WORD = re.compile(r"[a-z0-9]+")

MEMORY_THRESHOLD_MB = 4096

ENV_RUNTIME = "TENSORLINE_RUNTIME"
ENV_FALLBACK = "TENSORLINE_ENABLE_FALLBACK"

# The fallback reason (counter label) when the sandbox runtime itself is not there.
UNAVAILABLE = "unavailable"


def normalize_hint(hint: str | None) -> str | None:
    """Canonical hint value, or None for no hint. ValueError lists the accepted spellings."""
    if hint is None or hint == "":
        return None
    canonical = HINT_ALIASES.get(hint.strip().lower())
    if canonical is None:
        raise ValueError(
            f"unknown runtime hint '{hint}'; accepted: {', '.join(sorted(HINT_ALIASES))}"
        )
    return canonical


@dataclass(frozen=True, slots=True)
class RuntimeDecision:
    runtime: RuntimeName
    reason: str
    # False for untrusted nodes: never moved in-process.
    fallback_allowed: bool = True
    # Set when this decision is a fallback to in-process: why (free text, shown to the client)
    # and which of the allowed reasons (``FALLBACK_KINDS``: a bounded metrics label).
    fallback: str = ""
    fallback_reason: str = ""


def heavy_library_in(*names: str) -> str | None:
    """The first heavy-library keyword found in any of the names (node type, module), if any."""
    for name in names:
        lowered = name.lower()
        words = set(_WORD.findall(_CAMEL.sub("_", name).lower()))
        for lib in HEAVY_LIBRARIES:
            if lib in words or (lib not in _SHORT and lib in lowered):
                return lib
    return None


def _truthy(value: str) -> bool:
    return value.strip().lower() not in {"0", "false", "no", "off", ""}


class Selector:
    """Decides the runtime of each node. No I/O: a decision depends only on the node, its hint
    and this selector's settings, so decisions are cached with the plan. The settings are not
    frozen: ``PipelineEngine.start`` turns ``sandbox_available`` off when the sandbox runtime
    fails to start, before the server compiles any plan."""

    def __init__(
        self,
        *,
        env_runtime: str | None = None,
        fallback_enabled: bool = True,
        sandbox_available: bool = False,
        memory_threshold_mb: int = MEMORY_THRESHOLD_MB,
    ) -> None:
        self.env_runtime = normalize_hint(env_runtime)
        self.fallback_enabled = fallback_enabled
        self.sandbox_available = sandbox_available
        self.memory_threshold_mb = memory_threshold_mb

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, sandbox_available: bool = False
    ) -> Selector:
        env = os.environ if environ is None else environ
        return cls(
            env_runtime=env.get(ENV_RUNTIME) or None,
            fallback_enabled=_truthy(env.get(ENV_FALLBACK, "true")),
            sandbox_available=sandbox_available,
        )

    def decide(self, node_id: str, entry: NodeEntry, hint: str | None) -> RuntimeDecision:
        """The runtime for one node. Raises PermissionDenied when the trust policy refuses a hint."""
        canonical = normalize_hint(hint)
        decision = self._decide(node_id, entry, canonical)
        if decision.runtime == SANDBOX and not self.sandbox_available:
            decision = self.runtime_missing(node_id, entry, decision)
        log.debug("node %s (%s): %s because %s", node_id, entry.node_type, decision.runtime,
                  decision.reason)
        return decision

    def runtime_missing(self, node_id: str, entry: NodeEntry,
                        decision: RuntimeDecision) -> RuntimeDecision:
        """The decision to run with when ``decision``'s runtime is not on this server: an
        in-process fallback when the node may have one, else ``RuntimeUnavailable`` (or
        ``PermissionDenied`` for an untrusted node, which must never leave the sandbox)."""
        if not entry.trusted:
            raise PermissionDenied(
                f"node '{node_id}' ({entry.node_type}) is untrusted and must run sandboxed, "
                "but the sandbox runtime is not available on this server"
            )
        if decision.runtime == INPROCESS or not self._may_fall_back(entry, decision):
            raise RuntimeUnavailable(node_id, entry.node_type, decision.runtime,
                                     f"chosen because {decision.reason}; "
                                     f"{self._why_no_fallback(decision)}")
        cause = "sandbox runtime unavailable"
        self._warn(node_id, entry, cause)
        return RuntimeDecision(
            INPROCESS, f"{decision.reason}; sandbox unavailable on this server, in-process",
            fallback_allowed=False, fallback=cause, fallback_reason=UNAVAILABLE)

    def fallback(self, node_id: str, entry: NodeEntry, decision: RuntimeDecision,
                 failure: SandboxFailure) -> RuntimeDecision | None:
        """The decision to retry with after ``failure`` in the sandbox, or None for no retry:
        only a trusted node, with fallback on, that the sandbox could not host at all."""
        if not failure.fallback_eligible or not self._may_fall_back(entry, decision):
            return None
        self._warn(node_id, entry, failure.cause)
        return RuntimeDecision(INPROCESS, f"fallback from sandbox: {failure.cause}",
                               fallback_allowed=False, fallback=failure.cause,
                               fallback_reason=failure.kind)

    def _may_fall_back(self, entry: NodeEntry, decision: RuntimeDecision) -> bool:
        return (decision.runtime == SANDBOX and decision.fallback_allowed and entry.trusted
                and self.fallback_enabled)

    def _why_no_fallback(self, decision: RuntimeDecision) -> str:
        if decision.runtime != SANDBOX:
            return "there is no other runtime for it"
        if not decision.fallback_allowed:
            return "it may not fall back to in-process"
        return f"fallback to in-process is disabled ({ENV_FALLBACK}=false)"

    @staticmethod
    def _warn(node_id: str, entry: NodeEntry, cause: str) -> None:
        log.warning("node %s (%s): the sandbox could not host it (%s); falling back to "
                    "in-process", node_id, entry.node_type, cause)

    def _decide(self, node_id: str, entry: NodeEntry, hint: str | None) -> RuntimeDecision:
        if not entry.trusted:
            if hint == INPROCESS:
                raise PermissionDenied(
                    f"node '{node_id}' ({entry.node_type}) comes from untrusted module "
                    f"{entry.module} and cannot run in-process (runtime_hint={hint})"
                )
            return RuntimeDecision(
                SANDBOX, f"trust policy: module {entry.module} is untrusted", fallback_allowed=False
            )
        if hint in (INPROCESS, SANDBOX):
            return RuntimeDecision(hint, f"manifest runtime_hint={hint}")  # type: ignore[arg-type]
        if hint is None and self.env_runtime in (INPROCESS, SANDBOX):
            return RuntimeDecision(
                self.env_runtime,  # type: ignore[arg-type]
                f"environment {ENV_RUNTIME}={self.env_runtime}",
            )
        return self._auto(entry, "runtime_hint=auto" if hint == "auto" else None)

    def _auto(self, entry: NodeEntry, prefix: str | None) -> RuntimeDecision:
        traits = entry.traits

        def because(text: str) -> str:
            return f"{prefix}; {text}" if prefix else text

        if traits.isolation == INPROCESS:
            return RuntimeDecision(INPROCESS, because("trait: isolation=inprocess"))
        if traits.isolation == SANDBOX:
            return RuntimeDecision(SANDBOX, because("trait: isolation=sandbox"))
        if traits.needs_gpu:
            return RuntimeDecision(SANDBOX, because("trait: needs_gpu"))
        if traits.memory_mb is not None and traits.memory_mb > self.memory_threshold_mb:
            return RuntimeDecision(
                SANDBOX,
                because(f"trait: memory_mb={traits.memory_mb} > {self.memory_threshold_mb}"),
            )
        if traits.cpu_bound:
            return RuntimeDecision(SANDBOX, because("trait: cpu_bound (own GIL)"))
        lib = heavy_library_in(*traits.libraries) if traits.libraries else None
        if lib is not None:
            return RuntimeDecision(SANDBOX, because(f"trait: uses heavy library {lib}"))
        lib = heavy_library_in(entry.node_type, entry.module)
        if lib is not None:
            return RuntimeDecision(SANDBOX, because(f"auto: heavy library keyword '{lib}'"))
        return RuntimeDecision(INPROCESS, because("default: trusted node in-process"))
