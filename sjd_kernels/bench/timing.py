"""Timing that tells the truth: CUDA events, warm-up, cold L2, eager and CUDA-graph replay.

Every measured time comes from device events around the timed region only (the L2 flush
between repetitions is outside the events). Times are in microseconds; a run reports
the median and the 20th/80th percentiles of the repetitions. Nothing here times on the
CPU: :func:`require_gpu` refuses, so CPU wall-clock numbers can never be mistaken for GPU
speed.
"""
from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


class NoGPUError(RuntimeError):
    """Raised when a timing is asked for on a machine without a CUDA device."""


def has_gpu() -> bool:
    return torch.cuda.is_available()


def require_gpu(what: str = "timing") -> None:
    if not has_gpu():
        raise NoGPUError(f"{what} needs a CUDA device; none is visible here, so no time is printed "
                         "(CPU times would not mean GPU speed). Run with --check for the correctness checks.")


# --------------------------------------------------------------------------- machine and versions
def git_commit(repo: Optional[str] = None) -> str:
    """``<sha>`` or ``<sha>+dirty`` of the checkout holding the package, ``unknown`` without git."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return os.environ.get("SJD_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return os.environ.get("SJD_GIT_COMMIT", "unknown")


def git_commit_full(repo: Optional[str] = None) -> str:
    """``git rev-parse HEAD``, plus `` + uncommitted changes`` when the checkout differs from it
    (tracked or untracked files); ``unknown (not a git checkout)`` for an installed copy."""
    repo = repo or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return os.environ.get("SJD_GIT_COMMIT", "unknown (not a git checkout)")
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return sha + (" + uncommitted changes" if dirty else "")
    except Exception:
        return os.environ.get("SJD_GIT_COMMIT", "unknown (not a git checkout)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use (``DEFAULT``, ``AVX2``, ``AVX512``, ...).

    It picks the widest the CPU has unless ``ATEN_CPU_CAPABILITY`` names another. The kernels of
    different widths round float sums differently, so a seeded CPU run can sample other tokens on a CPU
    of another width; recorded CPU tables name it so that a re-run can ask for the same."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:                                       # noqa: BLE001 (provenance is best effort)
        return "unknown"


def machine_info() -> dict:
    """GPU name, SM count, L2 size, memory, and the versions of torch, triton, CUDA, python; git commit;
    the CPU, its core count and the vector instruction set torch's CPU kernels use."""
    info = {"gpu": "none (CPU only)", "sm_count": 0, "l2_bytes": 0, "gpu_mem_bytes": 0,
            "torch": torch.__version__, "cuda": torch.version.cuda or "none", "python": platform.python_version(),
            "triton": "not importable", "commit": git_commit(), "commit_full": git_commit_full(), "host": platform.node(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count() or 0, "cpu_capability": cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        pass
    if has_gpu():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_mem_bytes=p.total_memory,
                    l2_bytes=int(getattr(p, "L2_cache_size", 0)), capability=f"{p.major}.{p.minor}")
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
            info["driver"] = drv
        except Exception:
            info["driver"] = "unknown"
    return info


# --------------------------------------------------------------------------- statistics
@dataclass
class Timing:
    """Repetition times of one measurement, microseconds."""
    samples_us: np.ndarray
    graph: bool
    cold_l2: bool
    note: str = ""

    @property
    def median(self) -> float:
        return float(np.median(self.samples_us))

    @property
    def p20(self) -> float:
        return float(np.percentile(self.samples_us, 20))

    @property
    def p80(self) -> float:
        return float(np.percentile(self.samples_us, 80))

    @property
    def min(self) -> float:
        return float(np.min(self.samples_us))

    def row(self) -> dict:
        return {"median_us": round(self.median, 3), "p20_us": round(self.p20, 3), "p80_us": round(self.p80, 3),
                "min_us": round(self.min, 3), "reps": int(len(self.samples_us))}


# --------------------------------------------------------------------------- cold L2
class L2Flusher:
    """Evicts the L2 between repetitions by writing a buffer several times its size.

    The write runs outside the timed events; it also gives the host a head start so that
    the timed launch is queued before the GPU reaches it (launch latency of an eager call
    still shows when the call itself is host-bound, which is the truth for that call).
    """

    def __init__(self, device=None, nbytes: Optional[int] = None):
        require_gpu("L2 flush")
        dev = torch.device("cuda") if device is None else torch.device(device)
        l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)) or 64 << 20
        self.nbytes = int(nbytes or max(4 * l2, 256 << 20))
        self.buf = torch.empty(self.nbytes, dtype=torch.uint8, device=dev)

    def __call__(self):
        self.buf.fill_(0x5A)


# --------------------------------------------------------------------------- timing
def capture_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Capture ``fn`` (already warmed up eagerly) in a CUDA graph; raises if it cannot be captured."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def time_cuda(fn: Callable[[], object], *, reps: int = 50, warmup: int = 5, graph: bool = False,
              flush: Optional[L2Flusher] = None, setup: Optional[Callable[[], object]] = None,
              max_seconds: float = 20.0) -> Timing:
    """Time ``fn`` with CUDA events: ``warmup`` untimed calls, then ``reps`` timed ones.

    ``graph=True`` captures one call in a CUDA graph and times its replays. With ``flush``
    the L2 is evicted before every repetition (cold L2). ``setup`` runs before every call,
    outside the timed region (e.g. restoring mutated state so every rep solves the same
    problem). Stops early (at least 5 reps) when ``max_seconds`` of GPU time is spent, so a
    slow baseline cannot eat the time box.
    """
    require_gpu()
    note = ""
    setup = setup or (lambda: None)
    for _ in range(warmup):
        setup()
        fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        setup()
        g = capture_graph(fn)
        run = g.replay
        for _ in range(2):
            setup()
            run()
        torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    # first rep alone: bounds the count when one call is slow
    setup()
    if flush is not None:
        flush()
    starts[0].record()
    run()
    ends[0].record()
    torch.cuda.synchronize()
    one = starts[0].elapsed_time(ends[0]) * 1e-3
    n = reps
    if one * reps > max_seconds:
        n = max(5, int(max_seconds / max(one, 1e-9)))
        n = min(n, reps)
        note = f"reps cut to {n} by the {max_seconds:.0f} s budget"
    for i in range(1, n):
        setup()
        if flush is not None:
            flush()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    us = np.array([starts[i].elapsed_time(ends[i]) * 1e3 for i in range(n)], dtype=np.float64)
    if graph:
        del g
    return Timing(us, graph=graph, cold_l2=flush is not None, note=note)


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth measured now, in bytes/s, counting bytes read plus written."""
    require_gpu("copy bandwidth")
    n = nbytes // 4
    src = torch.rand(n, device="cuda")         # random data: never time on zeros
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), reps=reps, warmup=3)
    moved = 2 * n * 4
    return {"copy_bytes": moved, "copy_us": t.median, "copy_Bps": moved / (t.median * 1e-6),
            "copy_p20_us": t.p20, "copy_p80_us": t.p80}


def gemm_rate(n: int = 8192, reps: int = 10) -> dict:
    """bf16 matrix-product rate measured now (FLOP/s), random data."""
    require_gpu("gemm rate")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, reps=reps, warmup=3)
    return {"gemm_n": n, "gemm_us": t.median, "gemm_flops": 2 * n ** 3 / (t.median * 1e-6)}
