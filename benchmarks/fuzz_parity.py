"""Random jacobi_step and tree_verify configurations: the reference, the Triton kernels and the CUDA kernels, compared.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/fuzz_parity.py [--op jacobi_step|tree_verify|verify_chain]
        [--cases N] [--seed S] [--backends triton,cuda] [--start I] [--device cpu|cuda] > LOG

The parity tests run fixed grids. This draws each case's configuration at random from the whole
space the op accepts (every draft mode, VP form and strength, CFG with mixed dtypes, temperature
0 to 1.7, top-k from 1 to V, top-p, forced positions, left tails, unaligned vocabulary slices, the
row families that stress the top-k searches, W 0 to 33, B 1 to 6, V 1 to 16387), in two kinds:
- ``single``: one step on the adversarial stored laws of ``tests/test_cuda_jacobi_step.build_case``
  (drafts drawn from their laws, from 2 P, from mixtures, uniform, one-hot);
- ``chain``: three steps from a fresh state, dense or sparse (capacity below, at or above top-k),
  the state fed back and the logits drifting by absolute position (rows: Gaussian, ties,
  masked, an outlier or heavy tails).

The Triton kernel runs under the interpreter (CPU tensors); the CUDA kernels run in the CPU
simulator (``sjd_kernels.cuda.sim``) with a random set of optional paths, a random thread order
and, for some cases, rows in global memory. With ``--device cuda`` (a GPU, TRITON_INTERPRET unset)
the same cases run on the compiled kernels, with the reference on the GPU too; the inputs are
drawn on the CPU, so case I is the same case on both devices (the GPU picks the thread order).
Each backend must give the reference's outputs, kinds, error bits, overflow count and sparse ids,
and its stored laws to float rounding, request by request; as in the GPU parity tests, at most one request per 200 rows may differ (a float rounding
at a sampling boundary). One line per case and backend: case index, kind, ok/FAIL, rows, differing
requests, seconds, then the configuration (JSON) so any case can be rerun alone with
``--start I --cases 1``. Exits 1 if any case failed. The state of a request in error is not
compared (the kernels leave it undefined, docs/DESIGN.md); its outputs and error bits are.

``--op tree_verify`` draws ``tests/test_tree_verify_kernels.make_case`` arguments instead (B 1 to
6, V 2 to 4099, K 1 to 4, depth 0 to 3 plus a chain, every stored-law kind, coupled first
children, forced positions, CFG, greedy, top-k, top-p, a NaN root row or a bad draft id now and
then) with the CUDA kernel on the default, bracket or hist top-k path: outputs per request (at
most one in 50 may differ) and the error bits exactly. ``--op verify_chain`` draws laws for
``verify_chain`` (``draw_verify``: B 1 to 8, W 0 to 150, V 1 to 9000, mixed dtypes, drafts near or
far from the target, one-hot or unnormalised, injected errors) with the CUDA kernel at a random
block width; same rule.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import torch  # noqa: E402

import test_cuda_jacobi_step as t  # noqa: E402

from sjd_kernels.demo import at_least, check_flags  # noqa: E402
from sjd_kernels.ops.jacobi_step import JacobiState  # noqa: E402
from sjd_kernels.reference import jacobi_step as ref  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FEATURE_SETS = [(), ("list_races",), ("bracket_topk",), ("bracket_topk", "list_races"), ("hist_topk",),
                ("hist_topk", "list_races")]
ORDERS = ("forward", "reverse", "shuffle")
BUDGET = 300_000            # B * (W + 1) * V: a few seconds per case in the interpreter and the simulator


def draw_config(r: random.Random) -> dict:
    """One configuration (JSON-able) from the whole input space."""
    V = r.choice([1, 2, 7, 37, 256, 1000, 1000, 1003, 1000, 4096, 8197, 16387])
    W = r.choice([0, 1, 2, 5, 8, 8, 16, 16, 24, 33])
    B = r.randint(1, 6)
    while B * (W + 1) * V > BUDGET and (B > 1 or W > 1):
        if B > 1:
            B -= 1
        else:
            W //= 2
    kind = r.choice(["randn"] * 6 + ["ties", "masked", "outlier", "heavy", "band", "flat", "low-outlier"])
    if V < 16 and kind in ("band", "low-outlier"):
        kind = "randn"
    dtype = "fp32" if kind in ("band", "flat", "low-outlier") else r.choice(["bf16", "bf16", "fp16", "fp32"])
    cfg = kind != "masked" and r.random() < 0.5
    mode = r.choice(["sjd", "sjd", "coupling", "coupling", "gumbel", "gumbel_jacobi"])
    top_k = min(V, r.choice([0, 0, 1, 2, r.randint(1, V), r.randint(1, max(1, V // 8)), V]))   # the op's range
    c = dict(B=B, W=W, V=V, dtype=dtype, cfg=cfg, mode=mode, top_k=top_k,
             top_p=r.choice([1.0, 1.0, 1.0, 0.9, 0.5, 0.99, 1e-3]),
             temperature=r.choice([0.0, 0.5, 1.0, 1.0, 1.0, 1.7]),
             vp=r.random() < 0.4, beta=r.choice([0.5, -0.7, 1.3, 2.0, -0.5, 0.0, 1.0]),
             vp_form=r.choice([ref.VP_ADD, ref.VP_LOG]), tail_init=r.choice([ref.TAIL_UNIFORM, ref.TAIL_LEFT]),
             forced=r.random() < 0.25, slice_logits=r.random() < 0.25, logits_kind=kind,
             scale=r.choice([0.5, 2.5, 2.5, 8.0]))
    if cfg and r.random() < 0.2:
        c["uncond_dtype"] = "fp32"
    return c


def build_single(c: dict, seed: int, device: str = "cpu") -> dict:
    kw = {k: v for k, v in c.items() if k not in ("kind", "capacity")}
    kw["dtype"] = DTYPES[kw["dtype"]]
    if "uncond_dtype" in kw:
        kw["uncond_dtype"] = DTYPES[kw["uncond_dtype"]]
    old, t.DEV = t.DEV, device           # build_case draws on the CPU, then moves its tensors to DEV
    try:
        return t.build_case(seed=seed, **kw)
    finally:
        t.DEV = old


def chain_inputs(c: dict, seed: int, steps: int, device: str = "cpu"):
    """A fresh state and per-step logits for a chain (rows drift by absolute position), drawn on the
    CPU (the same values for every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    B, W, V = c["B"], c["W"], c["V"]
    L = 8 + steps * (W + 1) + W + 1
    base = c["scale"] * torch.randn(B, L, V, generator=g)
    if c["logits_kind"] == "ties":
        base = base.round()
    elif c["logits_kind"] == "outlier":
        base[..., 0] = 300.0
    elif c["logits_kind"] == "heavy":
        base = base ** 3 / c["scale"] ** 2
    elif c["logits_kind"] == "masked":
        base = torch.where(torch.rand(base.shape, generator=g) < 0.6, torch.full_like(base, float("-inf")), base)
    unc = base + torch.randn(B, L, V, generator=g) if c["cfg"] else None
    noise = [0.1 * torch.randn(B, W + 1, V, generator=g) for _ in range(steps)]
    forced = None
    if c["forced"]:
        forced = torch.full((B, L), -1, dtype=torch.int64)
        mark = torch.rand(B, L, generator=g) < 0.12
        ids = torch.randint(0, V + 3, (B, L), generator=g)
        forced = torch.where(mark, ids, forced)
    capacity = None
    if c.get("capacity"):
        capacity = c["capacity"]
    st = JacobiState.create(B, W, V, torch.randint(-(2**62), 2**62, (B,), generator=g).tolist(),
                            vp=c["vp"], capacity=capacity, device=device)
    pos = torch.randint(0, 8, (B,), generator=g)
    cfg_scale = (torch.rand(B, generator=g) * 4 + 1) if c["cfg"] else None

    def mv(x):                          # a no-op on the CPU
        return None if x is None else x.to(device)
    base, unc, forced, pos, cfg_scale = mv(base), mv(unc), mv(forced), mv(pos), mv(cfg_scale)
    noise = [mv(x) for x in noise]
    return base, unc, noise, forced, st, pos, cfg_scale


def _call(fn, logits, unc, cfg_scale, drafts, win, pos, st, forced, c):
    kw = {"q_idx": st.q_idx} if st.sparse else {}
    return fn(logits, unc, cfg_scale, drafts, win, pos, st.seed, st.step, forced, st.q_state, st.q_kind, st.p_prev,
              st.status, float(c["temperature"]), int(c["top_k"]), float(c["top_p"]), t.MODES[c["mode"]],
              float(c["beta"]), int(c["vp_form"]), 1e-6, int(c["tail_init"]), **kw)


def compare(out_r, st_r, out_x, st_x, B: int) -> list[int]:
    """Requests whose outputs or state differ (laws to float rounding). The state of a request in
    error (num_accepted -1) is not compared: the kernels leave it undefined (docs/DESIGN.md). NaN
    equals NaN: the adversarial stored laws of some cases hold NaN rows the step does not touch."""
    diff = []
    dr, dx = st_r.dense_laws(), st_x.dense_laws()
    for b in range(B):
        same = all(torch.equal(x[b], y[b]) for x, y in zip(out_r, out_x))
        if same and int(out_r[0][b]) < 0:
            continue
        same = same and torch.equal(st_r.q_kind[b], st_x.q_kind[b])
        same = same and torch.allclose(dr[b], dx[b], rtol=1e-5, atol=1e-7, equal_nan=True)
        if same and st_r.p_prev.numel():
            same = torch.allclose(st_r.p_prev[b], st_x.p_prev[b], rtol=1e-5, atol=1e-7, equal_nan=True)
        if same and st_r.sparse:
            same = torch.equal(st_r.q_idx[b], st_x.q_idx[b])
        if not same:
            diff.append(b)
    return diff


def _state_from_case(case: dict, V: int) -> JacobiState:
    return JacobiState(case["q_state"].clone(), case["q_kind"].clone(), case["p_prev"].clone(), case["seed"].clone(),
                       case["step"].clone(), case["status"].clone(), vocab_size=V)


def run_case(c: dict, seed: int, fn, steps: int = 3, device: str = "cpu") -> tuple[int, int]:
    """(rows, differing requests) of backend ``fn`` against the reference, both on ``device``; raises
    on a hard mismatch (error bits, overflow count) or on an exception from either side."""
    B, W, V = c["B"], c["W"], c["V"]
    if c["kind"] == "single":
        case = build_single(c, seed, device)
        st_r, st_x = _state_from_case(case, V), _state_from_case(case, V)
        args = (case["logits"], case["uncond"], case["cfg_scale"], case["drafts"], case["win_len"], case["pos"])
        out_r = _call(ref.jacobi_step, *args, st_r, case["forced"], c)
        out_x = _call(fn, *args, st_x, case["forced"], c)
        d = compare(out_r, st_r, out_x, st_x, B)
        _check_status(st_r, st_x, full=not d and device == "cpu")
        return int((case["win_len"] + 1).sum()), len(d)
    base, unc_all, noise, forced, st, pos, cfg_scale = chain_inputs(c, seed, steps, device)
    st_r, st_x = st.clone(), st.clone()
    drafts = ref.init_window(st.seed, pos, st.step, W, V, st.q_kind, forced)
    g = torch.Generator().manual_seed(seed + 1)
    rows = ndiff = 0
    dtype = DTYPES[c["dtype"]]
    for s in range(steps):
        at = (pos.view(B, 1) + torch.arange(W + 1, device=pos.device)).view(B, W + 1, 1).expand(B, W + 1, V)
        logits = _maybe_slice((base.gather(1, at) + noise[s]).to(dtype), c)
        unc = (_maybe_slice(unc_all.gather(1, at).to(DTYPES.get(c.get("uncond_dtype"), dtype)), c)
               if unc_all is not None else None)
        win = torch.randint(0, W + 1, (B,), generator=g)
        win[0] = W
        win = win.to(pos.device)
        out_r = _call(ref.jacobi_step, logits, unc, cfg_scale, drafts, win, pos, st_r, forced, c)
        out_x = _call(fn, logits, unc, cfg_scale, drafts, win, pos, st_x, forced, c)
        rows += int((win + 1).sum())
        d = compare(out_r, st_r, out_x, st_x, B)
        _check_status(st_r, st_x, full=not d and device == "cpu")
        ndiff += len(d)
        if d or bool((out_r[0] < 0).any()):    # states differ (or are undefined after an error):
            break                               # the chain cannot go on token for token
        num, _tokens, drafts = out_r
        pos = pos + num + 1
        st_r.step += 1
        st_x.step += 1
    return rows, ndiff


def _maybe_slice(x: torch.Tensor, c: dict) -> torch.Tensor:
    """With ``slice_logits`` the rows become a slice of a wider vocabulary at an odd offset."""
    if not c["slice_logits"]:
        return x
    wide = torch.full((*x.shape[:-1], x.shape[-1] + 9), -3.0, dtype=x.dtype, device=x.device)
    wide[..., 5:5 + x.shape[-1]] = x
    return wide[..., 5:5 + x.shape[-1]]


def _check_status(st_r, st_x, full: bool = False):
    """The error bits and the overflow count always; with ``full`` (every request the same, on the CPU)
    the zero-mass counters too (on a GPU a rounding may move one of them without changing a token)."""
    sr, sx = st_r.status.tolist(), st_x.status.tolist()
    if sr != sx if full else (sr[0] != sx[0] or sr[3] != sx[3]):
        raise AssertionError(f"status differs: reference {sr}, backend {sx}")


def draw(i: int, seed: int) -> tuple[dict, dict]:
    """Case ``i``'s configuration and how each backend runs it."""
    r = random.Random(seed * 1_000_003 + i)
    c = draw_config(r)
    c["kind"] = "chain" if r.random() < 0.35 else "single"
    if c["kind"] == "chain":
        if c["logits_kind"] in ("band", "flat", "low-outlier"):     # single-step row families only
            c["logits_kind"] = "randn"
        if c["top_k"] > 0 and c["temperature"] > 0 and r.random() < 0.5:
            c["capacity"] = max(1, r.choice([c["top_k"], c["top_k"] + r.randint(1, 64), c["top_k"] // 2 or 1]))
            if c["vp"] and c["vp_form"] == 0 and c["beta"] < 0:
                # the op refuses this (additive VP with beta < 0 puts mass outside the stored support):
                # the case runs with the dense state, after the same draws, so later cases are unchanged
                del c["capacity"]
    how = dict(features=list(r.choice(FEATURE_SETS)), order=r.choice(ORDERS), global_rows=r.random() < 0.15,
               sim_seed=r.randint(0, 2**31 - 1))
    return c, how


def draw_tree(i: int, seed: int) -> tuple[dict, dict]:
    """Case ``i`` of ``--op tree_verify``: ``make_case`` arguments (JSON-able) and how the CUDA kernel runs."""
    r = random.Random(seed * 1_000_033 + i + 7)
    V = r.choice([2, 5, 16, 37, 64, 256, 1000, 2048, 4099])
    depth = r.choice([0, 1, 2, 3])
    c = dict(B=r.randint(1, 6), V=V, K=r.randint(1, 4), depth=depth, window=depth + r.choice([0, 0, 1, 3, 6]),
             dtype=r.choice(["fp32", "bf16", "fp16"]), kind=r.choice(["dense", "dense", "uniform", "onehot", "mixed"]),
             coupled=r.random() < 0.3, forced=r.random() < 0.25, cfg=r.random() < 0.4,
             temperature=r.choice([0.0, 0.7, 1.0, 1.0, 1.5]), top_k=r.choice([0, 0, 1, r.randint(1, V), V]),
             top_p=r.choice([1.0, 1.0, 0.9, 0.5]), noise=r.choice([0.05, 0.3, 0.3, 3.0]), seed=r.randint(0, 10**6))
    if c["window"] == 0:
        c["window"] = 1
    x = r.random()
    if x < 0.08:
        c["nan_node"] = [r.randrange(c["B"]), 0]
    elif x < 0.16:
        c["bad_token"] = [r.randrange(c["B"]), 1]
    how = dict(features=list(r.choice([(), ("bracket_topk",), ("hist_topk",)])), order=r.choice(ORDERS),
               sim_seed=r.randint(0, 2**31 - 1))
    return c, how


def run_tree_case(c: dict, fn, device: str = "cpu") -> tuple[int, int]:
    """(requests, differing requests) of a tree_verify backend against the reference, both on
    ``device``; raises when the error bits differ."""
    import test_tree_verify_kernels as tv
    from sjd_kernels.reference import tree as tref
    kw = dict(c, dtype=DTYPES[c["dtype"]])
    for k in ("nan_node", "bad_token"):
        if k in kw:
            kw[k] = tuple(kw[k])
    case = tv.make_case(**kw, device=device)
    want = tv.run(tref.tree_verify, case)
    got = tv.run(fn, case)
    if not torch.equal(got[1][0], want[1][0]):
        raise AssertionError(f"status differs: reference {want[1].tolist()}, backend {got[1].tolist()}")
    B = want[0][0].shape[0]
    nd = sum(not all(torch.equal(g[b], w[b]) for g, w in zip(got[0], want[0])) for b in range(B))
    if nd == 0 and device == "cpu" and not torch.equal(got[1], want[1]):     # the counters too (see _check_status)
        raise AssertionError(f"status differs: reference {want[1].tolist()}, backend {got[1].tolist()}")
    return B, nd


VERIFY_THREADS = (0, 0, 32, 96, 512, 1024)


def draw_verify(i: int, seed: int) -> tuple[dict, dict]:
    """Case ``i`` of ``--op verify_chain``: the laws' recipe (JSON-able) and the CUDA block width
    (``cuda.verify_chain.block_threads``) and simulator order."""
    r = random.Random(seed * 1_000_037 + i + 11)
    V = r.choice([1, 2, 7, 64, 1000, 4096, 4097, 9000])
    W = r.choice([0, 1, 3, 8, 16, 33, r.randint(1, 150)])
    c = dict(B=r.randint(1, 8), W=W, V=V, tdtype=r.choice(["fp32", "bf16", "fp16"]),
             ddtype=r.choice(["fp32", "fp32", "bf16", "fp16"]), scale=r.choice([0.5, 2.0, 6.0]),
             # draft laws: near the target (long accepted runs), independent, one-hot, or twice the
             # target (unnormalised: a rejection leaves no residual mass)
             draft=r.choice(["near", "near", "independent", "onehot", "double"]),
             ragged=r.random() < 0.5, slice=r.random() < 0.3, seed=r.randint(0, 10**6))
    x = r.random()
    if x < 0.06:
        c["nan"] = "gathered"
    elif x < 0.12:
        c["nan"] = "unread"
    elif x < 0.18:
        c["bad_id"] = True
    elif x < 0.22:
        c["zero_row"] = True
    how = dict(threads=r.choice(VERIFY_THREADS), order=r.choice(ORDERS), sim_seed=r.randint(0, 2**31 - 1))
    return c, how


def verify_inputs(c: dict, device: str = "cpu"):
    """(target, draft, ids, keyword arguments) of a ``draw_verify`` case, drawn on the CPU."""
    B, W, V = c["B"], c["W"], c["V"]
    g = torch.Generator().manual_seed(c["seed"])
    x = c["scale"] * torch.randn(B, W + 1, V, generator=g)
    target = torch.softmax(x, -1)
    if c["draft"] == "near":
        draft = torch.softmax(x[:, :W] + 0.3 * torch.randn(B, W, V, generator=g), -1)
    elif c["draft"] == "independent":
        draft = torch.softmax(c["scale"] * torch.randn(B, W, V, generator=g), -1)
    elif c["draft"] == "onehot":
        draft = torch.nn.functional.one_hot(torch.randint(0, V, (B, W), generator=g), V).float()
    else:
        draft = 2.0 * target[:, :W]
    law = draft if c["draft"] != "double" else target[:, :W]
    ids = (torch.multinomial(law.reshape(-1, V), 1, generator=g).view(B, W) if W
           else torch.zeros(B, 0, dtype=torch.int64))
    win = torch.randint(0, W + 1, (B,), generator=g) if c["ragged"] else torch.full((B,), W)
    kw = dict(seed=torch.randint(0, 2**62, (B,), generator=g), step=torch.randint(0, 9, (B,), generator=g),
              pos=torch.randint(0, 5000, (B,), generator=g), win_len=win)
    b = int(torch.randint(0, B, (1,), generator=g))
    if c.get("nan") == "gathered" and W:
        target[b, 0, ids[b, 0]] = float("nan")
    elif c.get("nan") == "unread" and W:
        kw["win_len"][b] = 0                             # only row 0 is read: a NaN in row W is not
        target[b, W, 0] = float("nan")
    if c.get("bad_id") and W:
        ids[b, W // 2] = V + 3
    if c.get("zero_row"):
        target[b].zero_()
    target, draft = target.to(DTYPES[c["tdtype"]]), draft.to(DTYPES[c["ddtype"]])
    if c["slice"]:                                       # row-strided views of wider rows
        wide = torch.zeros(B, W + 1, V + 5, dtype=target.dtype)
        wide[..., 2:2 + V] = target
        target = wide[..., 2:2 + V]
    mv = lambda t: t.to(device)  # noqa: E731
    return mv(target), mv(draft), mv(ids), {k: mv(v) for k, v in kw.items()}


def run_verify_case(c: dict, fn, device: str = "cpu") -> tuple[int, int]:
    """(requests, differing requests) of a verify_chain backend ``fn`` (the reference's positional
    arguments) against the reference on ``device``; raises when the status words differ."""
    from sjd_kernels.reference.verify_chain import verify_chain as ref_verify
    target, draft, ids, kw = verify_inputs(c, device)
    res = []
    for f in (ref_verify, fn):
        status = torch.zeros(4, dtype=torch.int32, device=device)
        na, tok = f(target, draft, ids, kw["win_len"], kw["pos"], kw["seed"], kw["step"], status)
        res.append((na, tok, status))
    (na_r, tok_r, st_r), (na_x, tok_x, st_x) = res
    if not torch.equal(st_r, st_x):
        raise AssertionError(f"status differs: reference {st_r.tolist()}, backend {st_x.tolist()}")
    B = c["B"]
    return B, int((~((na_r == na_x) & (tok_r == tok_x).all(1))).sum())


def run_cuda_verify_case(c: dict, how: dict, device: str = "cpu", fn=None) -> tuple[int, int]:
    """``run_verify_case`` on the CUDA kernel (or ``fn``) with the case's block width (and, in the
    simulator, its thread order)."""
    from sjd_kernels.cuda.verify_chain import block_threads, verify_chain_cuda
    with _cuda_context(how, device), block_threads(how["threads"]):
        return run_verify_case(c, fn or verify_chain_cuda, device)


def _check_device(args, error) -> None:
    """On the CPU the Triton kernels need the interpreter; on a GPU they must be compiled (not
    interpreted) and the device must be there. ``error``: the parser's (exit 2 naming the flag)."""
    on_cpu = args.device == "cpu"
    if not on_cpu and not torch.cuda.is_available():
        error(f"argument --device: {args.device!r}: no CUDA device is visible")
    if "triton" in args.backends.split(","):
        from sjd_kernels.triton.jacobi_step import is_interpreted
        if is_interpreted() != on_cpu:
            error("argument --backends: triton on --device cpu runs under the interpreter: set TRITON_INTERPRET=1"
                  if on_cpu else "argument --device: cuda runs the compiled Triton kernels: unset TRITON_INTERPRET "
                  "(or set it to 0)")


def _cuda_context(how: dict, device: str):
    """The CPU simulator with the case's thread order on the CPU; nothing on a GPU (the hardware
    picks the order)."""
    if device == "cpu":
        from sjd_kernels.cuda import sim
        return sim.simulate(order=how["order"], seed=how["sim_seed"])
    import contextlib
    return contextlib.nullcontext()


def run_cuda_case(c: dict, seed: int, how: dict, device: str = "cpu", fn=None) -> tuple[int, int]:
    """``run_case`` on the CUDA kernels (or ``fn``) with the case's optional paths and row placement
    (and, in the simulator, its thread order)."""
    import sjd_kernels.cuda.jacobi_step as cj
    old = cj.FORCE_GLOBAL_ROWS
    cj.FORCE_GLOBAL_ROWS = how["global_rows"]
    try:
        with _cuda_context(how, device), cj.kernel_features(*how["features"]):
            return run_case(c, seed, fn or cj.jacobi_step_cuda, device=device)
    finally:
        cj.FORCE_GLOBAL_ROWS = old


def run_cuda_tree_case(c: dict, how: dict, device: str = "cpu", fn=None) -> tuple[int, int]:
    """``run_tree_case`` on the CUDA kernel (or ``fn``) with the case's top-k path (and, in the
    simulator, its thread order)."""
    import sjd_kernels.cuda.jacobi_step as cj
    from sjd_kernels.cuda.tree_verify import tree_verify_cuda
    with _cuda_context(how, device), cj.kernel_features(*how["features"]):
        return run_tree_case(c, fn or tree_verify_cuda, device)


def _order(how: dict, device: str) -> str:
    return f",{how['order']}" if device == "cpu" else ""


def report(label: str, c: dict, run, per: int) -> bool:
    """Run one case on one backend and print its log line: label, ok/FAIL, rows (or requests),
    differing requests, seconds, the configuration. It passes when at most max(1, rows // per)
    requests differ and nothing raised."""
    t0 = time.time()
    try:
        rows, nd = run()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{label} FAIL {type(e).__name__}: {str(e)[:300]} {time.time() - t0:.1f} {json.dumps(c)}", flush=True)
        return False
    ok = nd <= max(1, rows // per)
    print(f"{label} {'ok' if ok else 'FAIL'} {rows} {nd} {time.time() - t0:.1f} {json.dumps(c)}", flush=True)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--start", type=int, default=0, help="index of the first case (to rerun one: --cases 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--op", choices=["jacobi_step", "tree_verify", "verify_chain"], default="jacobi_step")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no case after this many seconds (0: no limit); the last line counts the cases run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: Triton under the interpreter, CUDA in the simulator; cuda: the compiled kernels "
                         "on the GPU, the reference on the GPU too")
    args = ap.parse_args(argv)
    # every check before the first case: a mistake exits 2 naming its flag
    check_flags(ap.error, at_least(1, ("--cases", args.cases)) + at_least(0, ("--start", args.start)))
    if not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        ap.error(f"argument --budget-s: must be a finite number of seconds >= 0 (0: no limit), got {args.budget_s}")
    if args.op == "jacobi_step" and not -2 ** 63 <= 1000 * args.seed < 2 ** 63 - args.start - args.cases:
        ap.error(f"argument --seed: the jacobi_step case seeds (1000 * seed + case) must fit in int64, got {args.seed}")
    if not set(args.backends.split(",")) <= {"triton", "cuda"}:
        ap.error(f"argument --backends: {args.backends!r}: give a comma list of triton, cuda")
    _check_device(args, ap.error)
    from sjd_kernels.triton import interp
    interp.speed_up()               # a no-op unless the Triton kernels run under the interpreter
    if args.op == "tree_verify":
        return main_tree(args)
    if args.op == "verify_chain":
        return main_verify(args)
    backends = args.backends.split(",")
    dev = args.device
    if "triton" in backends:
        from sjd_kernels.triton.jacobi_step import jacobi_step_triton
    failed = 0
    start = time.time()
    ran = 0
    for i in range(args.start, args.start + args.cases):
        if args.budget_s and time.time() - start > args.budget_s:
            break
        ran += 1
        c, how = draw(i, args.seed)
        seed = 1000 * args.seed + i
        for name in backends:
            label = f"{i} {c['kind']} {name}"
            if name == "triton":
                run = lambda: run_case(c, seed, jacobi_step_triton, device=dev)     # noqa: E731
            else:
                label += f"[{'+'.join(how['features']) or 'default'}{_order(how, dev)}" \
                         f"{',global' if how['global_rows'] else ''}]"
                run = lambda: run_cuda_case(c, seed, how, dev)          # noqa: E731
            failed += not report(label, c, run, per=200)
    print(f"# {ran} cases, {failed} failed runs, {time.time() - start:.0f} s", flush=True)
    return 1 if failed else 0


def _case_loop(args, what: str, draw_fn, runner, per: int) -> int:
    """The loop of ``--op tree_verify`` and ``--op verify_chain``: ``runner(name, i, c, how)`` gives
    the label's backend part and the run of one backend; at most one request in ``per`` may differ."""
    failed = 0
    start = time.time()
    ran = 0
    counts = [0, 0]                     # requests compared, differing requests (runs that completed)

    def counted(run):
        def f():
            n, nd = run()
            counts[0] += n
            counts[1] += nd
            return n, nd
        return f
    for i in range(args.start, args.start + args.cases):
        if args.budget_s and time.time() - start > args.budget_s:
            break
        ran += 1
        c, how = draw_fn(i, args.seed)
        for name in args.backends.split(","):
            label, run = runner(name, c, how)
            failed += not report(f"{i} {label}", c, counted(run), per=per)
    print(f"# {ran} {what} cases, {failed} failed runs, {counts[0]} requests compared, {counts[1]} differing, "
          f"{time.time() - start:.0f} s", flush=True)
    return 1 if failed else 0


def main_tree(args) -> int:
    """``--op tree_verify``: the same comparison for tree_verify (requests: at most one in 50 may differ)."""
    dev = args.device
    if "triton" in args.backends.split(","):
        from sjd_kernels.triton.tree_verify import tree_verify_triton

    def runner(name, c, how):
        if name == "cuda":
            return (f"tree cuda[{'+'.join(how['features']) or 'default'}{_order(how, dev)}]",
                    lambda: run_cuda_tree_case(c, how, dev))
        return "tree triton", lambda: run_tree_case(c, tree_verify_triton, dev)
    return _case_loop(args, "tree_verify", draw_tree, runner, 50)


def main_verify(args) -> int:
    """``--op verify_chain``: drawn laws (near, independent, one-hot or unnormalised drafts, ragged
    windows, dtypes, row-strided views, NaN entries read and unread, bad ids, empty target rows) on
    the Triton and CUDA kernels (block widths 32 to 1024); outputs per request (at most one in 50
    may differ) and the status words exactly."""
    dev = args.device
    if "triton" in args.backends.split(","):
        from sjd_kernels.triton.verify_chain import verify_chain_triton

    def runner(name, c, how):
        if name == "cuda":
            return (f"verify_chain cuda[{how['threads'] or 'auto'} threads{_order(how, dev)}]",
                    lambda: run_cuda_verify_case(c, how, dev))
        return "verify_chain triton", lambda: run_verify_case(c, verify_chain_triton, dev)
    return _case_loop(args, "verify_chain", draw_verify, runner, 50)


if __name__ == "__main__":
    sys.exit(main())
