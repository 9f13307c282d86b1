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
pybind11, and cached under ``$SJD_SIM_CACHE`` (default ``~/.cache/sjd_kernels/sim``): each source's
object by a hash of its bytes, the headers it includes and the flags, the module by the hash of its
objects.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCES = ("jacobi_step.cu", "sjd2_prepare.cu", "tree_verify.cu", "tree_kv_update.cu", "verify_chain.cu", "bindings.cpp")
# -U_FORTIFY_SOURCE: the fibers switch stacks with _longjmp, which glibc's fortified longjmp refuses.
# -fno-strict-aliasing: the kernels access memory through pointers of another type (a 16-byte vector
# load read as its elements, float rows zeroed as float4: -Wstrict-aliasing names for_each_logit and
# zero_row in sampling.cuh and hist_bufs_after_row in target.cuh), CUDA idioms that C++'s aliasing
# rules do not allow. Built at -O2 without this flag the simulator failed the parity tests (status
# errors); with it they passed, and ran no faster than at -O1, which does not apply the rules.
FLAGS = ("-std=c++17", "-O1", "-fno-strict-aliasing", "-ffp-contract=off", "-fPIC", "-fvisibility=hidden", "-w",
         "-U_FORTIFY_SOURCE")
# The race-checking build: kernel sources instrumented (their loads and stores call the hooks of
# race_check.cpp; the sanitizer's runtime is not linked), with line tables for the reports.
RACE_KERNEL_FLAGS = ("-fsanitize=thread", "-g", "-DSJD_SIM_RACE")
RACE_FLAGS = ("-DSJD_SIM_RACE",)
LINK_FLAGS = ("-shared", "-fPIC", "-Wl,-Bsymbolic")
ORDERS = {"forward": 0, "reverse": 1, "shuffle": 2}

_modules: dict = {}
_load_lock = threading.RLock()


class SimUnavailable(RuntimeError):
    """The simulator cannot be built here (no C++ compiler, no pybind11 or no csrc/ sources)."""


_BOUND = re.compile(r"__launch_bounds__\(\s*([A-Za-z_]\w*|\d+)\s*(?:,[^)]*)?\)\s*([A-Za-z_]\w*)\s*\(")
_BOUND_ANY = re.compile(r"__launch_bounds__\s*\(")


def launch_bounds(text: str) -> dict:
    """``{kernel name: max threads per block}`` of every ``__launch_bounds__(N[, ...]) name(`` in a source's
    text; ``N`` an integer literal or a ``constexpr int N = value;`` of the same source, and the kernel
    launched by its name (``SJD_LAUNCH(name`` or ``SJD_LAUNCH((name<...>)``), which is how the launch finds
    its bound. Anything else raises SimUnavailable: the simulator could not enforce that bound."""
    found = _BOUND.findall(text)
    if len(found) != len(_BOUND_ANY.findall(text)):
        raise SimUnavailable("a __launch_bounds__ the simulator cannot read: write `__launch_bounds__(N[, M]) "
                             "name(` with N an integer or a 'constexpr int' of the same source")
    out = {}
    for expr, name in found:
        if not re.search(rf"SJD_(?:SIM_)?LAUNCH\(\s*\(?\s*{re.escape(name)}\b", text):
            raise SimUnavailable(f"{name} has __launch_bounds__ but is not launched by its name "
                                 f"(SJD_LAUNCH({name}...)): the simulator could not find its bound at the launch")
        if expr.isdigit():
            out[name] = int(expr)
            continue
        m = re.search(rf"constexpr\s+(?:unsigned\s+)?int\s+{re.escape(expr)}\s*=\s*(\d+)\s*[;,]", text)
        if m is None:
            raise SimUnavailable(f"__launch_bounds__({expr}) of {name}: the simulator reads only an integer or a "
                                 f"'constexpr int {expr} = N;' of the same source")
        out[name] = int(m.group(1))
    return out


def launch_bounds_flag(text: str) -> str:
    """The define that hands a source's ``launch_bounds`` to ``SJD_SIM_LAUNCH`` (csrc/sim/sjd_sim.h)."""
    table = ",".join(f"{k}:{v}" for k, v in sorted(launch_bounds(text).items()))
    return f'-DSJD_SIM_LAUNCH_BOUNDS="{table}"'


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise SimUnavailable("no C++ compiler on PATH (set CXX)")


def cache_dir() -> Path:
    """Where builds are cached: ``$SJD_SIM_CACHE`` (``~`` expanded, made absolute), default
    ``~/.cache/sjd_kernels/sim`` (also when the variable is set but empty)."""
    from .._cache import cache_dir as user_cache
    return user_cache("SJD_SIM_CACHE", "sim")


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    """The compiler's ``--version`` banner: part of the objects' cache key, so that objects built by
    another compiler at the same path are not reused."""
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout.strip()


def include_dirs(csrc: Path) -> list[Path]:
    """The folders the simulator's sources include from, in search order: ``csrc/sim`` (the stand-in
    CUDA headers) first, then ``csrc``."""
    return [(csrc / "sim").resolve(), csrc.resolve()]


_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)


def _headers(src: Path, dirs: list[Path]) -> list[Path]:
    """The files under ``dirs`` that ``src`` includes, directly or not, as the compiler finds them
    (``"x"``: the including file's folder first, then ``dirs`` in order; ``<x>``: ``dirs``). Every
    literal include is followed, also those under preprocessor conditions, so the list can only be
    too long; an include the pattern cannot read raises, so that no dependency is missed."""
    seen: dict[Path, None] = {}
    todo = [src]
    while todo:
        f = todo.pop()
        text = f.read_text()
        lines = [ln for ln in text.splitlines() if re.match(r"\s*#\s*include", ln)]
        found = _INCLUDE.findall(text)
        if len(found) != len(lines):
            raise SimUnavailable(f"{f.name}: an #include the simulator's build cache cannot follow")
        for kind, name in found:
            for d in ([f.parent] if kind == '"' else []) + dirs:
                h = (d / name).resolve()
                if h.is_file():
                    if h not in seen:
                        seen[h] = None
                        todo.append(h)
                    break
    return list(seen)


def _object(cxx: str, src: Path, flags: list[str], dirs: list[Path], system: list[str], cache: Path,
            verbose: bool) -> Path:
    """Compile one source to an object file, cached by everything it is made of: the compiler, the
    flags, the system include folders, and the bytes of the source and of every header it includes
    from ``dirs``. The folders' own paths do not count, so a mutated copy of ``csrc/`` (the tests'
    mutants) rebuilds only the objects whose sources or headers differ."""
    import pybind11
    h = hashlib.sha256(" ".join([cxx, _compiler_version(cxx), *flags, *system, pybind11.__version__,
                                 sysconfig.get_python_version()]).encode())
    for f in [src] + sorted(_headers(src, dirs), key=lambda x: x.name):
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    obj = cache / "obj" / f"{src.name}.{h.hexdigest()[:20]}.o"
    if not obj.is_file():
        obj.parent.mkdir(parents=True, exist_ok=True)
        tmp = obj.with_name(obj.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
        _run([cxx, *flags, *[f"-I{d}" for d in dirs], *[f"-I{i}" for i in system], "-c", "-x", "c++", str(src),
              "-o", str(tmp)], verbose)
        os.replace(tmp, obj)
    return obj


def _run(cmd: list[str], verbose: bool) -> None:
    if verbose:
        print(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SimUnavailable("building the CUDA simulator failed:\n" + (r.stderr or r.stdout)[-4000:])


def build(csrc: Path | str | None = None, verbose: bool = False, race: bool = False) -> Path:
    """Compile the simulator module from ``csrc`` (default: this checkout's ``csrc/``) if its cached
    build is missing; return the library's path. ``race``: the race-checking build.

    Each source is compiled on its own (in parallel) into an object cached by content
    (``_object``), then linked with a two-line entry point of the library's own name,
    ``PyInit__C_sim_<hash of the objects>``: builds from other sources load side by side in one
    process."""
    csrc = CSRC if csrc is None else Path(csrc)
    if not (csrc / "sim" / "sjd_sim.h").is_file():
        raise SimUnavailable(f"kernel sources not found under {csrc} (the simulator builds from a source checkout)")
    try:
        import pybind11
    except ImportError as e:
        raise SimUnavailable("pybind11 is not installed (pip install pybind11)") from e
    cxx = _compiler()
    dirs = include_dirs(csrc)
    system = [pybind11.get_include(), sysconfig.get_paths()["include"]]
    cache = cache_dir()
    common = [*FLAGS, '-DSJD_BUILT_ARCHS="sim"']
    jobs = []
    for s in SOURCES + (("sim/race_check.cpp",) if race else ()):
        bounds = [launch_bounds_flag((csrc / s).read_text())] if s.endswith(".cu") else []
        if not race:
            flags = [*common, *bounds]
        elif s.endswith(".cu"):     # kernels instrumented; the bindings and the checker not (the
            flags = [*common, *bounds, *RACE_KERNEL_FLAGS]     # checker's own accesses must not call its hooks)
        else:
            flags = [*common, *RACE_FLAGS, "-O2"]
        jobs.append((csrc / s, flags))
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        objs = list(pool.map(lambda j: _object(cxx, j[0], j[1], dirs, system, cache, verbose), jobs))
    digest = hashlib.sha256(" ".join([cxx, *LINK_FLAGS, *(o.name for o in objs)]).encode()).hexdigest()[:16]
    name = f"_C_sim_{digest}"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    out = cache / digest / f"{name}{suffix}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    entry = tmp.with_suffix(".entry.cpp")
    # bindings.cpp defines PyInit__C_sim; the module's own name needs its own entry point. -Bsymbolic
    # binds the call to this library's PyInit__C_sim, whatever other simulator modules are loaded.
    entry.write_text('extern "C" void* PyInit__C_sim(void);\n'
                     f'extern "C" __attribute__((visibility("default"))) void* PyInit_{name}(void) '
                     '{ return PyInit__C_sim(); }\n')
    try:
        _run([cxx, *LINK_FLAGS, "-x", "c++", str(entry), "-x", "none", *[str(o) for o in objs], "-o", str(tmp)],
             verbose)
    finally:
        entry.unlink(missing_ok=True)
    if race:
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
    with _load_lock:  # threads that load at once build and import the module once
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
