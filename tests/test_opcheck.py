"""``torch.library.opcheck`` on every registered op, with the arguments its public function passes.

opcheck runs the op under the schema checker (an input it writes must be declared in
``mutates_args``, an output must not alias an input), against its fake kernel (the shapes and dtypes
``torch.compile`` traces with) and through AOT dispatch with dynamic shapes. The arguments are the
ones the public functions (``jacobi_step``, ``tree_verify``, ``tree_kv_update``, ``verify_chain``,
``sjd2_prepare``) hand to ``torch.ops.sjd.*``, captured by a dispatch mode on small inputs; each
case runs on the torch backend, on the Triton kernels under the interpreter (CPU tensors: the same
wrappers and the same stores as the compiled kernels, without a GPU's compile time) and on the CUDA
kernels, in the CPU simulator and on a GPU (marked ``gpu``).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sjd_kernels as sk
from _util import gpu, requires_cuda_ext
from sjd_kernels.ops._common import BACKEND_CODE

OPS = {"jacobi_step", "tree_verify", "tree_kv_update", "tree_kv_update_list", "verify_chain", "sjd2_prepare"}


class _Capture(TorchDispatchMode):
    """Records (op name, cloned args) of every ``torch.ops.sjd`` call made under it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sjd":
            self.calls.append((func, [a.clone() if torch.is_tensor(a) else a for a in args], dict(kwargs)))
        return func(*args, **kwargs)


def _jacobi(be, dev, mode="sjd", vp=False, capacity=None, cfg=False, beta=0.0):
    B, W, V = 3, 4, 37
    g = torch.Generator().manual_seed(5)
    st = sk.JacobiState.create(B, W, V, seed=[3, 4, 5], vp=vp, capacity=capacity, device=dev)
    pos = torch.tensor([0, 3, 9], device=dev)
    drafts = sk.init_window(st, pos, W)
    logits = torch.randn(B, W + 1, V, generator=g).to(dev)
    kw = {}
    if cfg:
        kw = dict(uncond_logits=torch.randn(B, W + 1, V, generator=g).to(dev),
                  cfg_scale=torch.tensor([1.0, 2.5, 4.0], device=dev))
    sk.jacobi_step(logits, drafts, torch.tensor([W, 2, 0], device=dev), pos, st, mode=mode, beta=beta, top_k=8,
                   backend=be, **kw)


def _tree(be, dev):
    from test_tree_verify import _run_public, random_batch
    _run_public(random_batch(cfg=True), be, device=dev)


_PATH = [[0, 2, 3, -1], [0, 1, -1, -1], [0, 3, 5, 6]]


def _kv_stacked(be, dev):
    kv = torch.randn(2, 2, 3, 2, 16, 8, device=dev)
    sk.tree_kv_update(kv, torch.tensor(_PATH, device=dev), torch.tensor([3, 4, 2], device=dev), backend=be)


def _kv_list(be, dev):
    keys = [torch.randn(3, 2, 16, 8, dtype=torch.bfloat16, device=dev) for _ in range(2)]
    values = [torch.randn(3, 2, 16, 8, dtype=torch.bfloat16, device=dev) for _ in range(2)]
    sk.tree_kv_update((keys, values), torch.tensor(_PATH, device=dev), torch.tensor([3, 4, 2], device=dev),
                      backend=be)


def _chain(be, dev):
    B, W, V = 3, 4, 20
    g = torch.Generator().manual_seed(9)
    t = torch.softmax(torch.randn(B, W + 1, V, generator=g), -1)
    d = torch.softmax(torch.randn(B, W, V, generator=g), -1)
    ids = torch.multinomial(d.view(-1, V), 1, generator=g).view(B, W)
    sk.verify_chain(t.to(dev), d.to(dev), ids.to(dev), seed=torch.arange(B, device=dev),
                    win_len=torch.tensor([4, 0, 2], device=dev), backend=be)


def _sjd2(be, dev):
    from test_sjd2 import _prepare_case
    from sjd_kernels.ops.sjd2_prepare import sjd2_prepare
    sjd2_prepare(**{k: v.to(dev) for k, v in _prepare_case().items()}, backend=be)


CASES = {
    "jacobi_step-sjd": _jacobi,
    "jacobi_step-coupling-vp-cfg": lambda be, dev: _jacobi(be, dev, "coupling", vp=True, cfg=True, beta=0.5),
    "jacobi_step-gumbel": lambda be, dev: _jacobi(be, dev, "gumbel"),
    "jacobi_step-sparse": lambda be, dev: _jacobi(be, dev, "coupling", capacity=12),
    "tree_verify": _tree,
    "tree_kv_update": _kv_stacked,
    "tree_kv_update_list": _kv_list,
    "verify_chain": _chain,
    "sjd2_prepare": _sjd2,
}


def _captured(case, backend="torch", device="cpu"):
    with _Capture() as cap:
        CASES[case](backend, device)
    assert len(cap.calls) == 1, f"{case}: expected one sjd op call, got {[str(c[0]) for c in cap.calls]}"
    return cap.calls[0]


def test_cases_cover_every_registered_op():
    import sjd_kernels.sjd2  # noqa: F401  (registers sjd2_prepare)
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sjd::")}
    seen = {str(_captured(c)[0]).split(".")[1] for c in CASES}
    assert registered == OPS, f"ops registered under torch.ops.sjd: {sorted(registered)}; give a new one a case"
    assert seen == OPS


def _check(case, backend, device):
    func, args, kwargs = _captured(case, backend, device)
    assert args[-1] == BACKEND_CODE[backend], args[-1]  # every op takes its backend code last
    result = torch.library.opcheck(func, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_torch_backend(case):
    _check(case, "torch", "cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the CPU check of the Triton kernels needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_triton_interpreter(case):
    pytest.importorskip("triton")
    _check(case, "triton", "cpu")


CUDA_CASES = list(CASES)  # every op has a CUDA kernel


@pytest.mark.parametrize("case", CUDA_CASES)
def test_opcheck_cuda_in_the_simulator(case):
    """The CUDA wrappers and kernels on CPU tensors, run by the CPU simulator (``sjd_kernels.cuda.sim``)."""
    from _util import sim_module
    from sjd_kernels.cuda import sim
    sim_module()
    with sim.simulate("reverse"):
        _check(case, "cuda", "cpu")


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("case", CUDA_CASES)
def test_opcheck_cuda_on_the_gpu(case):
    _check(case, "cuda", "cuda")


def test_opcheck_catches_an_undeclared_mutation():
    """The check can fail: an op that writes an input it does not declare is reported."""
    lib = torch.library.Library("sjd_opcheck_probe", "FRAGMENT")
    lib.define("bad(Tensor x, Tensor status) -> Tensor")

    def bad(x, status):
        status.add_(1)  # written, but not declared as mutated in the schema
        return x * 2

    lib.impl("bad", bad, "CompositeExplicitAutograd")
    lib.impl("bad", lambda x, status: torch.empty_like(x), "Meta")
    with pytest.raises(Exception, match="mutat"):
        torch.library.opcheck(torch.ops.sjd_opcheck_probe.bad.default, (torch.randn(3), torch.zeros(4)),
                              test_utils=("test_schema",))
