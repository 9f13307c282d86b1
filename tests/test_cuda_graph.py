"""``generate(..., cuda_graph=True)``: the window step captured in a CUDA graph and replayed.

GPU tests (marker ``gpu``, skipped without a device): for the chain methods on a tiny float32 GPT,
graph replay gives the same tokens and stats as the eager loop under the same seeds (CFG, ragged
acceptance in a batch of 4, prompts of several positions, forced tokens; the triton and cuda
backends when available, and the torch reference).

CPU tests: the refusals (CPU model, pac, sjd2, a non-bool flag) and
a dry run of the graph path (``loop._graph_dry_run``): the step function the graph would capture is
run eagerly on CPU under a dispatch mode that fails on host synchronisation (``.item()``,
``bool(tensor)``, ``.tolist()``, ``nonzero``, boolean-mask indexing, tensors built from Python data,
cross-device copies). The ``jacobi_step`` custom op is opaque to the mode: its triton/cuda kernels are
checked for capture by their own graph tests, and the torch reference step by
``test_reference_graph_safe.py`` under the same mode. The op's wrapper runs its device path (no
CPU-only ``win_len`` check), as it does on a GPU.
"""
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sjd_kernels.decoding import generate, loop
from sjd_kernels.models import GPT, GPTConfig
from sjd_kernels.ops import SJDInputError
from sjd_kernels.ops._common import backends

from _util import HAS_CUDA, gpu, requires_cuda
from test_generate import Counting, prefix_model, tiny

CHAIN = ["ar", "ar_gumbel", "sjd", "sjd_vp", "coupling", "gumbel", "gumbel_jacobi"]
STATS = ("nfe", "nfe_prefill", "steps", "accepted_hist", "zero_mass_residuals", "zero_mass_coupling",
         "tokens_per_step", "mean_tokens_per_step", "state_bytes", "cache_bytes", "window", "batch")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def assert_same(graph, eager, label=""):
    assert torch.equal(graph.tokens, eager.tokens), label
    for k in STATS:
        assert getattr(graph.stats, k) == getattr(eager.stats, k), (label, k)


# ------------------------------------------------------------------------------------ refusals (CPU)
def test_cpu_model_is_refused_before_work():
    cfg = GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12, num_classes=3)
    m = Counting(cfg).double().eval()
    Counting.calls = 0
    with pytest.raises(SJDInputError, match="cuda_graph=True needs a model on a CUDA device"):
        generate(m, torch.tensor([0, 1]), 12, "sjd", window=4, cuda_graph=True)
    with pytest.raises(SJDInputError, match="cuda_graph must be True or False"):
        generate(m, torch.tensor([0, 1]), 12, "sjd", window=4, cuda_graph=1)
    assert Counting.calls == 0


@pytest.mark.parametrize("method,why", [("pac", "tree step"), ("sjd2", "its own loop")])
def test_pac_and_sjd2_are_not_captured(method, why):
    m = tiny()
    with pytest.raises(NotImplementedError, match=f"cuda_graph=True: method '{method}' .*{why}"):
        generate(m, torch.tensor([0, 1]), 12, method, window=4, cuda_graph=True)


# ------------------------------------------------------------------------------------ dry run (CPU)
class HostSync(RuntimeError):
    pass


_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.lift_fresh.default", "aten.lift_fresh_copy.default", "aten.equal.default",
             "aten.is_nonzero.default", "aten._unique2.default", "aten.unique_dim.default",
             "aten.unique_consecutive.default", "aten.repeat_interleave.Tensor"}


class NoHostSync(TorchDispatchMode):
    """Fails on ops that synchronise with the host (or bake host data into a graph) on a CUDA device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        bad = name in _SYNC_OPS
        if name.startswith(("aten.index.", "aten.index_put")):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            bad = any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ())
        if name.startswith("aten._to_copy") and kwargs.get("device") is not None:
            bad = True                                    # an explicit device move (e.g. .cpu(), .to('cuda'))
        if bad:
            raise HostSync(f"{name} inside the captured step:\n{''.join(traceback.format_stack(limit=12))}")
        return func(*args, **kwargs)


def _no_tolist(self, *a, **k):
    raise HostSync("Tensor.tolist() inside the captured step")


@pytest.fixture
def dry_run(monkeypatch):
    """Run the graph path on CPU: each warm-up step and 'replay' runs the step under NoHostSync."""
    calls = []
    cmod = sys.modules["sjd_kernels.ops._common"]

    def run(fn):
        calls.append(1)
        with monkeypatch.context() as mp:
            mp.setattr(cmod, "compiling", lambda: True)         # the op wrapper's device path (no CPU check)
            mp.setattr(torch.Tensor, "tolist", _no_tolist)
            with NoHostSync():
                fn()

    monkeypatch.setattr(loop, "_graph_dry_run", run)
    return calls


DRY_CASES = [
    ("ar", dict()),
    ("ar_gumbel", dict(cfg_scale=2.0)),
    ("sjd", dict(window=4, cfg_scale=3.0, top_k=10)),
    ("sjd", dict(window=3, draft_init="left", temperature=0.7)),
    ("sjd_vp", dict(window=4, cfg_scale=2.0)),
    ("coupling", dict(window=5, top_p=0.9)),
    ("coupling", dict(window=4, beta=0.5, cfg_scale=2.0)),
    ("gumbel", dict(window=4)),
    ("gumbel_jacobi", dict(window=16, cfg_scale=2.0)),
    ("sjd", dict(window=4, cfg_scale=3.0, top_k=10, state_capacity=12)),
    ("coupling", dict(window=4, beta=0.5, top_k=6, state_capacity=4)),      # some rows overflow
]


@pytest.mark.parametrize("method,kw", DRY_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(DRY_CASES)])
def test_dry_run_equals_eager_without_host_sync(dry_run, method, kw):
    m = tiny(seed=2, head=8.0)
    cond = torch.tensor([0, 1, 2, 1])
    seeds = [11, 22, 33, 44]
    eager = generate(m, cond, 12, method, seed=seeds, **kw)
    steps_seen = []
    graph = generate(m, cond, 12, method, seed=seeds, cuda_graph=True,
                     on_step=lambda out, n, cache: steps_seen.append(1), **kw)
    assert_same(graph, eager, method)
    assert len(dry_run) == graph.stats.nfe == len(steps_seen)
    assert graph.stats.graph_replays == graph.stats.nfe - loop.GRAPH_WARMUP_STEPS > 0
    assert not graph.stats.cuda_graph                       # a dry run captured nothing
    e = eager.stats
    assert e.graph_replays == 0 and not e.cuda_graph and e.step_s == e.forward_s + e.post_s > 0


def test_dry_run_ragged_prefixes_and_forced(dry_run):
    m = prefix_model(seed=3, V=16, N=12)                    # conditional rows 3 positions, unconditional 1
    cond = torch.tensor([0, 1, 2, 0])
    forced = torch.full((4, 12), -1, dtype=torch.int64)
    forced[:, 3::4] = 15
    for method in ("sjd", "coupling", "gumbel_jacobi", "ar"):
        kw = dict(window=4, cfg_scale=2.0, seed=[5, 6, 7, 8], forced=forced)
        eager = generate(m, cond, 12, method, **kw)
        graph = generate(m, cond, 12, method, cuda_graph=True, **kw)
        assert_same(graph, eager, method)
        assert eager.stats.nfe_prefill == 1 and (graph.tokens[:, 3::4] == 15).all()
    # ragged acceptance inside the batch: requests finished at different steps
    assert len(set(generate(m, cond, 12, "sjd", window=4, cfg_scale=2.0, seed=[5, 6, 7, 8],
                            cuda_graph=True).stats.steps)) > 1


class SyncingGPT(GPT):
    def forward(self, inputs_embeds, positions, cache=None, mask=None, write_slots=None):
        if int(positions.max()) < 0:                        # a host read, as some HF code does
            raise AssertionError
        return super().forward(inputs_embeds, positions, cache=cache, mask=mask, write_slots=write_slots)


def test_dry_run_catches_a_syncing_forward(dry_run):
    torch.manual_seed(0)
    m = SyncingGPT(GPTConfig(vocab_size=16, n_layer=1, n_head=2, d_model=16, max_image_tokens=12,
                             num_classes=3)).double().eval()
    with pytest.raises(HostSync, match="_local_scalar_dense"):
        generate(m, torch.tensor([0, 1]), 12, "sjd", window=4, cuda_graph=True)


class _FakeGraph:
    current = None

    def __init__(self):
        self.capturing = False
        self.body = None

    def replay(self):
        self.body("replay")


class _FakeCapture:
    def __init__(self, g):
        self.g = g

    def __enter__(self):
        self.g.capturing = True
        _FakeGraph.current = self.g

    def __exit__(self, *exc):
        self.g.capturing = False


class _FakeStream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, other):
        pass


def test_graph_step_sequence_with_fake_cuda(monkeypatch):
    """_GraphStep's control flow with torch.cuda faked: warm-up calls run the step, the next call captures
    (recording only) and replays, later calls replay; each call is one step; a failing capture is wrapped."""
    import contextlib
    for name, val in [("Stream", _FakeStream), ("current_stream", lambda *a: _FakeStream()),
                      ("stream", lambda s: contextlib.nullcontext()), ("device", lambda d: contextlib.nullcontext()),
                      ("CUDAGraph", _FakeGraph), ("graph", _FakeCapture)]:
        monkeypatch.setattr(torch.cuda, name, val)
    log = []

    def fn():
        g = _FakeGraph.current
        if g is not None and g.capturing:
            g.body = log.append                             # recorded, not run
            log.append("capture")
        else:
            log.append("run")

    timer = loop._Timer(torch.device("cpu"))
    r = loop._GraphStep(fn, torch.device("cpu"), timer, warmup=2)
    for _ in range(5):
        r()
    assert log == ["run", "run", "capture", "replay", "replay", "replay"]
    assert r.calls == 5 and r.replays == 3 and len(timer.marks) == 5

    def bad():
        if _FakeGraph.current is not None and _FakeGraph.current.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")

    _FakeGraph.current = None
    r = loop._GraphStep(bad, torch.device("cpu"), loop._Timer(torch.device("cpu")), warmup=1)
    r()
    with pytest.raises(RuntimeError, match="capturing the window step failed.*not permitted"):
        r()
    _FakeGraph.current = None


# ------------------------------------------------------------------------------------ GPU
def _graph_backends():
    b = backends()
    return [name for name in ("triton", "cuda", "torch") if b[name]["available"]] if HAS_CUDA else []


GPU_BACKENDS = _graph_backends() or ["none"]


def _need(backend):
    if backend == "none":
        pytest.skip("no backend is usable on this device")


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("method", CHAIN)
def test_graph_replay_equals_eager(method, cfg_scale, backend):
    _need(backend)
    m = tiny(seed=2, head=8.0, N=24).float().cuda()
    cond = torch.tensor([0, 1, 2, 1], device="cuda")
    seeds = [11, 22, 33, 44]
    kw = dict(window=4, cfg_scale=cfg_scale, seed=seeds, backend=backend, top_k=12)
    if method == "sjd_vp":
        kw["beta"] = 0.5
    if cfg_scale != 1.0 and method in ("sjd", "coupling"):
        kw["state_capacity"] = 16                                          # sparse state inside the graph
    eager = generate(m, cond, 24, method, **kw)
    graph = generate(m, cond, 24, method, cuda_graph=True, **kw)
    assert_same(graph, eager, (method, cfg_scale, backend))
    s = graph.stats
    assert s.cuda_graph and s.graph_replays == s.nfe - loop.GRAPH_WARMUP_STEPS > 0
    assert s.step_s > 0 and s.capture_s > 0 and s.forward_s == 0.0
    again = generate(m, cond, 24, method, cuda_graph=True, **kw)           # a fresh capture, same result
    assert torch.equal(again.tokens, graph.tokens)


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_graph_ragged_batch_prefixes_forced(backend):
    """Ragged acceptance, CFG rows with prefixes of different lengths, forced tokens, 'left' tails."""
    _need(backend)
    m = prefix_model(seed=3, V=16, N=24).float().cuda()
    cond = torch.tensor([0, 1, 2, 0], device="cuda")
    forced = torch.full((4, 24), -1, dtype=torch.int64, device="cuda")
    forced[:, 5::6] = 15
    ragged = False
    for method, extra in [("sjd", {}), ("coupling", dict(draft_init="left")), ("gumbel_jacobi", {}),
                          ("gumbel", {}), ("ar", {})]:
        kw = dict(window=6, cfg_scale=2.0, seed=[5, 6, 7, 8], forced=forced, backend=backend, **extra)
        eager = generate(m, cond, 24, method, **kw)
        seen = []
        graph = generate(m, cond, 24, method, cuda_graph=True, on_step=lambda o, n, c: seen.append(n.clone()),
                         **kw)
        assert_same(graph, eager, (method, backend))
        assert len(seen) == graph.stats.nfe and graph.stats.graph_replays > 0
        assert (graph.tokens[:, 5::6] == 15).all()
        ragged |= len(set(graph.stats.steps)) > 1
    assert ragged                                          # some batch finished its requests at different steps
