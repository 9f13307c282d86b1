"""Skip helpers shared by the test files (import as ``from _util import requires_cuda, ...``).

- ``requires_cuda``: a CUDA device is visible to torch.
- ``requires_ext``: the compiled extension ``sjd_kernels._C`` imports (no device needed).
- ``requires_cuda_ext``: both. Use it for tests of the CUDA backend.
- ``gpu``: the ``gpu`` marker (``pytest -m gpu`` selects the tests that need a device).

With ``SJD_REQUIRE_EXT=1`` (CI sets it after building the extension) a missing extension is not a
reason to skip: those tests run and fail, so a build that silently shipped without ``_C`` is caught.
A missing GPU is always a reason to skip.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

REQUIRE_EXT = os.environ.get("SJD_REQUIRE_EXT", "0") == "1"


def ext_status() -> tuple[bool, str]:
    """(importable, why not) for ``sjd_kernels._C``."""
    from sjd_kernels import _ext
    if _ext._C is not None:
        return True, ""
    return False, f"sjd_kernels._C not built or not importable ({_ext._ERR})"


HAS_CUDA = torch.cuda.is_available()
HAS_EXT, EXT_WHY = ext_status()

gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
requires_ext = pytest.mark.skipif(not HAS_EXT and not REQUIRE_EXT,
                                  reason=EXT_WHY + " (set SJD_REQUIRE_EXT=1 to fail instead)")
requires_cuda_ext = pytest.mark.skipif(
    not HAS_CUDA or (not HAS_EXT and not REQUIRE_EXT),
    reason=("needs a CUDA device (torch.cuda.is_available() is False)" if not HAS_CUDA
            else EXT_WHY + " (set SJD_REQUIRE_EXT=1 to fail instead)"))


def sim_module(race=False):
    """The CPU simulator of the CUDA kernels (``sjd_kernels.cuda.sim``; ``race``: its race-checking
    build), built on first use. Skips the calling test when it cannot be built here (no C++
    compiler or pybind11); with ``SJD_REQUIRE_EXT=1`` (CI) that is a failure instead."""
    from sjd_kernels.cuda import sim
    try:
        return sim.load(race=race)
    except sim.SimUnavailable as e:
        if REQUIRE_EXT:
            pytest.fail(f"SJD_REQUIRE_EXT=1 but the CUDA simulator cannot be built: {e}")
        pytest.skip(str(e))


def load_file_module(name: str, path) -> object:
    """Import a script that is not part of a package (``setup.py``, ``python/*.py``) as module ``name``;
    a guarded ``if __name__ == "__main__"`` block does not run."""
    spec = importlib.util.spec_from_file_location(name, Path(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_PROBE = '''import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def probe(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


src = triton.compiler.ASTSource(fn=probe, signature={"x_ptr": "*fp32"}, constexprs={})
print(".target sm_90" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"])
'''


@functools.lru_cache(maxsize=None)
def triton_codegen_problem() -> str | None:
    """None when this Triton build generates sm_90 code here (a one-line kernel compiles, in a
    subprocess with the interpreter off); else why not. A codegen test whose kernels fail to compile
    may skip only when this probe fails too: a kernel that ptxas refuses is a failure, not a skip."""
    import subprocess
    import sys
    import tempfile
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "triton_probe.py"                  # @triton.jit reads the kernel's source file
        path.write_text(_PROBE)
        try:
            p = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "a one-line Triton kernel did not compile for sm_90 within 300 s"
    if p.returncode == 0 and p.stdout.strip().endswith("True"):
        return None
    return f"this Triton build cannot generate sm_90 code here (a one-line kernel fails too): {p.stderr[-300:]}"


def triton_interpreting() -> bool:
    """Triton is installed and its interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1 set
    before Triton was imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from sjd_kernels.triton.jacobi_step import is_interpreted
    return is_interpreted()
