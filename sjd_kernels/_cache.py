"""The user cache folders of the package (``~/.cache/sjd_kernels/<name>``, or an environment variable)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(var: str, name: str) -> Path:
    """``$var`` (``~`` expanded, made absolute), default ``~/.cache/sjd_kernels/<name>`` (also when the
    variable is set but empty)."""
    env = os.environ.get(var, "")
    path = Path(env).expanduser() if env.strip() else Path.home() / ".cache" / "sjd_kernels" / name
    return path.absolute()
