"""Test time per file from a pytest JUnit XML report (``pytest --junitxml=FILE``), largest first.

    PYTEST_ADDOPTS="--junitxml=/tmp/ci.xml" bash .ci/run
    python benchmarks/ci_time_by_file.py /tmp/ci.xml [--top 15]

Sums each test's call, setup and teardown time as pytest reports it; under ``-n auto`` the sum is
CPU time over the workers, not wall time.
"""
from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def by_file(path: str) -> tuple[collections.Counter, collections.Counter]:
    secs, count = collections.Counter(), collections.Counter()
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("classname") or "?"
        secs[name] += float(tc.get("time") or 0.0)
        count[name] += 1
    return secs, count


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a pytest --junitxml file")
    ap.add_argument("--top", type=int, default=15, help="files to list (default 15)")
    a = ap.parse_args(argv)
    secs, count = by_file(a.report)
    print(f"total {sum(secs.values()):.0f} s over {sum(count.values())} tests")
    print("| seconds | tests | file |\n|---|---|---|")
    for name, s in secs.most_common(a.top):
        print(f"| {s:.0f} | {count[name]} | {name} |")


if __name__ == "__main__":
    main()
