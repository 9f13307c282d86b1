"""Test configuration: the ``gpu`` marker and an importable ``_util`` (skip helpers)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _util import gpu, requires_cuda, requires_cuda_ext, requires_ext  # noqa: E402,F401


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped when none is visible)")
