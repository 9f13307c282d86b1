"""``sjd_kernels.triton.interp.speed_up``: the interpreter without its repeat patch per helper call
gives the same results, patches once per launch, and leaves ``triton.language`` as Triton would.

The suite runs with it on (``conftest.py``), so every interpreted kernel test also checks it against
the reference; these tests compare it with Triton's own interpreter directly."""
import os

import pytest
import torch

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not INTERP, reason="the interpreter only (TRITON_INTERPRET=1 before import)")

import triton.language as tl  # noqa: E402
import triton.runtime.interpreter as ti  # noqa: E402

from sjd_kernels.triton import interp  # noqa: E402


@triton.jit
def _inner(x):
    return x * 2 + 1


@triton.jit
def _mid(x):
    return _inner(x) - _inner(x // 3)


@triton.jit
def _kernel(X, Y, N: tl.constexpr, NEG: tl.constexpr):
    tl.static_assert(NEG == 0)
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    for _ in range(3):
        x = _mid(x)
    tl.store(Y + offs, x + tl.sum(x, 0) + tl.cumsum(x, 0))


def _counting(monkeypatch, where, name):
    """Wrap ``where.name`` (a ``_patch_lang``) to count its calls."""
    calls = []
    fn = where[name] if isinstance(where, dict) else getattr(where, name)

    def counted(f):
        calls.append(f.__name__)
        return fn(f)
    if isinstance(where, dict):
        monkeypatch.setitem(where, name, counted)
    else:
        monkeypatch.setattr(where, name, counted)
    return calls


MODULES = (tl, tl.core, tl.math, tl.core.tensor)


def _snapshot():
    return [dict(vars(m)) for m in MODULES]


def _restore(snap):
    for m, d in zip(MODULES, snap):
        for k in [k for k in vars(m) if k not in d]:
            delattr(m, k)
        for k, v in d.items():
            if vars(m).get(k, v) is not v or k not in vars(m):
                setattr(m, k, v)


def _footprint(snap):
    """Per module, the names whose value is not the one in ``snap`` (patched and left so)."""
    return [sorted(k for k in vars(m) if d.get(k, None) is not vars(m)[k]) for m, d in zip(MODULES, snap)]


@pytest.fixture
def clean_lang():
    """Each test starts from and leaves ``triton.language`` as it found it (Triton's interpreter
    leaves some patches behind after a launch; the tests compare what is left)."""
    snap = _snapshot()
    yield snap
    _restore(snap)
    assert _footprint(snap) == [[]] * len(MODULES)


def _run(n=16, neg=0):
    x = torch.arange(n, dtype=torch.int32) * 7 - 40
    y = torch.empty_like(x)
    _kernel[(2,)](x, y, n, neg)
    return y


def _triton_run(monkeypatch, **kw):
    """The kernel under Triton's own interpreter (its ``_patch_lang``), with its patch calls."""
    with monkeypatch.context() as m:
        m.setattr(ti, "_patch_lang", interp._state["orig"])
        calls = _counting(m, ti, "_patch_lang")
        return _run(**kw), calls


def _fast_run(monkeypatch, **kw):
    with monkeypatch.context() as m:
        calls = _counting(m, interp._state, "orig")
        return _run(**kw), calls


@pytest.fixture
def on(monkeypatch):
    monkeypatch.delenv("SJD_INTERP_SPEED_UP", raising=False)
    assert interp.speed_up()
    assert interp.speed_up()                      # a second call is a no-op
    assert interp.active() and ti._patch_lang is not interp._state["orig"]


def test_same_results_and_patch_footprint_with_one_patch_per_launch(on, clean_lang, monkeypatch):
    slow, slow_calls = _triton_run(monkeypatch)
    slow_left = _footprint(clean_lang)
    _restore(clean_lang)
    fast, fast_calls = _fast_run(monkeypatch)
    assert torch.equal(fast, slow)
    x = torch.arange(16) * 7 - 40                 # the kernel's arithmetic, by hand
    for _ in range(3):
        x = (x * 2 + 1) - (torch.div(x, 3, rounding_mode="trunc") * 2 + 1)
    assert torch.equal(slow.long(), x + x.sum() + x.cumsum(0))
    # Triton patches at the launch and at each of the 2 x 9 helper calls (and inside tl.sum ...);
    # with the skip: the launch, and a helper seeing triton.language.core, which the kernel's
    # module does not (tl.sum's module): Triton patches it and leaves it patched, and so do we
    assert len(slow_calls) >= 19 and slow_calls.count("_inner") == 12
    assert fast_calls[0] == "_kernel" and len(fast_calls) <= 2, fast_calls
    assert _footprint(clean_lang) == slow_left
    # a second launch starts afresh (what a launch has patched is forgotten when it ends)
    fast2, fast_calls2 = _fast_run(monkeypatch)
    assert torch.equal(fast2, slow) and fast_calls2[0] == "_kernel" and len(fast_calls2) <= 2
    assert interp._state["patched"] is None       # between launches


def test_a_failing_launch_resets_and_restores(on, clean_lang, monkeypatch):
    with pytest.raises(Exception, match="AssertionError"):
        _run(neg=1)
    assert interp._state["patched"] is None
    assert _footprint(clean_lang)[0] == []        # triton.language itself restored by the launch
    slow, _ = _triton_run(monkeypatch)
    fast, calls = _fast_run(monkeypatch)
    assert torch.equal(fast, slow) and calls[0] == "_kernel"


@pytest.mark.parametrize("env", [{"TRITON_INTERPRET": "0"}, {"SJD_INTERP_SPEED_UP": "0"}])
def test_off_without_the_interpreter_or_when_turned_off(monkeypatch, env):
    monkeypatch.setitem(interp._state, "on", False)
    monkeypatch.setattr(ti, "_patch_lang", ti._patch_lang)      # restored even if it were installed
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = ti._patch_lang
    assert not interp.speed_up()
    assert ti._patch_lang is before
