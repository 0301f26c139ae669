"""Sum a FBP_COMPILE_REPORT directory per test file (or per test with --tests).

Usage: ``FBP_COMPILE_REPORT=/tmp/cr pytest ...`` then
``python tests/compile_report.py /tmp/cr [--tests] [--top N]``.
"""

import argparse
import collections
import json
import pathlib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--tests", action="store_true", help="one row per test, not per file")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--programs", action="store_true", help="the slowest single compilations and their tests"
    )
    args = parser.parse_args()
    rows = [json.loads(line) for f in args.directory.glob("*.jsonl") for line in f.open()]
    if args.programs:
        programs = [
            (p[0], p[1], row["test"]) for row in rows for p in row.get("slowest_programs", [])
        ]
        for seconds, name, test in sorted(programs, reverse=True)[: args.top]:
            print(f"{seconds:6.2f} s  {str(name)[:40]:40s} {test[-80:]}")
        return
    sums = collections.defaultdict(lambda: collections.Counter())
    for row in rows:
        key = row["test"] if args.tests else row["test"].split("::")[0]
        sums[key].update(
            {k: v for k, v in row.items() if k not in ("test", "slowest_programs")} | {"tests": 1}
        )
    total = collections.Counter()
    for s in sums.values():
        total.update(s)
    print(
        f"{'':60s} {'tests':>5s} {'wall s':>8s} {'compiles':>8s} {'compile s':>9s} {'trace s':>8s} {'lower s':>8s}"
    )
    top = sorted(sums.items(), key=lambda kv: -kv[1]["wall_s"])[: args.top]
    for key, s in [*top, ("TOTAL", total)]:
        print(
            f"{key[-60:]:60s} {s['tests']:5d} {s['wall_s']:8.1f} {s['compiles']:8d} "
            f"{s['compile_s']:9.1f} {s['trace_s']:8.1f} {s['lower_s']:8.1f}"
        )


if __name__ == "__main__":
    main()
