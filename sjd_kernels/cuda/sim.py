"""Run the CUDA backend's kernels on the CPU, for machines without a GPU.

``csrc/`` is compiled a second time, as plain C++ with ``csrc/sim/`` first on the include path: its
stand-ins for the CUDA headers run every thread of a block as a fiber, with the block's shared
memory, barriers and warp intrinsics (``csrc/sim/sjd_sim.h`` says what is and is not modelled). The
result is a Python module with the same functions as ``sjd_kernels._C``; inside ``simulate()`` the
CUDA wrappers (``sjd_kernels.cuda.*``) use it and take CPU tensors::

    from sjd_kernels.cuda import sim
    from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda
    with sim.simulate(order="reverse"):
        out = jacobi_step_cuda(...)          # CPU tensors, the CUDA kernels' code

It checks the kernels' logic (parity with the reference, barriers, warp exchanges, shared-memory
layouts) in CI; it says nothing about speed, and its float library is the host's. ``load(race=True)``
builds a second module whose kernels are compiled with ``-fsanitize=thread`` and checked access by
access (``csrc/sim/race_check.cpp``): a data race on shared or global memory, or a read of shared
memory the block never wrote, makes the launch raise ``RuntimeError`` naming both source lines
(``simulate(race=True)`` uses it). The module is
built on first use with the system C++ compiler (g++ or clang++, C++17, POSIX ucontext) and
pybind11, and cached under ``$SJD_SIM_CACHE`` (default ``~/.cache/sjd_kernels/sim``) by a hash of
the sources and flags.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCES = ("jacobi_step.cu", "sjd2_prepare.cu", "tree_verify.cu", "tree_kv_update.cu", "verify_chain.cu", "bindings.cpp")
# -U_FORTIFY_SOURCE: the fibers switch stacks with _longjmp, which glibc's fortified longjmp refuses.
FLAGS = ("-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-fvisibility=hidden", "-w",
         "-U_FORTIFY_SOURCE")
# The race-checking build: kernel sources instrumented (their loads and stores call the hooks of
# race_check.cpp; the sanitizer's runtime is not linked), with line tables for the reports.
RACE_KERNEL_FLAGS = ("-fsanitize=thread", "-g", "-DSJD_SIM_RACE")
RACE_FLAGS = ("-DSJD_SIM_RACE",)
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}

_modules: dict = {}


class SimUnavailable(RuntimeError):
    """The simulator cannot be built here (no C++ compiler, no pybind11 or no csrc/ sources)."""


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SimUnavailable("no C++ compiler on PATH (set CXX)")


def _digest(csrc: Path, cxx: str, includes: list[str], race: bool) -> str:
    h = hashlib.sha256()
    for p in sorted(csrc.glob("*")) + sorted((csrc / "sim").glob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(" ".join((cxx,) + FLAGS + tuple(includes) + SOURCES).encode())   # the list linked, too
    if race:
        h.update(" ".join(("race",) + RACE_KERNEL_FLAGS + RACE_FLAGS).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SimUnavailable("building the CUDA simulator failed:\n" + (r.stderr or r.stdout)[-4000:])


def build(csrc: Path | str | None = None, verbose: bool = False, race: bool = False) -> Path:
    """Compile the simulator module from ``csrc`` (default: this checkout's ``csrc/``) if its cached
    build is missing; return the library's path. ``race``: the race-checking build."""
    csrc = CSRC if csrc is None else Path(csrc)
    if not (csrc / "sim" / "sjd_sim.h").is_file():
        raise SimUnavailable(f"kernel sources not found under {csrc} (the simulator builds from a source checkout)")
    try:
        import pybind11
    except ImportError as e:
        raise SimUnavailable("pybind11 is not installed (pip install pybind11)") from e
    cxx = _compiler()
    includes = [str(csrc / "sim"), str(csrc), pybind11.get_include(), sysconfig.get_paths()["include"]]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    cache = Path(os.environ.get("SJD_SIM_CACHE", Path.home() / ".cache" / "sjd_kernels" / "sim"))
    digest = _digest(csrc, cxx, includes, race)
    name = f"_C_sim_{digest}"        # the module's own name: builds from other sources load side by side
    out = cache / digest / f"{name}{suffix}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    common = [*FLAGS, '-DSJD_BUILT_ARCHS="sim"', f"-DSJD_SIM_MODULE={name}", *[f"-I{i}" for i in includes]]
    if not race:
        _run([cxx, *common, "-x", "c++", *[str(csrc / s) for s in SOURCES], "-o", str(tmp)], verbose)
    else:
        # kernels instrumented, the bindings and the checker not (the checker's own accesses must
        # not call its hooks); then one link without the sanitizer's runtime
        objs = []
        for s in SOURCES + ("sim/race_check.cpp",):
            kernel = s.endswith(".cu")
            obj = out.with_name(Path(s).name + f".{os.getpid()}.o")
            flags = list(RACE_KERNEL_FLAGS) if kernel else [*RACE_FLAGS, "-O2"]
            _run([cxx, *[f for f in common if f != "-shared"], *flags, "-c", "-x", "c++", str(csrc / s),
                  "-o", str(obj)], verbose)
            objs.append(str(obj))
        try:
            _run([cxx, "-shared", "-fPIC", *[str(o) for o in objs], "-o", str(tmp)], verbose)
        finally:
            for o in objs:
                Path(o).unlink(missing_ok=True)
        # a hook the instrumentation calls and race_check.cpp lacks would fail only at import
        nm = shutil.which("nm")
        if nm:
            r = subprocess.run([nm, "-D", "--undefined-only", str(tmp)], capture_output=True, text=True)
            missing = sorted({ln.split()[-1] for ln in r.stdout.splitlines() if "__tsan_" in ln})
            if missing:
                tmp.unlink(missing_ok=True)
                raise SimUnavailable("race_check.cpp lacks the hooks " + ", ".join(missing))
    os.replace(tmp, out)
    return out


def load(csrc: Path | str | None = None, race: bool = False):
    """The simulator module built from ``csrc`` (default: this checkout's), with the functions of
    ``sjd_kernels._C``; built on first use. ``race``: the race-checking build (slower)."""
    path = build(csrc, race=race)
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(path.name.split(".")[0], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[path] = mod
    return _modules[path]


@contextlib.contextmanager
def simulate(order: str = "forward", seed: int = 0, module=None, race: bool | None = None):
    """Inside the block the CUDA wrappers run their kernels in the simulator on CPU tensors.

    ``order`` is the order in which the threads of a block run from one barrier to the next:
    "forward" (the lowest-numbered runnable thread always goes next, so the first warps run as
    far ahead of the others as the barriers allow), "reverse" (the highest first) or "shuffle"
    (sweeps in a random order drawn from ``seed``). Code that synchronises as CUDA requires gives
    the same results under every order; a missing barrier or a buffer reused too early usually
    shows under "forward" or "reverse". ``race``: run the race-checking build (``load(race=True)``),
    whose launches raise ``RuntimeError`` on a data race or a read of unwritten shared memory,
    whatever the order; by default on when the environment sets ``SJD_SIM_RACE=1`` (so a whole
    test session can run with the checks); ignored when ``module`` is given.
    """
    from .. import _ext
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    if race is None:
        race = os.environ.get("SJD_SIM_RACE", "0") == "1"
    mod = load(race=race) if module is None else module
    mod.sim_configure(ORDERS[order], int(seed))
    old, _ext._SIM = _ext._SIM, mod
    try:
        yield mod
    finally:
        _ext._SIM = old
