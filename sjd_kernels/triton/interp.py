"""A faster Triton interpreter for the kernels' CPU runs (``TRITON_INTERPRET=1``), same results.

Under the interpreter a launch patches ``triton.language`` (each builtin routed to the numpy
semantics), runs the grid, and restores it. Triton 3.6 also re-runs the whole patch at every call
of a ``@triton.jit`` helper (``InterpretedFunction.__call__``), which walks each language module
with ``inspect.getmembers``. Within a launch that second patch changes nothing: the builtins are
already replaced (a replacement is not a builtin, so it is skipped) and the other attributes it
sets (``range``, ``reduce``, ``to_ir`` ...) are stateless functions equal to those already set.
Our kernels call helpers many times per launch, so the repeat patch was a large share of an
interpreted kernel's time (the clean-clone CI times before and after are in
``benchmarks/results/cpu_ci_2026-12-02/``).

``speed_up()`` skips a helper's patch when the launch has already patched every language module
the helper sees; anything else (a helper that sees a module the kernel does not) is patched as
Triton does. The launch's own patch and its restore are untouched. It is opt-in: the test suite,
``python -m sjd_kernels.bench`` and ``benchmarks/fuzz_parity.py`` call it; ``SJD_INTERP_SPEED_UP=0``
in the environment makes it decline. Importing ``sjd_kernels`` changes nothing in Triton.
"""
from __future__ import annotations

import inspect
import os

__all__ = ["speed_up", "active"]

# orig: Triton's _patch_lang; patched: ids of the language modules the running launch has patched
# (None between launches)
_state: dict = {"on": False, "orig": None, "patched": None}


def _lang_ids(fn, tl) -> frozenset:
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def speed_up() -> bool:
    """Install the skip if the interpreter is on and has the structure it relies on (the Triton 3.6
    layout: ``_patch_lang`` returning a scope with ``restore``). Returns whether it is active; a
    no-op when called again, when the interpreter is off, when ``SJD_INTERP_SPEED_UP=0``, or on
    another layout."""
    if _state["on"]:
        return True
    if os.environ.get("SJD_INTERP_SPEED_UP", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return False
    try:
        import triton.language as tl
        import triton.runtime.interpreter as ti
    except ImportError:
        return False
    orig = getattr(ti, "_patch_lang", None)
    if orig is None or not hasattr(ti, "_LangPatchScope") or not hasattr(ti._LangPatchScope, "restore"):
        return False
    try:
        src = inspect.getsource(ti.InterpretedFunction.__call__) + inspect.getsource(ti.GridExecutor.__call__)
    except (AttributeError, OSError, TypeError):      # another layout, or no source to read
        return False
    if src.count("_patch_lang(self.fn)") != 2 or "patch_scope.restore()" not in src:
        return False

    def patch_lang(fn):
        langs = _lang_ids(fn, tl)
        patched = _state["patched"]
        if patched is not None and langs <= patched:
            return ti._LangPatchScope()           # a helper inside a launch: already patched
        scope = _state["orig"](fn)
        if patched is None:                       # a launch: GridExecutor restores this scope
            _state["patched"] = langs
            restore = scope.restore

            def restore_and_forget():
                _state["patched"] = None
                restore()
            scope.restore = restore_and_forget
        else:                                     # a helper seeing a new module: patched, and
            _state["patched"] = patched | langs   # (as in Triton) not restored by the launch
        return scope

    ti._patch_lang = patch_lang
    _state.update(on=True, orig=orig)
    return True


def active() -> bool:
    return _state["on"]
