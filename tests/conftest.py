"""Test configuration: the ``gpu`` marker, an importable ``_util`` (skip helpers), ``one_thread``."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import gpu, requires_cuda, requires_cuda_ext, requires_ext  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped when none is visible)")


@pytest.fixture(scope="module")
def one_thread():
    """Torch single-threaded for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    small matmuls and large vectorised batches of those tests lose far more to intra-op threads waiting on
    each other on a shared 2-core machine than they gain (a 20 s run took minutes with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
