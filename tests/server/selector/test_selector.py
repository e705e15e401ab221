"""The runtime selector: every rule, its reason, and the reasons seen in response metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from tensorline.client import AsyncClient
from tensorline.server import PermissionDenied, SandboxFailure
from tensorline.server._errors import RuntimeUnavailable
from tensorline.server.nodes import Node, NodeEntry, NodeTraits
from tensorline.server.runtime.sandbox import WorkerFailure
from tensorline.server.selector import (
    FALLBACK_KINDS,
    HINT_ALIASES,
    INPROCESS,
    SANDBOX,
    UNAVAILABLE,
    Selector,
    heavy_library_in,
    normalize_hint,
)


class Plain(Node):
    """A node with no traits."""


def entry(cls: type[Node] = Plain, *, trusted: bool = True,
          module: str = "acme.nodes") -> NodeEntry:
    return NodeEntry.of(cls, module, trusted)


def with_traits(**traits: Any) -> type[Node]:
    return type("Traited", (Node,), {"traits": NodeTraits(**traits)})


def named(node_type: str) -> type[Node]:
    return type(node_type, (Node,), {})


SANDBOXED = Selector(sandbox_available=True)

# What the sandbox denied or stopped: never re-run in-process, whatever the settings.
DENIALS = frozenset({"permission", "memory", "cpu", "crash", "protocol", "seccomp", ""})


# --- 1. trust policy ---------------------------------------------------------------------------

@pytest.mark.parametrize("hint", ["inprocess", "in_process", "cpython", "CPython", " INPROCESS "])
def test_untrusted_node_with_inprocess_hint_is_refused(hint: str) -> None:
    with pytest.raises(PermissionDenied, match=r"untrusted module evil\.nodes"):
        SANDBOXED.decide("n", entry(trusted=False, module="evil.nodes"), hint)


@pytest.mark.parametrize("hint", [None, "", "auto", "sandbox", "rust_python", "cpython_wasm"])
def test_untrusted_node_always_runs_sandboxed(hint: str | None) -> None:
    selector = Selector(sandbox_available=True, env_runtime="inprocess")
    decision = selector.decide("n", entry(with_traits(isolation="inprocess"), trusted=False,
                                          module="evil.nodes"), hint)
    assert decision.runtime == SANDBOX
    assert decision.reason == "trust policy: module evil.nodes is untrusted"
    assert decision.fallback_allowed is False


def test_untrusted_node_without_a_sandbox_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="sandbox runtime is not available"):
        Selector(sandbox_available=False).decide("n", entry(trusted=False), None)


@pytest.mark.parametrize("kind", sorted(FALLBACK_KINDS | DENIALS))
def test_untrusted_node_never_falls_back(kind: str) -> None:
    untrusted = entry(trusted=False)
    decision = SANDBOXED.decide("n", untrusted, None)
    failure = SandboxFailure("n", "worker could not load it", kind=kind)
    assert SANDBOXED.fallback("n", untrusted, decision, failure) is None


# --- 2. manifest hint and aliases --------------------------------------------------------------

@pytest.mark.parametrize(("hint", "runtime"), [
    ("inprocess", INPROCESS), ("in_process", INPROCESS), ("cpython", INPROCESS),
    ("sandbox", SANDBOX), ("sandboxed", SANDBOX), ("rust_python", SANDBOX),
    ("cpython_wasm", SANDBOX), ("Rust_Python", SANDBOX), ("  CPYTHON_WASM ", SANDBOX),
])
def test_hint_and_every_alias(hint: str, runtime: str) -> None:
    decision = SANDBOXED.decide("n", entry(), hint)
    assert decision.runtime == runtime
    assert decision.reason == f"manifest runtime_hint={runtime}"


def test_every_alias_is_covered() -> None:
    assert set(HINT_ALIASES) == {"inprocess", "in_process", "cpython", "sandbox", "sandboxed",
                                 "rust_python", "cpython_wasm", "auto"}
    assert normalize_hint(None) is None
    assert normalize_hint("") is None
    with pytest.raises(ValueError, match="unknown runtime hint 'wasm'; accepted: auto, cpython"):
        normalize_hint("wasm")


def test_hint_beats_traits_and_environment() -> None:
    selector = Selector(sandbox_available=True, env_runtime="sandbox")
    decision = selector.decide("n", entry(with_traits(needs_gpu=True)), "cpython")
    assert (decision.runtime, decision.reason) == (INPROCESS, "manifest runtime_hint=inprocess")


def test_auto_hint_runs_auto_detection_with_its_prefix() -> None:
    decision = SANDBOXED.decide("n", entry(with_traits(cpu_bound=True)), "auto")
    assert decision.runtime == SANDBOX
    assert decision.reason == "runtime_hint=auto; trait: cpu_bound (own GIL)"
    selector = Selector(sandbox_available=True, env_runtime="sandbox")
    decision = selector.decide("n", entry(), "AUTO")
    assert (decision.runtime, decision.reason) == (
        INPROCESS, "runtime_hint=auto; default: trusted node in-process")


def test_sandbox_hint_without_a_sandbox_runs_in_process_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tensorline.server.selector"):
        decision = Selector(sandbox_available=False).decide("n", entry(), "rust_python")
    assert decision.runtime == INPROCESS
    assert decision.reason == ("manifest runtime_hint=sandbox; sandbox unavailable on this "
                               "server, in-process")
    assert (decision.fallback, decision.fallback_reason) == ("sandbox runtime unavailable",
                                                             UNAVAILABLE)
    assert [r.getMessage() for r in caplog.records] == [
        "node n (Plain): the sandbox could not host it (sandbox runtime unavailable); "
        "falling back to in-process"]


def test_sandbox_hint_without_a_sandbox_and_without_fallback_is_refused() -> None:
    selector = Selector(sandbox_available=False, fallback_enabled=False)
    with pytest.raises(RuntimeUnavailable, match=r"node 'n' \(Plain\) must run in the sandbox "
                                                 r"runtime.*TENSORLINE_ENABLE_FALLBACK=false"):
        selector.decide("n", entry(), "sandbox")


# --- 3. TENSORLINE_RUNTIME ---------------------------------------------------------------------

@pytest.mark.parametrize(("value", "runtime"), [
    ("sandbox", SANDBOX), ("SANDBOX", SANDBOX), ("Sandbox", SANDBOX), ("InProcess", INPROCESS),
    ("cpython", INPROCESS), ("RUST_PYTHON", SANDBOX),
])
def test_environment_override_is_case_insensitive(value: str, runtime: str) -> None:
    selector = Selector.from_environ({"TENSORLINE_RUNTIME": value}, sandbox_available=True)
    decision = selector.decide("n", entry(with_traits(needs_gpu=True)), None)
    assert decision.runtime == runtime
    assert decision.reason == f"environment TENSORLINE_RUNTIME={runtime}"


def test_environment_auto_or_unset_leaves_auto_detection() -> None:
    for environ in ({"TENSORLINE_RUNTIME": "auto"}, {}, {"TENSORLINE_RUNTIME": ""}):
        selector = Selector.from_environ(environ, sandbox_available=True)
        decision = selector.decide("n", entry(), None)
        assert decision.reason == "default: trusted node in-process"


def test_bad_environment_value_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown runtime hint 'fast'"):
        Selector.from_environ({"TENSORLINE_RUNTIME": "fast"})


@pytest.mark.parametrize(("value", "enabled"), [
    ("true", True), ("1", True), ("yes", True), ("false", False), ("0", False), ("OFF", False),
    ("no", False),
])
def test_fallback_environment_flag(value: str, enabled: bool) -> None:
    selector = Selector.from_environ({"TENSORLINE_ENABLE_FALLBACK": value}, sandbox_available=True)
    trusted = entry(with_traits(isolation="sandbox"))
    decision = selector.decide("n", trusted, None)
    failure = SandboxFailure("n", "ModuleNotFoundError: no module acme", kind="import")
    retry = selector.fallback("n", trusted, decision, failure)
    if enabled:
        assert retry is not None
        assert retry.runtime == INPROCESS
        assert retry.reason == "fallback from sandbox: ModuleNotFoundError: no module acme"
        assert (retry.fallback, retry.fallback_reason) == (failure.cause, "import")
        assert retry.fallback_allowed is False
    else:
        assert retry is None
    assert Selector.from_environ({}).fallback_enabled is True


@pytest.mark.parametrize(("kind", "falls_back"), [
    *((kind, True) for kind in sorted(FALLBACK_KINDS)),
    *((kind, False) for kind in sorted(DENIALS)),
])
def test_fallback_decision_table(kind: str, falls_back: bool,
                                 caplog: pytest.LogCaptureFixture) -> None:
    """Trusted sandbox node, fallback on: only a sandbox that could not host the node at all
    moves it in-process; a denial, a cap, a crash or anything unknown never does."""
    trusted = entry()
    decision = SANDBOXED.decide("n", trusted, "sandbox")
    with caplog.at_level(logging.WARNING, logger="tensorline.server.selector"):
        retry = SANDBOXED.fallback("n", trusted, decision,
                                   SandboxFailure("n", f"why: {kind}", kind=kind))
    assert (retry is not None) is falls_back
    if retry is not None:
        assert (retry.runtime, retry.fallback, retry.fallback_reason) == (
            INPROCESS, f"why: {kind}", kind)
        assert [r.getMessage() for r in caplog.records] == [
            f"node n (Plain): the sandbox could not host it (why: {kind}); falling back to "
            "in-process"]
    else:
        assert caplog.records == []


def test_an_unclassified_sandbox_failure_never_falls_back() -> None:
    decision = SANDBOXED.decide("n", entry(), "sandbox")
    assert SANDBOXED.fallback("n", entry(), decision, SandboxFailure("n", "worker died")) is None


@pytest.mark.parametrize(("cause", "eligible"), [
    ("ModuleNotFoundError: cannot load acme.Node in the worker: No module named 'acme'", True),
    ("PermissionError: cannot load acme.Node in the worker: [Errno 13] Permission denied: "
     "'/etc/acme.key'", False),
    ("OSError: cannot load acme.Node in the worker: x (caused by PermissionError: "
     "[Errno 1] Operation not permitted)", False),
])
def test_an_import_that_hit_the_sandbox_is_a_denial(cause: str, eligible: bool) -> None:
    failure = WorkerFailure("n", cause, during="initialize", kind="import")
    assert failure.fallback_eligible is eligible
    decision = SANDBOXED.decide("n", entry(), "sandbox")
    assert (SANDBOXED.fallback("n", entry(), decision, failure) is not None) is eligible


@pytest.mark.parametrize("kind", ["permission", "memory", "cpu", "crash", "protocol"])
def test_worker_denials_are_never_eligible_even_while_initializing(kind: str) -> None:
    assert not WorkerFailure("n", "x", during="initialize", kind=kind).fallback_eligible
    assert not WorkerFailure("n", "x", during="process", kind=kind).fallback_eligible


def test_no_fallback_for_in_process_decisions() -> None:
    decision = SANDBOXED.decide("n", entry(), None)
    assert decision.runtime == INPROCESS
    failure = SandboxFailure("n", "x", kind="import")
    assert SANDBOXED.fallback("n", entry(), decision, failure) is None


def test_a_missing_runtime_falls_back_only_when_allowed() -> None:
    trusted, untrusted = entry(), entry(trusted=False, module="evil.nodes")
    decision = SANDBOXED.decide("n", trusted, "sandbox")
    moved = SANDBOXED.runtime_missing("n", trusted, decision)
    assert (moved.runtime, moved.fallback, moved.fallback_reason) == (
        INPROCESS, "sandbox runtime unavailable", UNAVAILABLE)
    strict = Selector(sandbox_available=True, fallback_enabled=False)
    with pytest.raises(RuntimeUnavailable, match=r"node 'n' .* sandbox runtime") as refused:
        strict.runtime_missing("n", trusted, strict.decide("n", trusted, "sandbox"))
    assert (refused.value.node_id, refused.value.runtime) == ("n", SANDBOX)
    with pytest.raises(PermissionDenied, match="untrusted and must run sandboxed"):
        SANDBOXED.runtime_missing("n", untrusted, SANDBOXED.decide("n", untrusted, None))
    with pytest.raises(RuntimeUnavailable, match="no other runtime"):
        SANDBOXED.runtime_missing("n", trusted, SANDBOXED.decide("n", trusted, "inprocess"))


# --- 4. traits and heavy libraries -------------------------------------------------------------

@pytest.mark.parametrize(("traits", "runtime", "reason"), [
    ({"isolation": "inprocess", "needs_gpu": True}, INPROCESS, "trait: isolation=inprocess"),
    ({"isolation": "sandbox"}, SANDBOX, "trait: isolation=sandbox"),
    ({"needs_gpu": True}, SANDBOX, "trait: needs_gpu"),
    ({"memory_mb": 8192}, SANDBOX, "trait: memory_mb=8192 > 4096"),
    ({"memory_mb": 4096}, INPROCESS, "default: trusted node in-process"),
    ({"cpu_bound": True}, SANDBOX, "trait: cpu_bound (own GIL)"),
    ({"libraries": ("numpy", "torch")}, SANDBOX, "trait: uses heavy library torch"),
    ({"libraries": ("numpy",)}, INPROCESS, "default: trusted node in-process"),
])
def test_traits(traits: dict[str, Any], runtime: str, reason: str) -> None:
    decision = SANDBOXED.decide("n", entry(with_traits(**traits)), None)
    assert (decision.runtime, decision.reason) == (runtime, reason)


def test_memory_threshold_is_configurable() -> None:
    selector = Selector(sandbox_available=True, memory_threshold_mb=100)
    decision = selector.decide("n", entry(with_traits(memory_mb=101)), None)
    assert decision.reason == "trait: memory_mb=101 > 100"


@pytest.mark.parametrize(("names", "found"), [
    (("TorchClassifier",), "torch"),
    (("HFTransformersModel",), "transformers"),
    (("PandasFrame",), "pandas"),
    (("acme.sklearn_nodes",), "sklearn"),
    (("OpenCVBlur",), "opencv"),
    (("Cv2Resize",), "cv2"),
    (("JaxModel",), "jax"),
    (("PILResize",), "pil"),
    (("pil_ops",), "pil"),
    (("PillowLoad",), "pillow"),
    (("scipy_filters",), "scipy"),
    (("KerasNet",), "keras"),
    (("TensorflowLite",), "tensorflow"),
    (("Compile",), None),
    (("CompileGraph",), None),
    (("acme.compiler",), None),
    (("Pilot", "Ajax", "Stencil"), None),
    (("Scale", "tensorline.server.nodes.builtin"), None),
])
def test_heavy_library_keywords(names: tuple[str, ...], found: str | None) -> None:
    assert heavy_library_in(*names) == found


def test_heavy_library_in_type_or_module_selects_sandbox() -> None:
    by_type = SANDBOXED.decide("n", entry(named("TorchClassifier")), None)
    assert (by_type.runtime, by_type.reason) == (SANDBOX, "auto: heavy library keyword 'torch'")
    by_module = SANDBOXED.decide("n", entry(module="acme.pandas_nodes"), None)
    assert by_module.reason == "auto: heavy library keyword 'pandas'"
    compile_node = SANDBOXED.decide("n", entry(named("Compile"), module="acme.compile"), None)
    assert compile_node.runtime == INPROCESS


# --- 5. default --------------------------------------------------------------------------------

def test_default_is_in_process_for_trusted_nodes() -> None:
    for selector in (SANDBOXED, Selector()):
        decision = selector.decide("n", entry(), None)
        assert decision.runtime == INPROCESS
        assert decision.reason == "default: trusted node in-process"
        assert decision.fallback_allowed is True


# --- reasons in response metrics ---------------------------------------------------------------

@pytest.mark.parametrize("sandbox", [True, False])
async def test_reasons_are_recorded_in_metrics(server_factory: Callable[..., Any],
                                               sandbox: bool) -> None:
    server = await server_factory(sandbox=sandbox)
    manifest = {"version": "v1", "nodes": [
        {"id": "hinted", "node_type": "PassThrough", "runtime_hint": "cpython"},
        {"id": "sandboxed", "node_type": "PassThrough", "runtime_hint": "cpython_wasm"},
        {"id": "plain", "node_type": "PassThrough"},
    ]}
    x = np.zeros(1)
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        result = await client.execute(manifest, {"hinted": x, "sandboxed": x, "plain": x})
    reasons = {m.node_id: (m.runtime, m.selection_reason) for m in result.metrics.nodes}
    assert reasons == {
        "hinted": ("inprocess", "manifest runtime_hint=inprocess"),
        "sandboxed": ("sandbox", "manifest runtime_hint=sandbox") if sandbox else (
            "inprocess", "manifest runtime_hint=sandbox; sandbox unavailable on this server, "
                         "in-process"),
        "plain": ("inprocess", "default: trusted node in-process"),
    }


@pytest.mark.parametrize("value", ["InProcess", "CPYTHON"])
async def test_environment_override_reaches_the_server(
        server_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TENSORLINE_RUNTIME", value)
    server = await server_factory()
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        result = await client.execute(
            {"version": "v1", "nodes": [{"id": "p", "node_type": "PassThrough"}]},
            {"p": np.zeros(1)})
    assert result.metrics.nodes[0].selection_reason == "environment TENSORLINE_RUNTIME=inprocess"
