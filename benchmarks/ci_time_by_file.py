"""Test time per file from a pytest JUnit XML report (``pytest --junitxml=FILE``), largest first.

    PYTEST_ADDOPTS="--junitxml=/tmp/ci.xml" bash .ci/run
    python benchmarks/ci_time_by_file.py /tmp/ci.xml [--top 15]

Sums each test's call, setup and teardown time as pytest reports it (seconds, one decimal); under
``-n auto`` the sum is CPU time over the workers, not wall time. The tests of a ``Test*`` class
count for the file that holds the class (pytest's ``classname`` is ``module.Class`` for those).
"""
from __future__ import annotations

import argparse
import collections
import xml.etree.ElementTree as ET


def file_of(classname: str, file: str | None = None) -> str:
    """The test file of a JUnit ``testcase``: its ``file`` attribute (``junit_family=xunit1``) or its
    ``classname`` (``tests.test_x`` or ``tests.test_x.TestClass[.Nested]``) less the class names
    (pytest collects classes named ``Test*``; modules are ``test_*.py`` / ``*_test.py``), as a path."""
    if file:
        return file
    parts = classname.split(".")
    while len(parts) > 1 and parts[-1][:1].isupper():
        parts.pop()
    return "/".join(parts) + ".py"


def by_file(path: str) -> tuple[collections.Counter, collections.Counter]:
    secs, count = collections.Counter(), collections.Counter()
    for tc in ET.parse(path).getroot().iter("testcase"):
        cls, file = tc.get("classname"), tc.get("file")
        name = file_of(cls or "", file) if cls or file else "?"
        secs[name] += float(tc.get("time") or 0.0)
        count[name] += 1
    return secs, count


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="a pytest --junitxml file")
    ap.add_argument("--top", type=int, default=15, help="files to list, >= 1 (default 15)")
    a = ap.parse_args(argv)
    if a.top < 1:
        ap.error(f"argument --top: must be an int >= 1, got {a.top}")
    try:
        secs, count = by_file(a.report)
    except OSError as e:
        ap.error(f"argument report: cannot read {a.report}: {e.strerror or e}")
    except (ET.ParseError, ValueError) as e:
        ap.error(f"argument report: {a.report} is not a JUnit XML report (pytest --junitxml): {e}")
    print(f"total {sum(secs.values()):.1f} s over {sum(count.values())} tests in {len(secs)} files")
    print("| seconds | tests | file |\n|---|---|---|")
    for name, s in secs.most_common(a.top):
        print(f"| {s:.1f} | {count[name]} | {name} |")


if __name__ == "__main__":
    main()
