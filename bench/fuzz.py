"""Long fuzz run of ExecutePipeline, StreamPipeline and ModelInfer against a real
``tensorline serve``.

The same seeded cases as ``tests/server/service/test_fuzz.py`` (``tests/support/fuzz.py``), at
counts CI cannot afford. Reports, per RPC, the statuses seen, the rate and every case that got
INTERNAL or an UNKNOWN that names no node; exits 1 if there was any. Replay one case with
``--start N --cases 1``. Figures: docs/robustness.md.

    .venv/bin/python bench/fuzz.py --cases 50000            # per RPC
    .venv/bin/python bench/fuzz.py --target host:port ...   # an already running server
                                                             # (ModelInfer: with --pipelines
                                                             # holding tests.support.fuzz.MODELS)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Imported once the repository root is on the path (the cases live with the tests).
from tests.support import fuzz
from tests.support.processes import ServerProcess

SERVER_ENV = {"TENSORLINE_NODE_MODULES": fuzz.NODE_MODULES, "TENSORLINE_SANDBOX": "false",
              "TENSORLINE_LOAD_ENTRY_POINTS": "false"}


def run_rpc(target: str, rpc: str, args: argparse.Namespace) -> dict[str, Any]:
    run = fuzz.RPCS[rpc][1]
    tally = fuzz.Tally()
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel, ThreadPoolExecutor(args.concurrency) as pool:
        done = 0
        # In batches: the cases of a batch are made, sent and forgotten before the next.
        for first in range(args.start, args.start + args.cases, 1000):
            count = min(1000, args.start + args.cases - first)
            batch = list(fuzz.cases(args.seed, rpc, count, first))
            for (case, _), error in zip(batch, pool.map(lambda c: run(channel, c[1]), batch),
                                        strict=True):
                tally.record(case, error)
            done += count
            print(f"{rpc}: {done}/{args.cases}", file=sys.stderr, end="\r")
    seconds = time.perf_counter() - started
    return {"rpc": rpc, "cases": args.cases, "seconds": round(seconds, 1),
            "cases_per_s": round(args.cases / seconds, 1), "codes": dict(tally.codes.most_common()),
            "failures": tally.failures}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50_000, help="cases per RPC")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="first case number")
    parser.add_argument("--concurrency", type=int, default=4, help="calls in flight")
    parser.add_argument("--rpc", choices=sorted(fuzz.RPCS), action="append")
    parser.add_argument("--target", help="fuzz this server instead of starting one")
    args = parser.parse_args()
    rpcs = args.rpc or sorted(fuzz.RPCS)
    results = []
    if args.target:
        results = [run_rpc(args.target, rpc, args) for rpc in rpcs]
        server_errors = None
    else:
        with tempfile.TemporaryDirectory(prefix="fuzz-models-") as models:
            fuzz.write_models(Path(models))
            with ServerProcess.start(env={**SERVER_ENV, "TENSORLINE_PIPELINES_DIR": models},
                                     pythonpath_repo=True) as server:
                results = [run_rpc(server.target, rpc, args) for rpc in rpcs]
                server_errors = server.logs().count("internal error")
    print(json.dumps({"seed": args.seed, "results": results,
                      "server_log_internal_errors": server_errors}, indent=2))
    return 1 if any(r["failures"] for r in results) or server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
