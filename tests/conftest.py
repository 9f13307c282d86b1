"""Test configuration: the ``gpu`` marker, an importable ``_util`` (skip helpers), ``one_thread``, the
faster Triton interpreter."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import gpu, requires_cuda, requires_cuda_ext, requires_ext  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped when none is visible)")
    # Under pytest-xdist (the README's `-n auto --dist loadfile`) every worker is a process of its
    # own: torch's intra-op threads are shared out so the workers together use each core once, not
    # once each. `--dist loadfile` keeps a file on one worker: module fixtures (the sm_90 codegen
    # subprocess, simulator builds) run once, and tests that total their module's earlier tests
    # (test_parity_grid_total) see them.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    # SJD_CUDA_SIM=forward|reverse|shuffle: the whole session runs the cuda backend's kernels in
    # the CPU simulator (sjd_kernels.cuda.sim), e.g. with SJD_LAW_BACKENDS=cuda SJD_LAW_DEVICE=cpu
    # for the law and bad-input tests on the CUDA kernels without a GPU.
    order = os.environ.get("SJD_CUDA_SIM")
    if order:
        from sjd_kernels.cuda import sim
        config._sjd_cuda_sim = sim.simulate(order=order)
        config._sjd_cuda_sim.__enter__()


def pytest_unconfigure(config):
    ctx = getattr(config, "_sjd_cuda_sim", None)
    if ctx is not None:
        ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def one_thread():
    """Torch single-threaded for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    small matmuls and large vectorised batches of those tests lose far more to intra-op threads waiting on
    each other on a shared 2-core machine than they gain (a 20 s run took minutes with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def _fast_triton_interpreter():
    """Under ``TRITON_INTERPRET=1`` the kernels run on Triton's interpreter without its repeat patch
    at every helper call (``sjd_kernels.triton.interp``: same results, less time).
    ``SJD_INTERP_SPEED_UP=0`` runs them on Triton's interpreter unchanged. A session fixture, not
    ``pytest_configure``: the modules that set ``TRITON_INTERPRET`` themselves have been imported."""
    from sjd_kernels.triton import interp
    interp.speed_up()
    yield
