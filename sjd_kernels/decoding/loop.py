"""The decoding loop: drives a model (``sjd_kernels.models.protocol``) with the ``jacobi_step`` op.

Every request ``b`` has ``n[b]`` committed image tokens. One step, for the whole ragged batch:

1. inputs ``[X[n-1], D[0..W-1]]`` per request (at ``n = 0`` the prompt's last position plays
   ``X[-1]``), copied to the CFG twin row; the model writes their K/V at each row's own cache
   length and returns image logits ``[rows, W+1, V]``;
2. ``jacobi_step`` (conditional rows as ``logits``, unconditional rows as ``uncond_logits``)
   verifies the drafts, commits ``m + 1`` tokens per request and proposes the next window;
3. the commit: tokens are scattered into the output at ``n .. n+m``, ``n += m + 1`` and each
   row's cache length is set to ``prefix_len - 1 + n`` (a rewind: the K/V of ``X[n-1]`` and
   the accepted drafts are already in place; nothing is copied).

Method ``pac`` replaces steps 1-3 with a tree step (``sjd_kernels.decoding.pac``): one forward over
a draft tree under a tree attention mask, ``tree_verify``, ``tree_kv_update`` of the accepted path
per model row, then coupled drafts for the next window.

Near the end of the image a request's window is cut to ``min(W, num_tokens - n - 1)`` drafts;
finished requests keep their shapes and are masked (``win_len = 0``, nothing committed, their
cache length frozen). Op positions are image-token positions (0 = first image token); model
positions are cache slots (prefix first).

Host synchronisation: the loop reads ``n`` back only when every request may have finished
(after ``max_b ceil((num_tokens - n[b]) / (W + 1))`` steps, a lower bound on the steps left),
so most steps launch without waiting for the device.

CUDA graphs (``cuda_graph=True``, chain methods: ``ar``, ``ar_gumbel``, ``sjd``, ``sjd_vp``,
``coupling``, ``gumbel``, ``gumbel_jacobi``): the whole window step (input preparation, the model
forward over the window on the static KV cache, ``jacobi_step`` on the chosen backend, the commit
and the cache-length update) reads and writes only tensors allocated before the loop, has fixed shapes (finished requests run masked with ``win_len = 0``) and no host
synchronisation, so it is captured once in a ``torch.cuda.CUDAGraph`` and replayed every step.
The first ``GRAPH_WARMUP_STEPS`` steps run eagerly on a side stream (the standard warm-up: Triton
compilation, cuBLAS and attention set-up happen outside the capture; they are real steps of the
generation, not repeated), the next step captures the graph and every later step replays it.
The host schedule is the eager one (``n`` and the status read back only when every request may
have finished), so tokens, NFE, ``steps`` and ``accepted_hist`` equal the eager run's under the
same seeds. Timing is coarser: ``stats.step_s`` holds the whole window steps (CUDA events around
each warm-up step and replay), ``forward_s``/``post_s`` stay 0, ``capture_s`` is the host time of
the capture and ``graph_replays`` the number of replayed steps. Refused with a clear error: models
not on a CUDA device, and methods ``pac`` and ``sjd2`` (``NotImplementedError``). Every backend of
the op captures, the ``torch`` reference too (it has no host synchronisation; slow, but exact).
The model's forward must itself be capturable (no ``.item()``, ``bool(tensor)`` or data-dependent
shapes with a static cache): the in-package GPT is; a forward that is not fails at capture with a
``RuntimeError``.
``on_step`` is still called after every step (it then runs outside the graph).

Seeds (``seed``): a list or tensor gives one seed per request, in the order of ``cond``; an
int ``s`` gives request ``i`` the seed ``derive_seeds(s, B)[i]`` (splitmix64 of ``s`` and
``i``). A request's tokens depend only on its seed, its condition and the settings, so the
same per-request seed gives the same image alone or inside any batch; with an int seed, pass
``derive_seeds(s, B)[i]`` explicitly to reproduce request ``i`` in another batch.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ..models.protocol import check_model
from ..ops import JacobiState, SJDDeviceError, SJDInputError, check_status, init_window, jacobi_step
from ..ops.jacobi_step import sparse_vp_problem
from ..ops.tree import TreeRowError, build_tree, tree_kv_update, tree_verify
from ..ops._common import FLOAT_DTYPES, as_int, check_finite, check_int, check_sampling, resolve_backend, seed_tensor
from .cache import StaticKVCache
from .methods import METHODS, PENDING, available_methods
from . import pac as _pac

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seeds(seed: int, batch: int) -> list[int]:
    """Per-request seeds from one int: request ``i`` gets ``splitmix64(splitmix64(seed) + i) >> 1`` (>= 0).
    ``seed``: any Python or NumPy integer (taken modulo 2^64); ``batch``: an int >= 0."""
    s = as_int(seed)
    if s is None:
        raise SJDInputError(f"seed must be an integer (a float seed is never truncated), got {seed!r}")
    batch = check_int("batch", batch, 0)
    base = _splitmix64(s & _MASK64)
    return [_splitmix64((base + i) & _MASK64) >> 1 for i in range(batch)]


def request_seeds(seed, batch: int, device) -> torch.Tensor:
    """``[batch]`` int64 seeds from an int base seed or one seed per request (an ``SJDInputError`` naming
    ``seed`` for anything else: None, strings, floats, bools, values outside int64)."""
    if as_int(seed) is not None:                         # one base seed (Python, NumPy or 0-d integer)
        return torch.tensor(derive_seeds(seed, batch), dtype=torch.int64, device=device)
    s = seed_tensor(seed, device)
    if s.numel() != batch:
        raise SJDInputError(f"seed must be an int or give one seed per request ({batch}), got {s.numel()}")
    return s


def check_cfg_scale(cfg_scale) -> torch.Tensor:
    """``cfg_scale`` (a real number, or one per request: list, tuple, array or tensor) as a float32 CPU
    vector of finite values; anything else is an ``SJDInputError`` naming ``cfg_scale``."""
    what = "cfg_scale must be a finite real number or one per request"
    if cfg_scale is None or isinstance(cfg_scale, (str, bytes, bool)):
        raise SJDInputError(f"{what}, got {cfg_scale!r}")
    try:
        scale = torch.as_tensor(cfg_scale).detach()
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise SJDInputError(f"{what}, got {cfg_scale!r} ({type(e).__name__}: {e})") from None
    if scale.dtype == torch.bool or scale.is_complex():
        raise SJDInputError(f"{what}, got a {scale.dtype} value")
    scale = scale.to(device="cpu", dtype=torch.float32).reshape(-1)
    if scale.numel() == 0 or not bool(torch.isfinite(scale).all()):
        raise SJDInputError(f"{what}, got {cfg_scale!r}")
    return scale


def check_num_tokens(model, num_tokens) -> int:
    """``num_tokens`` as an int in [1, the model's ``max_image_tokens``] (``generate`` and SJD2)."""
    N = check_int("num_tokens", num_tokens, 1)
    max_tok = getattr(model, "max_image_tokens", None)
    if max_tok is not None and N > max_tok:
        raise SJDInputError(f"num_tokens {N} exceeds the model's max_image_tokens {max_tok}")
    return N


def check_batch_cfg(B: int, scale: torch.Tensor) -> None:
    """At least one request, and ``check_cfg_scale``'s scale given once or once per request."""
    if B < 1:
        raise SJDInputError("cond must hold at least one request")
    if scale.numel() not in (1, B):
        raise SJDInputError(f"cfg_scale must be a float or give one value per request ({B}), got {scale.numel()}")


@dataclass
class GenerateStats:
    method: str
    num_tokens: int
    window: int = 0
    batch: int = 0
    nfe: int = 0                   # window forwards (a CFG pair of rows is one forward)
    nfe_prefill: int = 0           # prompt forwards before the first window
    steps: list = field(default_factory=list)          # [B] steps each request was active
    accepted_hist: list = field(default_factory=list)  # [W+1] request-steps that accepted k drafts (k+1 tokens)
    wall_s: float = 0.0
    prefill_s: float = 0.0
    forward_s: float = 0.0         # window steps: inputs, model forward up to the LM head
    post_s: float = 0.0            # window steps: everything after the LM head (the op, the commit)
    zero_mass_residuals: int = 0
    zero_mass_coupling: int = 0
    state_overflows: int = 0       # sparse state: rows whose support exceeded the capacity (drafted uniformly)
    state_bytes: int = 0           # JacobiState
    cache_bytes: int = 0           # KV cache
    tree_nodes: int = 0            # pac: node slots per request (forward inputs per model row and step)
    step_s: float = 0.0            # window steps in total (eager: forward_s + post_s; CUDA graph: events per step)
    cuda_graph: bool = False       # the window step was captured in a CUDA graph and replayed
    graph_replays: int = 0         # steps run by replaying the graph (the others: warm-up, eager)
    capture_s: float = 0.0         # host time of the capture

    @property
    def nfe_total(self) -> int:
        return self.nfe + self.nfe_prefill

    @property
    def tokens_per_step(self) -> float:
        """Step compression of the batch: image tokens / window forwards."""
        return self.num_tokens / max(1, self.nfe)

    @property
    def mean_tokens_per_step(self) -> float:
        """Mean over requests of ``num_tokens / steps``."""
        return sum(self.num_tokens / max(1, s) for s in self.steps) / max(1, len(self.steps))

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(nfe_total=self.nfe_total, tokens_per_step=self.tokens_per_step,
                 mean_tokens_per_step=self.mean_tokens_per_step)
        return d


@dataclass
class GenerateOutput:
    tokens: torch.Tensor                       # [B, num_tokens] i64
    stats: GenerateStats
    cache: StaticKVCache | None = None         # with return_cache=True


def _device_dtype(model):
    dev = getattr(model, "device", None)
    dtype = getattr(model, "dtype", None)
    if not isinstance(dev, torch.device) or not isinstance(dtype, torch.dtype):
        p = next(iter(model.parameters()))
        dev, dtype = p.device, p.dtype
    return dev, dtype


class _Timer:
    """Host clocks on CPU; CUDA events on GPU (read once at the end, no per-step synchronisation)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device          # the model's GPU, which need not be the current one
        self.marks: list[list] = []

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(self.device))
            return e
        return time.perf_counter()

    def add(self, *marks):
        self.marks.append(list(marks))

    def sums(self) -> list[float]:
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize(self.device)
        tot = [0.0] * (len(self.marks[0]) - 1)
        for ms in self.marks:
            for i in range(len(ms) - 1):
                tot[i] += (ms[i].elapsed_time(ms[i + 1]) * 1e-3) if self.cuda else ms[i + 1] - ms[i]
        return tot


GRAPH_WARMUP_STEPS = 2       # eager steps on a side stream before the capture (real steps of the generation)
GRAPH_METHODS_REFUSED = {
    "pac": "method 'pac' runs a tree step whose forward uses per-step tree masks and a KV compaction "
           "that are not captured yet; use cuda_graph=False",
    "sjd2": "method 'sjd2' runs its own loop (sjd_kernels.sjd2) with a KV policy that re-forwards noisy "
            "windows; it is not captured yet; use cuda_graph=False",
}
# Tests only: a callable ``run(step_fn)`` that replaces the side-stream warm-up, the capture and the
# replays (each call runs one step, e.g. ``lambda f: f()``), so the graph path's driver and step
# function can be checked on CPU. ``None`` (the default) captures a real CUDA graph.
_graph_dry_run = None


class _GraphStep:
    """One window step captured in a CUDA graph and replayed (``generate(..., cuda_graph=True)``).

    ``fn`` is the step: it reads and writes only tensors allocated before the loop (static buffers),
    with fixed shapes and no host synchronisation. Every call of this object runs exactly one step:
    the first ``warmup`` calls run ``fn`` eagerly on a side stream (the standard ``torch.cuda.graph``
    warm-up; Triton compiles, cuBLAS and the attention kernels set up outside the capture); the next
    call captures ``fn`` (recording only: nothing executes during the capture) and replays it; later
    calls replay it. Each call is timed with CUDA events on the current stream.
    """

    def __init__(self, fn, device: torch.device, timer: "_Timer", warmup: int = GRAPH_WARMUP_STEPS,
                 dry_run=None):
        self.fn, self.device, self.timer = fn, device, timer
        self.warmup = max(1, int(warmup))
        self.dry_run = dry_run
        self.calls = 0
        self.replays = 0
        self.capture_s = 0.0
        self.graph = None
        self.side = None if dry_run is not None else torch.cuda.Stream(device)

    def _capture(self) -> None:
        t = time.perf_counter()
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                self.fn()
        except Exception as e:
            raise RuntimeError(
                "cuda_graph=True: capturing the window step failed. The model's forward must run on the "
                "static KV cache without host synchronisation (.item(), bool(tensor), .tolist(), nonzero, "
                f"boolean-mask indexing, data-dependent shapes); use cuda_graph=False. {type(e).__name__}: {e}"
            ) from e
        self.graph = g
        self.capture_s = time.perf_counter() - t

    def __call__(self) -> None:
        if self.dry_run is not None:
            self.dry_run(self.fn)
            self.replays += int(self.calls >= self.warmup)
            self.calls += 1
            return
        with torch.cuda.device(self.device):
            if self.calls >= self.warmup and self.graph is None:
                self._capture()
            t0 = self.timer.now()
            if self.graph is None:
                cur = torch.cuda.current_stream(self.device)
                self.side.wait_stream(cur)
                with torch.cuda.stream(self.side):
                    self.fn()
                cur.wait_stream(self.side)
            else:
                self.graph.replay()
                self.replays += 1
            self.calls += 1
            self.timer.add(t0, self.timer.now())


def _model_logits(logits, rows: int, length: int, V: int) -> torch.Tensor:
    """The model's output as the ops take it: ``[rows, length, V]`` of a floating dtype (float64 test
    models are read as float32). Anything else is the model's mistake, named, never cast (a complex
    tensor would lose its imaginary part, an integer one would pass as logits)."""
    if not isinstance(logits, torch.Tensor):
        raise SJDInputError(f"the model returned {type(logits).__name__}, expected a logits tensor")
    if logits.dim() != 3 or logits.shape[-1] != V or logits.shape[:2] != (rows, length):
        raise SJDInputError(f"the model returned logits {list(logits.shape)}, expected [{rows}, {length}, "
                            f"vocab_size={V}]: its vocab_size does not match its LM head")
    if logits.dtype == torch.float64:
        return logits.float()
    if logits.dtype not in FLOAT_DTYPES:
        raise SJDInputError(f"the model returned logits of dtype {logits.dtype}, expected float32, bfloat16, "
                            f"float16 or float64")
    return logits


def check_progress(progress) -> None:
    """``progress``: None (a bar when stderr is a terminal), True or False ("no" used to turn the bar on)."""
    if progress is not None and not isinstance(progress, bool):
        raise SJDInputError(f"progress must be None (on when stderr is a terminal), True or False, got {progress!r}")


@torch.no_grad()
def generate(model, cond, num_tokens: int, method: str = "sjd", *, window: int = 16, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, cfg_scale=1.0, uncond=None, seed=0, draft_init: str = "uniform",
             beta: float | None = None, vp_form: str | None = None, forced: torch.Tensor | None = None,
             backend: str = "auto", progress: bool | None = None, cache_len: int | None = None,
             return_cache: bool = False, on_step=None, cuda_graph: bool = False, sjd2=None,
             sjd2_kv: str | None = None, tree_width: int | None = None,
             tree_depth: int | None = None, state_capacity: int | None = None) -> GenerateOutput:
    """Generate ``num_tokens`` image tokens per request; returns tokens ``[B, num_tokens]`` and stats.

    ``cond``: the model's conditions (class ids ``[B]`` for the in-package GPT); ``uncond``:
    the unconditional rows' conditions (default: the model's null condition).
    ``method``: see ``sjd_kernels.decoding.methods`` (``available_methods()``).
    ``window``: drafts per step W (``ar``/``ar_gumbel``: 0; cut to ``num_tokens - 1``).
    ``temperature``/``top_k``/``top_p``: the target law (SPEC section 2; ``temperature=0`` greedy).
    ``cfg_scale``: float or one per request; ``!= 1`` runs a conditional and an unconditional row
    per request. ``seed``: int base seed or one per request (module docstring).
    ``draft_init``: positions entering the window 'uniform' or 'left' (copy of the left neighbour,
    one-hot law); the very first window is uniform either way (no left neighbour is committed yet).
    ``beta``/``vp_form``: verification prediction (``sjd_vp``, default beta 0.5; ``coupling``
    couples towards ``Qvp`` when beta != 0); ``vp_form`` 'add' (default) or 'log'. Both are
    refused for the other methods (``beta=0``, no verification prediction, is accepted by all).
    ``forced [B, L]``: per image position, -1 or a token forced there. ``backend``: auto, torch,
    triton, cuda. ``progress``: tqdm bar (default: on when stderr is a terminal). ``cache_len``:
    KV slots per row (default: just enough).
    ``return_cache``: also return the KV cache. ``on_step(tokens [B, num_tokens], n [B], cache)``:
    called after every step's commit (tests, debugging; -1 marks uncommitted tokens).
    ``cuda_graph``: capture the window step in a CUDA graph and replay it (chain methods on a CUDA
    model, any backend: the ``torch`` reference captures too; tokens and stats as eager; module docstring).
    ``sjd2``/``sjd2_kv``: the SJD2 embedding (an ``SJD2Embedding``, or None / 'model': the model's
    own ``model.sjd2``, set by ``sjd_kernels.sjd2.checkpoint.load_finetuned``; a model without one
    is refused unless the window is 0, i.e. AR) and KV policy ('keep' or 'recompute'; default: ``generate_sjd2``'s) for
    ``method='sjd2'`` (``sjd_kernels.sjd2.generate_sjd2``); refused for the other methods.
    ``method='sjd2'`` takes the in-package class-conditional GPT, ``cond``, ``num_tokens``,
    ``window`` (cut to ``num_tokens - 1``), the target law, ``cfg_scale``, ``seed`` and ``backend``;
    it refuses ``forced``, ``uncond``, ``beta != 0``, ``vp_form``, ``draft_init='left'``, the tree and
    sparse-state options, ``cache_len``, ``return_cache`` and ``on_step``.
    ``tree_width``/``tree_depth``: ``method='pac'``: children per tree node K (default 3) and tree
    levels D (default 3, at most ``window``) before the chain (``sjd_kernels.decoding.pac``).
    ``state_capacity``: None keeps the drafts' laws dense (``[B, W+1, V]`` floats); an int C keeps
    them sparse, C entries per position (exact; worth it with top-k: C = top_k + 64 leaves room for
    ties; a row whose support exceeds C drafts that position uniformly, counted in
    ``stats.state_overflows``). Chain methods, every backend.

    Errors: bad arguments raise ``SJDInputError`` (naming the argument) before any model forward.
    A step whose op reports a device error (non-finite rows after CFG and temperature scaling, e.g.
    a model emitting NaN or a tiny temperature overflowing the logits) freezes the affected
    requests (nothing of theirs is committed or fed back to the model) and ``generate`` raises
    ``SJDDeviceError`` (``check_status``) at the next host synchronisation, at the latest before
    returning; no -1 token is ever returned.
    """
    if not isinstance(method, str):
        raise SJDInputError(f"method must be one of {', '.join(available_methods())}, got {method!r}")
    if method in PENDING:
        raise NotImplementedError(PENDING[method])
    for name, flag in (("cuda_graph", cuda_graph), ("return_cache", return_cache)):
        if not isinstance(flag, bool):
            raise SJDInputError(f"{name} must be True or False, got {flag!r}")
    check_progress(progress)
    if on_step is not None and not callable(on_step):
        raise SJDInputError(f"on_step must be None or a callable on_step(tokens, n, cache), got {on_step!r}")
    if cuda_graph and method in GRAPH_METHODS_REFUSED:
        raise NotImplementedError(f"cuda_graph=True: {GRAPH_METHODS_REFUSED[method]}")
    if method == "sjd2" and "sjd2" in available_methods():
        # options of the chain and tree loop that SJD2 does not run: refused, never silently ignored
        unused = [name for name, given in (
            ("forced", forced is not None), ("uncond", uncond is not None),
            ("beta", beta is not None and check_finite("beta", beta) != 0.0), ("vp_form", vp_form is not None),
            ("draft_init", draft_init != "uniform"),
            ("tree_width", tree_width is not None), ("tree_depth", tree_depth is not None),
            ("cache_len", cache_len is not None), ("return_cache", return_cache is not False),
            ("on_step", on_step is not None)) if given]
        if state_capacity is not None:
            raise SJDInputError("state_capacity (sparse state) applies to the chain methods, not 'sjd2'")
        if unused:
            raise SJDInputError(f"method 'sjd2' does not use {', '.join(unused)} (sjd_kernels.sjd2 runs its own "
                                f"loop: no forced positions, the model's null condition for CFG, no verification "
                                f"prediction, no draft tree, its own KV cache); drop "
                                f"{'it' if len(unused) == 1 else 'them'} or use another method")
        return _generate_sjd2(model, cond, num_tokens, window=window, temperature=temperature, top_k=top_k,
                              top_p=top_p, cfg_scale=cfg_scale, seed=seed, backend=backend, sjd2=sjd2, kv=sjd2_kv,
                              progress=progress)
    if method not in METHODS:
        raise SJDInputError(f"method must be one of {', '.join(available_methods())}, got {method!r}")
    if sjd2 is not None or sjd2_kv is not None:
        raise SJDInputError(f"sjd2/sjd2_kv (the SJD2 embedding and KV policy) apply to method 'sjd2', "
                            f"not {method!r}")
    spec = METHODS[method]
    check_model(model)
    dev, dtype = _device_dtype(model)
    V = model.vocab_size
    N = check_num_tokens(model, num_tokens)
    window = check_int("window", window, 0)                 # every method, AR included
    W = min(window, N - 1) if spec.windowed else 0
    if spec.tree:
        K_tree, D_tree = _pac.check_tree_options(tree_width, tree_depth, window, N)
        D_tree = min(D_tree, W)
        if not getattr(model, "tree_attention", True):
            raise NotImplementedError(f"method 'pac' needs a model that runs tree-masked windows; "
                                      f"{type(model).__name__} sets tree_attention = False")
    elif tree_width is not None or tree_depth is not None:
        raise SJDInputError(f"tree_width/tree_depth apply to method 'pac', not {method!r}")
    if state_capacity is not None:
        cap = as_int(state_capacity)
        if cap is None or cap < 1:
            raise SJDInputError(f"state_capacity must be a positive int or None (dense), got {state_capacity!r}")
        state_capacity = cap
        if spec.tree:
            raise SJDInputError("state_capacity (sparse state) applies to the chain methods; 'pac' keeps dense laws")

    # ---- sampling settings, checked before any work
    top_k, top_p = check_sampling(temperature, top_k, top_p, V)
    if draft_init not in ("uniform", "left"):
        raise SJDInputError(f"draft_init must be 'uniform' or 'left', got {draft_init!r}")
    if vp_form is not None:
        if not isinstance(vp_form, str) or vp_form not in ("add", "log"):
            raise SJDInputError(f"vp_form must be 'add' or 'log', got {vp_form!r}")
        if method not in ("sjd_vp", "coupling"):
            raise SJDInputError(f"vp_form (verification prediction) applies to sjd_vp and coupling, not {method!r}")
    vp_form = "add" if vp_form is None else vp_form
    beta = spec.default_beta if beta is None else check_finite("beta", beta)
    if beta != 0.0 and method not in ("sjd_vp", "coupling"):
        raise SJDInputError(f"beta (verification prediction) applies to sjd_vp and coupling, not {method!r}")
    if beta != 0.0 and W == 0:
        beta = 0.0
    why = sparse_vp_problem(state_capacity is not None, vp_form, beta)
    if why:
        raise SJDInputError(f"state_capacity: {why}")
    dry_run = _graph_dry_run if cuda_graph else None
    if cuda_graph and dry_run is None and dev.type != "cuda":
        raise SJDInputError(f"cuda_graph=True needs a model on a CUDA device, got a model on {dev} "
                            f"(use cuda_graph=False)")
    be = resolve_backend(backend, dev)
    if spec.tree and dtype == torch.float64 and be != "torch":
        # tree_kv_update moves the accepted path in the model-dtype KV cache; checked here, before any forward
        raise SJDInputError(f"method 'pac' on a float64 model: a float64 cache needs backend 'torch' (the {be} "
                            f"kernels take fp32/fp16/bf16); use backend='torch' or a float32/16 model")

    # ---- conditions, CFG, seeds
    scale = check_cfg_scale(cfg_scale)
    use_cfg = bool((scale != 1.0).any())
    if uncond is not None and not use_cfg:
        raise SJDInputError("uncond is given but cfg_scale is 1 (no guidance): set cfg_scale or drop uncond")
    pre = model.prefix(cond, use_cfg, uncond)
    rows = pre.embeds.shape[0]
    if pre.embeds.dim() != 3 or pre.lengths.shape != (rows,) or (use_cfg and rows % 2):
        raise SJDInputError(f"{type(model).__name__}.prefix returned embeds {list(pre.embeds.shape)} and lengths "
                            f"{list(pre.lengths.shape)}: expected [R, L, d] and [R] with R = B (x2 with CFG)")
    B = rows // 2 if use_cfg else rows
    check_batch_cfg(B, scale)
    cfg_t = scale.expand(B).contiguous().to(dev) if use_cfg else None
    seeds = request_seeds(seed, B, dev)
    if forced is not None:
        if not isinstance(forced, torch.Tensor) or forced.dtype != torch.int64 or forced.dim() != 2 \
                or forced.shape[0] != B:
            raise SJDInputError(f"forced must be an int64 tensor [B={B}, L] (-1 = free), got "
                                f"{getattr(forced, 'dtype', type(forced))} {list(getattr(forced, 'shape', []))}")
        limit = V + int(getattr(model, "num_extra_tokens", 0))
        if forced.numel() and (int(forced.min()) < -1 or int(forced.max()) >= limit):
            raise SJDInputError(f"forced ids must be -1 or in [0, {limit}), got range "
                                f"[{int(forced.min())}, {int(forced.max())}]")
        forced = forced.to(dev).contiguous()
    lengths = pre.lengths.to(device=dev, dtype=torch.int64)
    L_max, L_min = int(lengths.max()), int(lengths.min())
    if L_min < 1:
        raise SJDInputError(f"every prompt needs at least one position, got prefix lengths {lengths.tolist()}")
    plan = _pac.PacPlan.create(K_tree, D_tree, W, dev) if spec.tree else None
    span = plan.num_nodes - 1 if spec.tree else W                  # slots a step writes past X[n-1]
    need = L_max + N + span
    S = need if cache_len is None else check_int("cache_len", cache_len, 1)
    StaticKVCache.check_size(model.num_layers, rows, model.num_kv_heads, S, model.head_dim, dtype, name="cache_len")
    if S < need:
        what = f"a tree of {plan.num_nodes} nodes" if spec.tree else f"a window of {W}"
        raise SJDInputError(f"cache_len {S} is too small: a prompt of {L_max} + {N} image tokens + {what} "
                            f"needs {need} slots per row (use a smaller window or a larger cache)")

    # ---- allocation and prefill (prompt positions 0 .. L-2; the last one is fed with the first window)
    t_start = time.perf_counter()
    cache = StaticKVCache(model.num_layers, rows, model.num_kv_heads, S, model.head_dim, dtype=dtype, device=dev)
    state = JacobiState.create(B, W, V, seeds, device=dev, vp=beta != 0.0, capacity=state_capacity)
    stats = GenerateStats(method=method, window=W, batch=B, num_tokens=N, state_bytes=state.state_bytes(),
                          cache_bytes=cache.nbytes(), tree_nodes=plan.num_nodes if spec.tree else 0)
    embeds = pre.embeds.to(dtype)
    if L_max > 1:
        T = L_max - 1
        slots, mask = cache.window(T)
        model(embeds[:, :T], slots, cache=cache, mask=mask, write_slots=slots)
        stats.nfe_prefill = 1
    cache.set_lengths(lengths - 1)
    first_emb = embeds[torch.arange(rows, device=dev), lengths - 1].unsqueeze(1)    # [rows, 1, d]
    stats.prefill_s = time.perf_counter() - t_start

    i64 = torch.int64
    n = torch.zeros(B, dtype=i64, device=dev)
    last_tok = torch.zeros(B, dtype=i64, device=dev)
    out = torch.full((B, N + 1), -1, dtype=i64, device=dev)          # column N takes discarded writes
    drafts = init_window(state, n, W, forced)
    hist = torch.zeros(W + 1, dtype=i64, device=dev)
    steps = torch.zeros(B, dtype=i64, device=dev)
    cols = torch.arange(W + 1, device=dev)
    timer = _Timer(dev)
    mode = spec.mode

    def step(timed: bool = True):
        # Static buffers only: every tensor that outlives the step (n, last_tok, drafts, out, hist, steps,
        # the cache and the state) is updated in place, so the same function is the eager step and the
        # body of the CUDA graph. No host synchronisation on a CUDA device (Python branches below read
        # shapes and dtypes only).
        t0 = timer.now() if timed else None
        active = n < N
        win_len = torch.where(active, (N - 1 - n).clamp(max=W), torch.zeros_like(n))
        tok_in = torch.cat([last_tok.view(B, 1), drafts], 1)
        emb = model.embed_tokens(tok_in)                                           # [B, W+1, d]
        n_rows = n
        if use_cfg:
            emb = torch.cat([emb, emb], 0)
            n_rows = torch.cat([n, n])
        emb0 = torch.where((n_rows == 0).view(rows, 1, 1), first_emb, emb[:, :1])
        emb = torch.cat([emb0, emb[:, 1:]], 1)
        slots, mask = cache.window(W + 1)
        logits = model(emb, slots, cache=cache, mask=mask, write_slots=slots)
        t1 = timer.now() if timed else None
        logits = _model_logits(logits, rows, W + 1, V)
        o = jacobi_step(logits[:B], drafts, win_len, n, state,
                        uncond_logits=logits[B:] if use_cfg else None, cfg_scale=cfg_t, forced=forced,
                        temperature=float(temperature), top_k=top_k, top_p=float(top_p), mode=mode, beta=beta,
                        vp_form=vp_form, tail_init=draft_init, backend=be)
        m = o.num_accepted
        ok = active & (m >= 0)             # m = -1: a device error (status set); the request is frozen
        cnt = torch.where(ok, m + 1, torch.zeros_like(m))
        keep = cols.view(1, -1) < cnt.view(B, 1)
        out.scatter_(1, torch.where(keep, n.view(B, 1) + cols, torch.full_like(keep, N, dtype=i64)), o.tokens)
        last = torch.gather(o.tokens, 1, m.clamp(min=0).view(B, 1)).squeeze(1)
        last_tok.copy_(torch.where(cnt > 0, last, last_tok))
        # a request in error got -1 drafts: keep its old ones, so the model is never fed a -1 (the loop
        # raises SJDDeviceError at its next synchronisation)
        drafts.copy_(torch.where(ok.view(B, 1), o.next_drafts, drafts))
        n.add_(cnt)
        cache.set_lengths(lengths - 1 + (torch.cat([n, n]) if use_cfg else n))
        hist.scatter_add_(0, m.clamp(0, W), active.to(i64))
        steps.add_(active.to(i64))
        if timed:
            timer.add(t0, t1, timer.now())

    if spec.tree:
        row_index = torch.arange(B, device=dev).repeat(2) if use_cfg else None

        def step():                                                # method 'pac' (sjd_kernels.decoding.pac)
            t0 = timer.now()
            active = n < N
            win_len = torch.where(active, (N - 1 - n).clamp(max=W), torch.zeros_like(n))
            tree = build_tree(state, last_tok, n, plan.K, plan.D, W, first=drafts, forced=forced)
            tree = _pac.prune(tree, win_len)
            emb = model.embed_tokens(tree.input_ids())                             # [B, nodes, d]
            trow = tree
            n_rows = n
            if use_cfg:
                emb = torch.cat([emb, emb], 0)
                trow = tree._select(row_index)
                n_rows = torch.cat([n, n])
            emb0 = torch.where((n_rows == 0).view(rows, 1, 1), first_emb, emb[:, :1])
            emb = torch.cat([emb0, emb[:, 1:]], 1)
            cl = cache.lengths.clone()
            logits = model(emb, trow.position_ids(cl), cache=cache, mask=plan.attention_mask(trow, cl, S),
                           write_slots=trow.node_slots(cl))
            t1 = timer.now()
            logits = _model_logits(logits, rows, plan.num_nodes, V)
            lc, lu = logits[:B], (logits[B:] if use_cfg else None)
            try:
                o = tree_verify(lc, tree, n, state, uncond_logits=lu, cfg_scale=cfg_t, forced=forced,
                                temperature=float(temperature), top_k=top_k, top_p=float(top_p), backend=be,
                                advance=False)
            except TreeRowError as e:
                # CPU tensors: tree_verify checks the rows on the host and raises at once. The model's
                # output (or the target settings applied to it) failed: the condition a GPU run reports
                # through the status, raised as the same SJDDeviceError
                raise SJDDeviceError(f"tree step: {e}") from e
            m = o.num_accepted
            ok = active & (m >= 0)             # m = -1: a device error (status set); the request is frozen
            cnt = torch.where(ok, m + 1, torch.zeros_like(m))
            path = torch.where(ok.view(B, 1), o.path, torch.full_like(o.path, -1))
            tree_kv_update(cache.kv, torch.cat([path, path]) if use_cfg else path, cl, status=state.status,
                           backend=be)
            cont = _pac.continuation(plan, tree, o.path, m)
            nxt = _pac.propose(lc, lu, cfg_t, cont, m, drafts, win_len, n, o.tokens.gather(
                1, m.clamp(min=0).view(B, 1)).squeeze(1), state, forced, temperature=float(temperature),
                top_k=top_k, top_p=float(top_p), tail_init=draft_init, write=ok)
            state.step.add_(1)
            keep = cols.view(1, -1) < cnt.view(B, 1)
            out.scatter_(1, torch.where(keep, n.view(B, 1) + cols, torch.full_like(keep, N, dtype=i64)), o.tokens)
            last = torch.gather(o.tokens, 1, m.clamp(min=0).view(B, 1)).squeeze(1)
            last_tok.copy_(torch.where(cnt > 0, last, last_tok))
            drafts.copy_(torch.where(ok.view(B, 1), nxt, drafts))
            n.add_(cnt)
            cache.set_lengths(lengths - 1 + (torch.cat([n, n]) if use_cfg else n))
            hist.scatter_add_(0, m.clamp(0, W), active.to(i64))
            steps.add_(active.to(i64))
            timer.add(t0, t1, timer.now())

    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N * B, desc=f"{method} W={W}", unit="tok", leave=False)
    run = step
    runner = None
    if cuda_graph:
        runner = _GraphStep(lambda: step(False), dev, timer, dry_run=dry_run)
        run = runner
    pending = -(-N // (W + 1))                       # steps that must run before any request can finish
    guard = N + 1
    try:
        while pending > 0:
            for _ in range(pending):
                run()
                if on_step is not None:
                    on_step(out[:, :N], n, cache)
            stats.nfe += pending
            vals = torch.cat([n, state.status.to(i64)]).tolist()     # the one host synchronisation
            if vals[B]:
                check_status(state.status)
            if stats.nfe > guard:
                raise RuntimeError(f"decoding did not finish in {guard} steps (committed {vals[:B]})")
            if bar is not None:
                bar.n = sum(vals[:B])
                bar.refresh()
            pending = max(-(-(N - v) // (W + 1)) for v in vals[:B])
    finally:
        if bar is not None:
            bar.close()
    counters = check_status(state.status)
    stats.zero_mass_residuals = counters["zero_mass_residuals"]
    stats.zero_mass_coupling = counters["zero_mass_coupling"]
    stats.state_overflows = counters["state_overflows"]
    stats.steps = steps.tolist()
    stats.accepted_hist = hist.tolist()
    split = timer.sums()
    if runner is not None:
        stats.cuda_graph = runner.dry_run is None
        stats.graph_replays = runner.replays
        stats.capture_s = runner.capture_s
        stats.step_s = split[0] if split else 0.0
    elif split:
        stats.forward_s, stats.post_s = split
        stats.step_s = stats.forward_s + stats.post_s
    stats.wall_s = time.perf_counter() - t_start
    return GenerateOutput(out[:, :N].contiguous(), stats, cache if return_cache else None)


def _generate_sjd2(model, cond, num_tokens, *, window, temperature, top_k, top_p, cfg_scale, seed, backend, sjd2,
                   kv, progress) -> GenerateOutput:
    """``method='sjd2'``: ``sjd_kernels.sjd2.generate_sjd2`` (same seed and CFG conventions)."""
    from ..sjd2.decode import generate_sjd2
    extra = {} if kv is None else {"kv": kv}
    return generate_sjd2(model, cond, num_tokens, sjd2="model" if sjd2 is None else sjd2, window=window, seed=seed,
                         cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, backend=backend,
                         progress=progress, **extra)
