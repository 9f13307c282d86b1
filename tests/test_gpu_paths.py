"""Decoding paths on a CUDA model that no other GPU test takes: tree drafting (``pac``) and the Hugging
Face adapter. On the CPU they run in the other files; here the point is that every tensor they build
lands on the model's device. Each check is exact: the same tokens as the torch backend on the same GPU
(``pac``), or as greedy decoding with the model's own forward on the CPU (float64 Llama, ``top_k=1``)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _util import gpu, requires_cuda, requires_cuda_ext  # noqa: E402
from test_generate import tiny  # noqa: E402

from sjd_kernels.decoding import generate  # noqa: E402


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=requires_cuda_ext)])
def test_pac_on_a_gpu_model(backend):
    """Tree drafting on a CUDA model: the tree ops' kernels give the torch backend's tokens and counts."""
    if backend == "triton":
        pytest.importorskip("triton")
    m = tiny(head=8.0).float().cuda()
    cond = torch.tensor([0, 1, 2], device="cuda")
    kw = dict(window=4, tree_width=3, tree_depth=2, seed=[3, 4, 5], cfg_scale=2.0, top_p=0.9)
    ref = generate(m, cond, 12, "pac", backend="torch", **kw)
    out = generate(m, cond, 12, "pac", backend=backend, **kw)
    assert out.tokens.device.type == "cuda" and bool((out.tokens >= 0).all())
    assert torch.equal(out.tokens, ref.tokens), backend
    assert out.stats.nfe == ref.stats.nfe


@gpu
@requires_cuda
@pytest.mark.parametrize("method", ["sjd", "pac"])
def test_hf_llama_adapter_on_a_gpu(method):
    """``HFImageLM`` around a CUDA Llama, its image ids given as a CUDA tensor (their offset check built a
    CPU range), decoded greedily with CFG: the tokens of greedy decoding with the model's own forward."""
    pytest.importorskip("transformers")
    from test_hf_adapters import greedy_reference, llama

    from sjd_kernels.models.hf import HFImageLM
    hf = llama("sdpa")
    ids = list(range(8, 24))
    cond, uncond = [[1, 5, 6], [1, 7], [2, 3, 4, 5]], [[1], [1, 2], [1]]
    ref = greedy_reference(copy.deepcopy(hf), ids, cond, uncond, 10, 2.0)
    a = HFImageLM(hf.cuda(), torch.tensor(ids, device="cuda"), uncond_prompt=[1])
    kw = dict(window=4, top_k=1, cfg_scale=2.0, uncond=uncond, seed=3, backend="torch")
    if method == "pac":
        kw.update(tree_width=3, tree_depth=2)
    out = generate(a, cond, 10, method, **kw)
    assert out.tokens.device.type == "cuda"
    assert torch.equal(out.tokens.cpu(), ref), method


def test_triton_calls_switch_to_the_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device; the ops make the inputs' GPU current for the call when
    it is another one, and leave the current GPU and CPU tensors (the interpreter) alone."""
    from sjd_kernels.ops._common import triton_device
    entered = []

    class Device:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            entered.append(self.d)

        def __exit__(self, *exc):
            return False

    class OnDevice:
        def __init__(self, d):
            self.device = torch.device(d)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    for d in ("cuda:1", "cuda:0", "cpu", "cuda:2"):
        with triton_device(OnDevice(d)):
            pass
    assert entered == [torch.device("cuda:1"), torch.device("cuda:2")]


@gpu
@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_backend_on_a_second_gpu():
    """A model on ``cuda:1`` while ``cuda:0`` is current: the Triton kernels give the torch backend's tokens."""
    pytest.importorskip("triton")
    m = tiny(head=8.0).float().to("cuda:1")
    cond = torch.tensor([0, 1, 2], device="cuda:1")
    for method, extra in (("sjd", {}), ("pac", dict(tree_width=3, tree_depth=2))):
        kw = dict(window=4, seed=[3, 4, 5], cfg_scale=2.0, top_k=12, **extra)
        ref = generate(m, cond, 12, method, backend="torch", **kw)
        out = generate(m, cond, 12, method, backend="triton", **kw)
        assert torch.equal(out.tokens, ref.tokens), method


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", pytest.param("cuda", marks=requires_cuda_ext)])
def test_tree_kv_update_and_sjd2_prepare_with_a_status_never_sync(backend):
    """With a status, the public ``tree_kv_update`` and ``sjd2_prepare`` calls do not synchronise on a GPU
    in any backend (the torch ones included: they used ``nonzero`` and boolean masks), checked with
    PyTorch's sync debug mode set to raise, and a CUDA graph of both replays what the eager calls did."""
    if backend == "triton":
        pytest.importorskip("triton")
    import sjd_kernels as sk
    import test_sjd2 as t2
    from sjd_kernels.sjd2 import sjd2_prepare
    g = torch.Generator().manual_seed(4)
    kv0 = torch.randn(2, 2, 3, 2, 16, 8, generator=g).to(torch.bfloat16).cuda()
    path = torch.tensor([[0, 2, 3, -1], [0, 1, 5, 6], [0, 0, 2, -1]], device="cuda")     # row 2 malformed
    cl = torch.tensor([1, 4, 0], device="cuda")
    c0 = {k: v.cuda() for k, v in t2._prepare_case(seed=3).items()}

    def step(kv, c, st):
        sk.tree_kv_update(kv, path, cl, status=st, backend=backend)
        return sjd2_prepare(**c, status=st, backend=backend)

    kv_e, c_e, st_e = kv0.clone(), {k: v.clone() for k, v in c0.items()}, torch.zeros(4, dtype=torch.int32,
                                                                                     device="cuda")
    step(kv_e, c_e, st_e)                                   # warm-up (Triton compiles here)
    kv_e, c_e = kv0.clone(), {k: v.clone() for k, v in c0.items()}
    st_e.zero_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out_e = step(kv_e, c_e, st_e)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert st_e.tolist() == [4, 0, 0, 0]                     # the malformed row, reported on the device
    kv_g, c_g, st_g = kv0.clone(), {k: v.clone() for k, v in c0.items()}, torch.zeros(4, dtype=torch.int32,
                                                                                     device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = step(kv_g, c_g, st_g)
    kv_g.copy_(kv0)
    for k in ("latent", "level"):
        c_g[k].copy_(c0[k])
    st_g.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kv_g.view(torch.int16), kv_e.view(torch.int16)) and torch.equal(out_g, out_e)
    assert torch.equal(c_g["latent"], c_e["latent"]) and torch.equal(c_g["level"], c_e["level"])
    assert st_g.tolist() == [4, 0, 0, 0]
