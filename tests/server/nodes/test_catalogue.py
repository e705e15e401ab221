"""An untrusted module's catalogue as the server sees it: a worker's describe reply checked
entry by entry (bounded, malformed entries dropped with a log line), turned into class-less
registry entries, and params checked against the exported JSON schema without running the
schema's regular expressions or fetching anything."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tensorline.server._errors import PermissionDenied
from tensorline.server.manifest import NodeSpec
from tensorline.server.nodes import NodeEntry
from tensorline.server.nodes._catalogue import (
    MAX_NODES,
    CatalogueInvalid,
    _describe_class,
    entry_of,
    parse_catalogue,
)
from tensorline.server.nodes._params_schema import check_schema, schema_violations
from tensorline.server.nodes.builtin import Scale
from tensorline.server.runtime import ExecutionScope, InProcessRuntime
from tensorline.server.selector import RuntimeDecision, Selector
from tests.nodes.basic import Split

MODULE = "acme.nodes"


def described(cls: Any, **changes: Any) -> dict[str, Any]:
    """A well-formed description (as a worker makes it) of ``cls``, placed in MODULE."""
    raw = _describe_class(cls)
    raw["class_module"] = MODULE
    raw.update(changes)
    return raw


@pytest.mark.parametrize("reply", [
    None, [], "nodes", {"nodes": []}, {"nodes": {}, "errors": []},
    {"nodes": [], "errors": [], "more": 1},
])
def test_a_reply_that_is_no_catalogue_is_refused(reply: Any) -> None:
    with pytest.raises(CatalogueInvalid):
        parse_catalogue(MODULE, reply)


def test_entries_round_trip_without_the_class() -> None:
    (description,) = parse_catalogue(MODULE, {"nodes": [described(Split)], "errors": []})
    remote = entry_of(description, MODULE)
    local = NodeEntry.of(Split, MODULE, trusted=False)
    assert remote.cls is None
    assert remote.class_ref == (MODULE, "Split")
    for field in ("node_type", "module", "trusted", "description", "inputs", "outputs",
                  "traits", "reusable", "streaming", "async_process", "async_initialize",
                  "async_cleanup", "has_initialize", "has_cleanup"):
        assert getattr(remote, field) == getattr(local, field), field
    assert json.loads(remote.params_schema_json()) == json.loads(local.params_schema_json())


@pytest.mark.parametrize(("declared", "held"), [
    ((1 << 20, 365 * 86400.0), (2048, 300.0)),  # more than the sandbox's: its cap and limit
    ((512, 5.0), (512, 5.0)),  # less: as declared
    ((None, None), (None, None)),  # nothing: the sandbox's defaults apply later
])
def test_an_untrusted_nodes_traits_stay_within_the_sandboxs_limits(
        declared: tuple[int | None, float | None], held: tuple[int | None, float | None]) -> None:
    memory_mb, timeout_s = declared
    traits = {"isolation": "any", "needs_gpu": False, "memory_mb": memory_mb,
              "cpu_bound": False, "timeout_s": timeout_s, "libraries": []}
    (description,) = parse_catalogue(MODULE, {"nodes": [described(Split, traits=traits)],
                                              "errors": []})
    entry = entry_of(description, MODULE, memory_mb_max=2048, timeout_s_max=300.0)
    assert (entry.traits.memory_mb, entry.traits.timeout_s) == held


@pytest.mark.parametrize(("changes", "problem"), [
    ({"node_type": "A\nB"}, "node_type"),
    ({"node_type": "x" * 201}, "node_type"),
    ({"description": "d" * 2001}, "description"),
    ({"inputs": [{"name": f"p{i}", "kind": "any", "description": "", "required": True,
                  "many": False} for i in range(65)]}, "inputs"),
    ({"inputs": [{"name": "p", "kind": "tensor", "description": "", "required": True,
                  "many": False}] * 2}, "inputs"),
    ({"outputs": [{"name": "o", "kind": "rocket", "description": "", "required": True,
                   "many": False}]}, "outputs"),
    ({"reusable": 1}, "reusable"),
    ({"params_schema": "{not json"}, "params_schema"),
    ({"params_schema": json.dumps({"type": 12})}, "params_schema"),
    ({"params_schema": json.dumps({"x": "y" * 70000})}, "params_schema"),
    ({"qualname": "os.system('sh')"}, "qualname"),
    ({"traits": {"isolation": "any", "needs_gpu": False, "memory_mb": -5, "cpu_bound": False,
                 "timeout_s": None, "libraries": []}}, "traits"),
    ({"smuggled": "x"}, "smuggled"),
])
def test_a_malformed_entry_is_dropped_with_a_log_line_and_the_rest_kept(
        changes: dict[str, Any], problem: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    reply = {"nodes": [described(Scale, **changes), described(Split)], "errors": []}
    assert [d.node_type for d in parse_catalogue(MODULE, reply)] == ["Split"]
    (record,) = caplog.records
    assert record.getMessage().startswith(f"untrusted module {MODULE}: node description #0")
    assert problem in record.getMessage()


def test_a_class_outside_the_module_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    # Otherwise an untrusted module could point the server at any class to create.
    reply = {"nodes": [described(Scale, class_module="tensorline.server.nodes.builtin")],
             "errors": []}
    assert parse_catalogue(MODULE, reply) == []
    assert "outside the module" in caplog.text
    inside = {"nodes": [described(Scale, class_module=MODULE + ".sub")], "errors": []}
    assert len(parse_catalogue(MODULE, inside)) == 1


def test_counts_and_reported_errors_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    many = [described(Split, node_type=f"N{i}") for i in range(MAX_NODES + 5)]
    reply = {"nodes": many, "errors": ["e" * 10_000] * 1000}
    assert len(parse_catalogue(MODULE, reply)) == MAX_NODES
    assert len(caplog.records) < 100
    assert all(len(r.getMessage()) < 3000 for r in caplog.records)


SCHEMA = check_schema(json.dumps({
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^a$"},
                   "gain": {"type": "number"},
                   "inner": {"type": "object", "additionalProperties": False,
                             "properties": {"depth": {"type": "integer"}}}},
}))


def test_violations_locate_each_field() -> None:
    found = schema_violations(SCHEMA, {"gain": "x", "gian": 1, "inner": {"dpeth": 2}})
    assert [(v.loc, v.kind) for v in found] == [
        (("gain",), "invalid"), (("gian",), "unknown"), (("inner", "dpeth"), "unknown"),
        (("name",), "missing")]
    assert found[3].message == "Field required"
    assert schema_violations(SCHEMA, {"name": "a", "gain": 2, "inner": {"depth": 1}}) == []


def test_regular_expressions_of_the_schema_never_run_in_the_server() -> None:
    # A catastrophic pattern must not be able to hold the event loop: the sandbox's pydantic
    # model enforces patterns when the worker creates the node.
    evil = check_schema(json.dumps({"type": "object",
                                    "properties": {"s": {"type": "string",
                                                         "pattern": "^(a+)+$"}},
                                    "patternProperties": {"^(b+)+$": {"type": "integer"}}}))
    assert schema_violations(evil, {"s": "a" * 64 + "!", "b" * 64 + "!": "x"}) == []
    assert schema_violations(SCHEMA, {"name": "not a"}) == []


@pytest.mark.parametrize("schema", [
    {"$ref": "https://example.invalid/schema.json"},
    {"$ref": "#/$defs/loop", "$defs": {"loop": {"$ref": "#/$defs/loop"}}},
])
def test_a_schema_that_cannot_be_applied_is_a_violation_not_an_error(
        schema: dict[str, Any]) -> None:
    (violation,) = schema_violations(check_schema(json.dumps(schema)), {})
    assert violation.kind == "invalid"
    assert "params schema cannot be applied" in violation.message


async def test_a_class_less_entry_never_runs_in_process() -> None:
    (description,) = parse_catalogue(MODULE, {"nodes": [described(Split)], "errors": []})
    entry = entry_of(description, MODULE)
    assert Selector(sandbox_available=True).decide("n", entry, None).runtime == "sandbox"
    spec = NodeSpec(node_id="n", entry=entry, params=None, params_key="{}",
                    decision=RuntimeDecision("inprocess", "forced by the test"), timeout_s=None,
                    wiring={})
    runtime = InProcessRuntime()
    await runtime.start()
    try:
        with pytest.raises(PermissionDenied, match=r"untrusted module acme\.nodes"):
            await runtime.call(spec, ExecutionScope("x"), {"in": 1})
    finally:
        await runtime.shutdown()


def fanning_out(depth: int) -> str:
    """An ``anyOf`` of two references to an ``anyOf`` of two references ... ``depth`` deep."""
    levels: dict[str, Any] = {}
    for level in range(depth):
        below = {"$ref": f"#/$defs/l{level + 1}"} if level < depth - 1 else {"type": "string"}
        levels[f"l{level}"] = {"anyOf": [below, below]}
    return check_schema(json.dumps({"type": "object", "$defs": levels,
                                    "properties": {"x": {"$ref": "#/$defs/l0"}}}))


def test_a_schema_that_fans_out_is_refused_within_the_params_budget() -> None:
    """2**40 evaluations of one field held the event loop for good; the params get a budget of
    steps for their size, and past it a violation says so."""
    (violation,) = schema_violations(fanning_out(40), {"x": 1})
    assert violation.kind == "invalid" and "steps" in violation.message, violation
    # Within the budget, the same schema still says what is wrong (and what is right).
    assert [v.message for v in schema_violations(fanning_out(3), {"x": 1})] == [
        "1 is not valid under any of the given schemas"]
    assert schema_violations(fanning_out(3), {"x": "a"}) == []


def test_large_params_keep_a_budget_that_fits_them() -> None:
    """A budget per value: thousands of items of a union, unique or not (``uniqueItems`` is
    the sandbox's to check: quadratic here when the items do not sort)."""
    schema = check_schema(json.dumps({"type": "object", "properties": {"xs": {
        "type": "array", "uniqueItems": True,
        "items": {"anyOf": [{"type": "integer"}, {"type": "object"}]}}}}))
    assert schema_violations(schema, {"xs": [{"k": i} for i in range(3000)]}) == []
    assert schema_violations(schema, {"xs": [1, 1, *range(2, 5000)]}) == []
