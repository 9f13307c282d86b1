"""Build script: the Python package, plus the CUDA extension ``sjd_kernels._C`` built by CMake + nvcc.

Environment knobs (read once, reported in the build log):

    SJD_BUILD_CUDA   auto (default): build when nvcc is found, else ship the pure-Python package
                     1: build or fail the install;  0: never build
    SJD_CUDA_ARCHS   SASS targets, default "80;90;90a" (separators ; , or space; "sm_90", "9.0" accepted)
    SJD_BUILD_JOBS   parallel compile jobs (default 2)
    SJD_PTXAS_VERBOSE=1  print ptxas register / shared-memory / spill figures per kernel
    SJD_INPLACE_COPY     0: never mirror the built module into the source tree's sjd_kernels/; 1: always;
                         unset: mirror when the source tree is a git checkout, so that `python -m pytest`
                         run from it (which imports the source tree) sees the same build as site-packages
    CUDACXX, CUDA_HOME, CUDA_PATH   where to look for nvcc (then /usr/local/cuda*/bin, then PATH)

The decision logic lives in plain functions (``parse_build_cuda``, ``parse_archs``, ``find_nvcc``,
``build_plan``) so tests can import this file and check it without building anything; ``setup()``
only runs when the file is executed as a script (pip and ``python setup.py`` both do that).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = ("80", "90", "90a")
_TRUE = {"1", "true", "yes", "on", "force"}
_FALSE = {"0", "false", "no", "off", "skip"}


def parse_build_cuda(value: str | None) -> str:
    """Normalise SJD_BUILD_CUDA to ``"auto"``, ``"1"`` or ``"0"``; raise ValueError on anything else."""
    v = (value or "").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in _TRUE:
        return "1"
    if v in _FALSE:
        return "0"
    raise ValueError(f"SJD_BUILD_CUDA must be auto, 1 or 0 (also true/false/yes/no/on/off), got {value!r}")


def parse_archs(value: str | None) -> list[str]:
    """SASS targets from SJD_CUDA_ARCHS: ``"80;90;90a"`` -> ``["80", "90", "90a"]`` (order kept, duplicates dropped)."""
    if value is None or not value.strip():
        return list(DEFAULT_ARCHS)
    out: list[str] = []
    for tok in re.split(r"[;,\s]+", value.strip()):
        if not tok:
            continue
        t = tok.lower()
        for prefix in ("sm_", "compute_"):
            if t.startswith(prefix):
                t = t[len(prefix):]
        t = t.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", t):
            raise ValueError(f"SJD_CUDA_ARCHS entry {tok!r} is not an architecture like 80, 90, 90a or sm_90")
        if int(re.match(r"\d+", t).group()) < 75:
            raise ValueError(f"SJD_CUDA_ARCHS entry {tok!r}: architectures below sm_75 are not supported by CUDA 13")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError(f"SJD_CUDA_ARCHS={value!r} names no architecture")
    return out


def parse_jobs(value: str | None) -> int:
    if value is None or not value.strip():
        return 2
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"SJD_BUILD_JOBS must be a positive integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"SJD_BUILD_JOBS must be a positive integer, got {value!r}")
    return n


def _is_exe(p: str) -> bool:
    return os.path.isfile(p) and os.access(p, os.X_OK)


def find_nvcc(env: dict | None = None, system_paths: list[str] | None = None) -> tuple[str | None, list[str]]:
    """(path to nvcc or None, the places looked at, in order).

    Order: $CUDACXX, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin, /usr/local/cuda-*/bin
    (newest first), then PATH. A PATH hit that is a shell wrapper still works with CMake, but the
    toolkit directories are preferred because CMake derives the toolkit root from the compiler path.
    ``system_paths`` replaces the /usr/local candidates (tests pass [] to simulate a bare machine).
    """
    env = os.environ if env is None else env
    tried: list[str] = []
    cands: list[str] = []
    if env.get("CUDACXX"):
        cands.append(env["CUDACXX"])
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if env.get(var):
            cands.append(os.path.join(env[var], "bin", "nvcc"))
    if system_paths is None:
        def _ver(p: str):
            m = re.search(r"cuda-(\d+)\.(\d+)", p)
            return (int(m.group(1)), int(m.group(2))) if m else (0, 0)

        system_paths = ["/usr/local/cuda/bin/nvcc"] + sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), key=_ver,
                                                              reverse=True)
    cands += list(system_paths)
    for c in cands:
        tried.append(c)
        if _is_exe(c):
            return os.path.realpath(c), tried
    on_path = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    tried.append("PATH")
    if on_path:
        return _unwrap_nvcc(os.path.realpath(on_path)), tried
    return None, tried


def _unwrap_nvcc(path: str) -> str:
    """The real compiler behind a shell wrapper (``exec /usr/local/cuda-X/bin/nvcc "$@"``), else ``path``.

    CMake derives the toolkit root from the compiler's location, which a wrapper in /usr/bin hides.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return path
    if head.startswith(b"\x7fELF"):
        return path
    for m in re.finditer(rb"(/[^\s\"']+/bin/nvcc)\b", head):
        real = m.group(1).decode(errors="replace")
        if real != path and _is_exe(real):
            return os.path.realpath(real)
    return path


def build_plan(env: dict | None = None, system_paths: list[str] | None = None) -> dict:
    """Decide whether and how to build the extension from the environment.

    Returns ``{"build": bool, "mode": "auto"|"1"|"0", "reason": str, "nvcc": str|None,
    "archs": [...], "jobs": int}``. Raises RuntimeError when SJD_BUILD_CUDA=1 cannot be honoured
    and ValueError for malformed knobs (a typo in a knob must not silently change the build).
    """
    env = os.environ if env is None else env
    mode = parse_build_cuda(env.get("SJD_BUILD_CUDA"))
    archs = parse_archs(env.get("SJD_CUDA_ARCHS"))
    jobs = parse_jobs(env.get("SJD_BUILD_JOBS"))
    plan = {"build": False, "mode": mode, "reason": "", "nvcc": None, "archs": archs, "jobs": jobs}
    if mode == "0":
        plan["reason"] = "SJD_BUILD_CUDA=0: CUDA extension not built (pure-Python install)"
        return plan
    if not (ROOT / "CMakeLists.txt").exists() or not (ROOT / "csrc").is_dir():
        msg = f"CMakeLists.txt or csrc/ missing under {ROOT} (an sdist made without them?)"
        if mode == "1":
            raise RuntimeError(f"SJD_BUILD_CUDA=1 but {msg}")
        plan["reason"] = f"SJD_BUILD_CUDA=auto: {msg}; CUDA extension not built (pure-Python install)"
        return plan
    nvcc, tried = find_nvcc(env, system_paths)
    if nvcc is None:
        msg = "nvcc not found (looked at: " + ", ".join(tried) + ")"
        if mode == "1":
            raise RuntimeError(f"SJD_BUILD_CUDA=1 but {msg}; set CUDACXX or CUDA_HOME, or use SJD_BUILD_CUDA=auto")
        plan["reason"] = f"SJD_BUILD_CUDA=auto: {msg}; CUDA extension not built (pure-Python install)"
        return plan
    plan.update(build=True, nvcc=nvcc,
                reason=f"building sjd_kernels._C with {nvcc} for " + ", ".join(f"sm_{a}" for a in archs))
    return plan


def _tool(name: str, module: str) -> str | None:
    """A build tool from PATH, else from its PyPI wrapper package (cmake, ninja)."""
    p = shutil.which(name)
    if p:
        return p
    try:
        mod = __import__(module)
        d = getattr(mod, "CMAKE_BIN_DIR", None) or getattr(mod, "BIN_DIR", None)
        if d and _is_exe(os.path.join(d, name)):
            return os.path.join(d, name)
    except Exception:
        pass
    return None


def _is_checkout() -> bool:
    flag = os.environ.get("SJD_INPLACE_COPY", "")
    return flag == "1" or (flag != "0" and (ROOT / ".git").exists())


def _say(msg: str) -> None:
    print(f"[sjd_kernels build] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext
    from setuptools.command.build_py import build_py

    try:
        plan = build_plan()
    except (RuntimeError, ValueError) as e:
        _say(f"ERROR: {e}")
        raise SystemExit(f"sjd_kernels build: {e}") from None
    _say(plan["reason"])
    if not plan["build"] and _is_checkout():
        for stale in (ROOT / "sjd_kernels").glob("_C*.so"):
            stale.unlink()
            _say(f"removed {stale} from an earlier build, so the checkout does not claim an extension it lacks")

    class CMakeExtension(Extension):
        def __init__(self, name: str):
            super().__init__(name, sources=[])

    class CMakeBuild(build_ext):
        def build_extension(self, ext):
            cmake = _tool("cmake", "cmake")
            ninja = _tool("ninja", "ninja")
            missing = [n for n, p in (("cmake", cmake), ("ninja", ninja)) if p is None]
            if missing:
                raise RuntimeError("sjd_kernels build: " + " and ".join(missing) + " not found; "
                                   "pip install cmake ninja (or build with build isolation)")
            import pybind11
            extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
            build_dir = Path(self.build_temp).resolve() / "cmake"
            build_dir.mkdir(parents=True, exist_ok=True)
            toolkit = str(Path(plan["nvcc"]).parent.parent)
            args = [
                cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
                f"-DCMAKE_MAKE_PROGRAM={ninja}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DCMAKE_CUDA_COMPILER={plan['nvcc']}",
                f"-DCUDAToolkit_ROOT={toolkit}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                f"-DSJD_CUDA_ARCHS={';'.join(plan['archs'])}",
                f"-DSJD_NVCC_THREADS={plan['jobs']}",
                f"-DSJD_PTXAS_VERBOSE={'ON' if os.environ.get('SJD_PTXAS_VERBOSE') == '1' else 'OFF'}",
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            ]
            _say("configure: " + " ".join(args[1:]))
            subprocess.check_call(args)
            subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", str(plan["jobs"])])
            built = sorted(extdir.glob("_C*.so")) + sorted(extdir.glob("_C*.pyd"))
            if not built:
                raise RuntimeError(f"sjd_kernels build: CMake finished but no _C module appeared in {extdir}")
            _say(f"built {built[0].name} for " + ", ".join(f"sm_{a}" for a in plan["archs"]))
            in_tree = ROOT / "sjd_kernels"
            if not self.inplace and _is_checkout() and extdir != in_tree.resolve():
                # `python -m pytest` from a checkout imports the source tree, not site-packages:
                # keep a copy of the module there too (git-ignored) so both see the same build.
                for old in in_tree.glob("_C*.so"):
                    old.unlink()
                shutil.copy2(built[0], in_tree / built[0].name)
                _say(f"copied {built[0].name} into {in_tree} for in-tree imports")

    class BuildPyWithInfo(build_py):
        """Also write ``sjd_kernels/_build_info.json`` (into the build tree only): what was built and why."""

        def run(self):
            super().run()
            if getattr(self, "editable_mode", False):
                return
            out = Path(self.build_lib) / "sjd_kernels" / "_build_info.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({k: plan[k] for k in ("build", "mode", "reason", "archs")}, indent=1) + "\n")

    setup(
        ext_modules=[CMakeExtension("sjd_kernels._C")] if plan["build"] else [],
        cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithInfo},
    )


if __name__ == "__main__":
    main()
