"""Before/after in one run (by hand): a benchmark script run alternately by two checkouts.

    BENCH="bench/bench_stream.py --rounds 1"
    python bench/compare.py --before ../main/.venv/bin/python --runs 6 -- $BENCH

``--before`` and ``--after`` (default: this interpreter) are the Python of two virtualenvs,
each with its own checkout of tensorline installed (``pip install -e``). The script named after
``--`` (this checkout's, so both sides run the same benchmark code) runs ``--runs`` times under
each, alternating (before, after, before, ...), so the drift of a shared machine hits both
alike; it must accept ``--json FILE``. Prints the median of every figure over the runs, for
each side, and after / before.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="Python of the 'before' checkout")
    parser.add_argument("--after", default=sys.executable, help="Python of the 'after' checkout")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--json", help="also write the medians to this file")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- SCRIPT [ARGS...] (a benchmark that accepts --json FILE)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the benchmark script after --")
    figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="tensorline-compare-") as folder:
        for run in range(args.runs):
            for side in ("before", "after"):
                python = args.before if side == "before" else args.after
                out = os.path.join(folder, f"{side}-{run}.json")
                subprocess.run([python, *command, "--json", out], check=True,
                               stdout=subprocess.DEVNULL)
                with open(out) as handle:
                    for key, value in json.load(handle).items():
                        if isinstance(value, int | float):
                            figures[side].setdefault(key, []).append(float(value))
                print(f"run {run + 1}/{args.runs} {side} done", file=sys.stderr, flush=True)
    medians = {side: {k: statistics.median(v) for k, v in values.items()}
               for side, values in figures.items()}
    print(f"\nmedians over {args.runs} alternating runs of {' '.join(command)}\n")
    print(f"{'figure':<34}{'before':>14}{'after':>14}{'after/before':>14}")
    for key in medians["after"]:
        before, after = medians["before"].get(key), medians["after"][key]
        ratio = f"{after / before:>13.2f}x" if before else f"{'':>14}"
        shown = "" if before is None else f"{before:>14.6g}"
        print(f"{key:<34}{shown:>14}{after:>14.6g}{ratio}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(medians, handle, indent=2)


if __name__ == "__main__":
    main()
