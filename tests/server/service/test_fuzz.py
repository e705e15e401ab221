"""Seeded fuzzing of ExecutePipeline, StreamPipeline and the Open Inference Protocol's
ModelInfer through a real ``tensorline serve``: 2,000 cases each (see ``tests.support.fuzz``),
and no answer may be INTERNAL, or UNKNOWN without naming a node. ``bench/fuzz.py`` runs the
same cases at larger counts."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.support import fuzz
from tests.support.processes import ServerProcess

SEED = 20261206
CASES = 2000


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("fuzz-models")
    fuzz.write_models(models)
    env = {"TENSORLINE_NODE_MODULES": fuzz.NODE_MODULES, "TENSORLINE_SANDBOX": "false",
           "TENSORLINE_LOAD_ENTRY_POINTS": "false", "TENSORLINE_PIPELINES_DIR": str(models)}
    with ServerProcess.start(env=env, pythonpath_repo=True) as server:
        yield server


@pytest.mark.parametrize("rpc", sorted(fuzz.RPCS))
def test_no_fuzzed_request_gets_internal_or_anonymous_unknown(
        fuzzed_server: ServerProcess, rpc: str) -> None:
    run = fuzz.RPCS[rpc][1]
    tally = fuzz.Tally()
    cases = list(fuzz.cases(SEED, rpc, CASES))
    with grpc.insecure_channel(fuzzed_server.target) as channel, ThreadPoolExecutor(4) as pool:
        for (case, _), error in zip(cases, pool.map(lambda c: run(channel, c[1]), cases),
                                    strict=True):
            tally.record(case, error)
    assert sum(tally.codes.values()) == CASES
    assert not tally.failures, f"{len(tally.failures)} of {CASES}: {tally.failures[:5]}"
    # The cases reach past validation too: some run to completion.
    assert tally.codes["OK"] > 0 and tally.codes["INVALID_ARGUMENT"] > 0, tally.codes
    assert "internal error" not in fuzzed_server.logs()
