"""Untrusted text the client and the codec parse stays bounded: alias bombs and deep YAML, deep
or oversized JSON; and calls have deadlines by default."""

from __future__ import annotations

import time

import pytest

from tensorline.client import AsyncClient, DeadlineExceededError
from tensorline.client._client import ClientConfig, manifest_json
from tensorline.wire._json import JsonRejected, json_depth, loads
from tensorline.wire._yaml import MAX_NODES, expanded_size, safe_load


def laughs(levels: int) -> str:
    text = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for previous, name in zip("abcdefghi", "bcdefghij"[:levels - 1], strict=False):
        text += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    return text


def test_billion_laughs_is_refused_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(ValueError, match="expands to"):
        manifest_json(laughs(9) + "nodes: []\n")
    assert time.monotonic() - started < 1.0


def test_aliases_within_the_bound_still_work() -> None:
    data = safe_load("p: &p {factor: 2}\nnodes: [{id: a, params: *p}, {id: b, params: *p}]\n")
    assert data["nodes"][1]["params"] == {"factor": 2}
    assert MAX_NODES > 1000


def test_recursive_and_deep_yaml_are_value_errors() -> None:
    with pytest.raises(ValueError, match="refers to itself"):
        safe_load("a: &a [*a]\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        safe_load("[" * 5000 + "]" * 5000)


def test_expanded_size_counts_every_use_of_an_alias() -> None:
    import yaml

    node = yaml.compose("a: &a [1, 2]\nb: [*a, *a, *a]\n")
    assert node is not None
    # mapping + 2 keys + a (3) + b (1 + 3 x 3)
    assert expanded_size(node) == 1 + 2 + 3 + 10


@pytest.mark.parametrize(("text", "limit"), [
    ("[" * 100 + "]" * 100, True),
    ("1" * 5000, True),
    ("[1, NaN]", False),
    ("1e999", False),
    ('{"a": ', False),
])
def test_hostile_json_is_rejected_with_a_reason(text: str, limit: bool) -> None:
    with pytest.raises(JsonRejected) as info:
        loads(text, max_depth=64)
    assert info.value.limit is limit


def test_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth('[["[[[", {"k\\"[": [1]}]]') == 4
    assert loads('{"a": "[[[[[[[["}', max_depth=1) == {"a": "[[[[[[[["}


def test_calls_and_streams_have_default_deadlines() -> None:
    config = ClientConfig("localhost:1")
    assert config.timeout == 300.0 and config.stream_timeout == 3600.0


async def test_a_stream_ends_at_the_clients_stream_timeout(target: str) -> None:
    manifest = {"nodes": [{"id": "s", "node_type": "Scale", "params": {"factor": 2}}]}
    async with AsyncClient(target, stream_timeout=0.5) as client, client.stream(manifest) as stream:
        with pytest.raises(DeadlineExceededError):
            async for _ in stream:
                pass
