"""Manifest limits: size and depth, graphs longer than the recursion limit, and a plan cache
bounded by the bytes of the manifests it keeps."""

from __future__ import annotations

import itertools
import json
import sys

import pytest

from tensorline.server._errors import RequestInvalid
from tensorline.server.executor import PipelineEngine
from tensorline.server.manifest import ManifestLimits, PlanCache, parse_manifest_json


def chain(count: int, *, cycle: bool = False) -> str:
    ids = [f"n{i}" for i in range(count)]
    connections = [{"from": a, "to": b} for a, b in itertools.pairwise(ids)]
    if cycle:
        connections.append({"from": ids[-1], "to": ids[0]})
    return json.dumps({"nodes": [{"id": i, "node_type": "PassThrough"} for i in ids],
                       "connections": connections})


def test_size_and_depth_limits_are_limit_violations() -> None:
    limits = ManifestLimits(max_manifest_bytes=100, max_json_depth=3)
    for text in ('{"nodes": "' + "x" * 200 + '"}', '{"a": [[[1]]]}'):
        with pytest.raises(RequestInvalid) as info:
            parse_manifest_json(text, limits)
        assert info.value.violations[0].kind == "limit"
    assert parse_manifest_json('{"a": [[1]]}', limits) == {"a": [[1]]}


def test_graphs_longer_than_the_recursion_limit_compile() -> None:
    engine = PipelineEngine.local()
    count = sys.getrecursionlimit() * 3
    plan = engine.plan_for(chain(count)).plan
    assert plan.order[0] == "n0" and plan.order[-1] == f"n{count - 1}"
    with pytest.raises(RequestInvalid) as info:
        engine.plan_for(chain(count, cycle=True))
    cycle = info.value.violations[0].description
    assert cycle.startswith("cycle: n") and cycle.count("->") == count


def test_plan_cache_evicts_by_bytes() -> None:
    engine = PipelineEngine.local()
    plan = engine.plan_for(chain(1)).plan
    cache = PlanCache(capacity=100, max_bytes=1000)
    for key in ("a" * 400, "b" * 400, "c" * 400):
        cache.put(key, plan)
    assert len(cache) == 2 and cache.bytes == 800 and cache.get("a" * 400) is None
    cache.put("d" * 2000, plan)  # larger than the whole budget: not cached at all
    assert cache.get("d" * 2000) is None and cache.bytes == 800
