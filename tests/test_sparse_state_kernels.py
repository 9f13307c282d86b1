"""Sparse Jacobi state on the Triton kernel: token for token against the reference.

Multi-step runs through the prefix-to-row table of ``test_jacobi_step_law`` (float32 logits, so
the two backends must agree exactly on tokens, counts, drafts, kinds, entry ids and overflow
counters; the stored values to float rounding, as in ``test_jacobi_step_parity``). Cases cover no overflow (capacity >= every support), ties at
the top-k threshold, and capacity 1 (most rows overflow and draft uniformly). Under the
interpreter on CPU here; the ``gpu`` tests repeat a larger case with the compiled Triton kernel
and run every case on the CUDA kernel.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(__file__))
import test_jacobi_step_law as law  # noqa: E402
from test_sparse_state import SPECS, record_steps  # noqa: E402
from _util import gpu, requires_cuda_ext  # noqa: E402

from sjd_kernels.reference import jacobi_step as ref  # noqa: E402
from sjd_kernels.triton.jacobi_step import is_interpreted  # noqa: E402

INTERP = is_interpreted()
HAS_CUDA = torch.cuda.is_available()
if not INTERP and not HAS_CUDA:
    pytest.skip("triton kernels need TRITON_INTERPRET=1 (set before triton is imported) or a CUDA device",
                allow_module_level=True)



class BigramModel:
    """Logits of position l from the token before it: ``pos_emb[l] + tok_emb[x_{l-1}]`` (any V, L;
    parity only, no enumerated law)."""

    def __init__(self, V, L, seed, scale=2.0):
        g = torch.Generator().manual_seed(seed)
        self.V, self.L = V, L
        self.pos_emb = torch.randn(L + 1, V, generator=g) * scale
        self.tok_emb = torch.randn(V + 1, V, generator=g) * scale
        self.pos_emb[L] = 0.0

    def rows(self, seq, lengths):
        prev = torch.gather(torch.cat([torch.full_like(seq[:, :1], self.V), seq], 1), 1,
                            lengths.clamp(max=seq.shape[1]))
        prev = torch.where(prev < 0, torch.full_like(prev, self.V), prev)
        return self.pos_emb[lengths.clamp(max=self.L)] + self.tok_emb[prev]


def _compare(spec, V, L, n, W, k, cap, device, seed0=91, backend="triton"):
    model = law.TableModel(V, L, 31, 2.0) if V ** L <= 10 ** 6 else BigramModel(V, L, 31, 2.0)
    r_impl, r_rec = record_steps(ref.jacobi_step)
    t_impl, t_rec = record_steps(law.public_impl(backend, device, 0))
    Xr, ir = law.run_sequences(r_impl, spec, model, n, W, seed0, 1.0, k, capacity=cap)
    Xt, it = law.run_sequences(t_impl, spec, model, n, W, seed0, 1.0, k, capacity=cap)
    assert ir["status"] == it["status"], (ir["status"], it["status"])
    assert torch.equal(Xr, Xt), f"{spec}: tokens differ"
    assert len(r_rec) == len(t_rec)
    for s, (a, b) in enumerate(zip(r_rec, t_rec)):
        (qr, kr, pr, ir_, _, *outr), (qt, kt, pt, it_, _, *outt) = a, b
        for x, y in zip(outr, outt):
            assert torch.equal(x, y), f"{spec} step {s}: outputs differ"
        assert torch.equal(kr, kt), f"{spec} step {s}: kinds differ"
        dense = (kr & ref.KIND_MASK) == ref.KIND_DENSE
        assert torch.equal(ir_[dense], it_[dense]), f"{spec} step {s}: entry ids differ"
        # stored numbers to float rounding (softmax sums in another order; the VP trend cancels)
        assert torch.allclose(ref.densify(ir_, qr, V)[dense], ref.densify(it_, qt, V)[dense], rtol=1e-5, atol=1e-6)
        if pr.numel():
            assert torch.allclose(ref.densify(ir_, pr, V)[dense], ref.densify(it_, pt, V)[dense], rtol=1e-5,
                                  atol=1e-10)
    return ir["status"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("k,cap", [(0, 6), (2, 2), (0, 1)], ids=["fits", "topk2-ties", "overflow"])
def test_sparse_triton_matches_reference(spec, k, cap):
    status = _compare(spec, V=6, L=6, n=8, W=3, k=k, cap=cap, device="cpu" if INTERP else "cuda")
    if cap == 1:
        assert status[3] > 0, "the overflow path did not run"
    if cap == 6:
        assert status[3] == 0


@pytest.mark.gpu
@pytest.mark.skipif(INTERP or not HAS_CUDA, reason="needs compiled Triton on a CUDA device (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("spec", ["sjd", "vp_log_b1", "coupling_vp_add_b0.5"])
def test_sparse_triton_matches_reference_gpu(spec):
    _compare(spec, V=3000, L=24, n=64, W=8, k=200, cap=256, device="cuda")


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("k,cap", [(0, 6), (2, 2), (0, 1)], ids=["fits", "topk2-ties", "overflow"])
def test_sparse_cuda_matches_reference(spec, k, cap):
    status = _compare(spec, V=6, L=6, n=64, W=3, k=k, cap=cap, device="cuda", backend="cuda")
    if cap == 1:
        assert status[3] > 0, "the overflow path did not run"


@gpu
@requires_cuda_ext
@pytest.mark.parametrize("spec", ["sjd", "vp_log_b1", "coupling_vp_add_b0.5", "gumbel"])
def test_sparse_cuda_matches_reference_larger(spec):
    """V 3000: the block-wide compaction runs over several chunks of 4 lanes per thread; top-k 200
    with capacity 256 (no overflow) and 150 (every row overflows)."""
    _compare(spec, V=3000, L=24, n=64, W=8, k=200, cap=256, device="cuda", backend="cuda")
    status = _compare(spec, V=3000, L=24, n=64, W=8, k=200, cap=150, device="cuda", backend="cuda")
    assert status[3] > 0
