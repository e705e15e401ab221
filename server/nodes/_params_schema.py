"""Params of untrusted nodes, checked in the server against the JSON schema their sandboxed
worker exported, with ``jsonschema`` (Draft 2020-12, the dialect pydantic emits).

The server has no pydantic model for an untrusted node's params: it would have to import the
module. The schema comes from the untrusted module too, so applying it must not hand that
module a lever on the server:

* no remote ``$ref`` is ever fetched (jsonschema's ``referencing`` retrieves nothing unless told
  to), and a reference that cannot be resolved, or a schema that recurses for ever, is a
  violation of the params, never a server error;
* regular expressions (``pattern``, ``patternProperties``) are not run here: ``re`` has no
  timeout, and a catastrophically backtracking pattern would hold the event loop. Properties a
  ``patternProperties`` would have admitted count as unknown (the module only hurts itself);
* nor ``uniqueItems``, quadratic in the array's length when its items do not sort;
* each params object has a budget of keyword evaluations (``MIN_STEPS``, and
  ``STEPS_PER_VALUE`` per value in it): references can fan out (an ``anyOf`` of two references
  to an ``anyOf`` of two references, and so on: 2**depth evaluations of the smallest params,
  which held the event loop for good). Past the budget the params are refused, naming the node.

What is skipped here, and every custom validator of the node's ``Params`` model, runs in the
sandbox only: the worker validates the params with the model when it creates the node
(``Params.model_validate_json`` in ``runtime.sandbox._worker``), and a failure there is a node error
naming the node.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsonschema import ValidationError
    from jsonschema.protocols import Validator

# jsonschema is imported on first use: only servers with untrusted modules apply schemas, and the
# import is a noticeable part of a cold start (the server's and the sandbox launcher's).

# Keeps a hostile schema or a huge params object from producing unbounded work and reports.
MAX_ERRORS = 32
# Keyword evaluations one params object may cost: the floor, and this many per value in it (a
# union tries each of its branches on a value; pydantic's schemas need a few per value).
MIN_STEPS = 1000
STEPS_PER_VALUE = 100


class _TooCostly(Exception):
    """The schema asked for more evaluations than the params object's budget."""


# The budget left to the validation running in this thread (None: none is metered).
_budget = threading.local()


@dataclass(frozen=True, slots=True)
class SchemaViolation:
    """One way a params object breaks its schema. ``kind``: ``missing`` (a required field),
    ``unknown`` (a field the schema does not allow; ``loc`` ends with its name) or ``invalid``."""

    loc: tuple[str | int, ...]
    kind: str
    message: str


def _required(validator: Validator, required: Any, instance: Any,
              schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    # One error per missing field, located at the field (like pydantic's), not its parent.
    if not validator.is_type(instance, "object") or not isinstance(required, list):
        return
    for name in required:
        if isinstance(name, str) and name not in instance:
            yield _jsonschema().ValidationError("Field required", path=(name,))


def _additional_properties(validator: Any, allowed: Any, instance: Any,
                           schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    """``additionalProperties`` without ``patternProperties`` (no regular expression runs)."""
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    extras = sorted(k for k in instance if not (isinstance(properties, dict) and k in properties))
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif allowed is False:
        for extra in extras:
            yield _jsonschema().ValidationError("unknown field", validator="additionalProperties",
                                                path=(extra,))


def _skipped(validator: Validator, value: Any, instance: Any,
             schema: Mapping[str, Any]) -> Iterator[ValidationError]:
    return iter(())


def _metered(check: Any) -> Any:
    """``check`` (a keyword's validator) charged one step of the running budget."""
    def run(validator: Validator, value: Any, instance: Any,
            schema: Mapping[str, Any]) -> Iterator[ValidationError]:
        left = getattr(_budget, "left", None)
        if left is not None:
            if left <= 0:
                raise _TooCostly
            _budget.left = left - 1
        errors = check(validator, value, instance, schema)
        if errors is not None:
            yield from errors
    return run


def _values(instance: Any) -> int:
    """How many values ``instance`` (parsed JSON) holds, itself included."""
    count, stack = 0, [instance]
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _jsonschema() -> Any:
    import jsonschema
    import jsonschema.exceptions
    import jsonschema.validators

    return jsonschema


@functools.cache
def _validator_class() -> Any:
    jsonschema = _jsonschema()
    draft = jsonschema.Draft202012Validator
    keywords = {
        **draft.VALIDATORS,
        "required": _required,
        "additionalProperties": _additional_properties,
        "pattern": _skipped,
        "patternProperties": _skipped,
        # Evaluated properties are worked out with patternProperties' regular expressions.
        "unevaluatedProperties": _skipped,
        "uniqueItems": _skipped,
    }
    return jsonschema.validators.extend(
        draft, {name: _metered(check) for name, check in keywords.items()})


def check_schema(text: str) -> str:
    """``text`` as canonical JSON when it is a valid Draft 2020-12 schema object; ValueError
    otherwise."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"params schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ValueError("params schema must be a JSON object")
    validator_class = _validator_class()
    try:
        validator_class.check_schema(schema)
    except _jsonschema().exceptions.SchemaError as exc:
        raise ValueError(f"params schema is not a valid JSON schema: {exc.message}") from None
    except RecursionError:
        raise ValueError("params schema is nested too deeply") from None
    return json.dumps(schema, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Validator:
    return _validator_class()(json.loads(schema_json))  # type: ignore[no-any-return]


def schema_violations(schema_json: str, params: Any) -> list[SchemaViolation]:
    """How ``params`` breaks the schema (at most ``MAX_ERRORS`` ways; empty: valid)."""
    found: list[SchemaViolation] = []
    steps = MIN_STEPS + STEPS_PER_VALUE * _values(params)
    _budget.left = steps
    try:
        for error in _validator(schema_json).iter_errors(params):
            kind = ("missing" if error.validator == "required" else
                    "unknown" if error.validator == "additionalProperties" else "invalid")
            found.append(SchemaViolation(tuple(error.absolute_path), kind, error.message))
            if len(found) >= MAX_ERRORS:
                break
    except _TooCostly:
        return [SchemaViolation((), "invalid",
                                f"the node's params schema cannot be applied: checking these "
                                f"params takes more than {steps} steps")]
    except Exception as exc:  # an unresolvable $ref, a recursion: the schema's fault
        return [SchemaViolation((), "invalid",
                                f"the node's params schema cannot be applied "
                                f"({type(exc).__name__})")]
    finally:
        _budget.left = None
    return sorted(found, key=lambda v: [str(part) for part in v.loc])
