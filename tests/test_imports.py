"""Every module of the package imports when it is the first of the package to be imported.

An import cycle between subpackages only shows in that order (``import sjd_kernels.ops.sjd2_prepare``
in a fresh interpreter once failed: its reference imported ``sjd_kernels.sjd2``, whose
``__init__`` imports the op's module back). One subprocess imports each module after dropping
every ``sjd_kernels`` module from ``sys.modules`` (torch stays loaded, so it takes seconds).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib, json, pkgutil, sys, warnings
warnings.simplefilter("ignore")
import torch  # noqa: F401
import sjd_kernels
names = sorted(m.name for m in pkgutil.walk_packages(sjd_kernels.__path__, "sjd_kernels.")
               if not m.name.endswith("__main__"))
fails = {}
for name in names:
    for k in [k for k in sys.modules if k == "sjd_kernels" or k.startswith("sjd_kernels.")]:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    except Exception as e:
        fails[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"names": names, "fails": fails}))
"""


def test_every_module_imports_first():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["names"]) > 40 and "sjd_kernels.ops.sjd2_prepare" in out["names"]
    assert out["fails"] == {}
