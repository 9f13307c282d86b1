"""Registered benchmark cases: for each op, its shape grids, input builders, checks and byte counts.

An op's benchmark is an :class:`OpBench`; it knows how to build random inputs for a case
(never zeros), restore the mutated state before every timed repetition (so each rep solves
the same problem), check a backend against the reference on fresh inputs, and count the
fewest bytes the op must move (each input read once, each output written once, state reads
and writes counted). Grids:

- ``full``: SPEC section 8 shapes (GPU);
- ``quick``: a few of them (GPU);
- ``cpu``: small shapes for correctness checks on a machine without a GPU (the Triton
  backend then runs under the interpreter when ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

GRIDS = ("full", "quick", "cpu", "cpu-quick")


def seed_problem(seed: int) -> str | None:
    """Why ``seed`` cannot seed the cases (None: it can): their requests get the int64 seeds
    ``seed * 1009 + request`` (at most 65536 requests)."""
    if abs(seed) * 1009 + 2 ** 16 < 2 ** 63:
        return None
    return f"must be an int with |seed| * 1009 + 65536 < 2**63 (the cases' int64 request seeds), got {seed}"


@dataclass
class Case:
    op: str
    params: dict
    grids: tuple = ("full",)

    @property
    def name(self) -> str:
        lab = self.params.get("label")
        if lab:
            return f"{self.op}:{lab}"
        return self.op + ":" + "_".join(f"{k}{_fmt(v)}" for k, v in self.params.items())


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return str(v)


@dataclass
class Prepared:
    """Inputs of one case on one device: ``call(backend)`` gives the timed closure, ``reset()`` restores state."""
    call: Callable[[str], Callable[[], object]]
    reset: Callable[[], None]
    extra: dict = field(default_factory=dict)


class OpBench:
    name = ""
    backends: tuple = ()
    reference_backend = "torch"
    doc = ""

    def cases(self) -> list:
        raise NotImplementedError

    def prepare(self, case: Case, device, seed: int) -> Prepared:
        raise NotImplementedError

    # whether check() can run the reference on another device (``ref_device``) than the backend
    ref_device_ok = False

    def check(self, case: Case, backend: str, device, seed: int, min_requests: int = 64, ref_device=None) -> dict:
        """Backend vs the reference on fresh inputs. ``ref_device`` (where ``ref_device_ok``): run the
        reference on that device instead (inputs copied there, the backend's outputs compared there),
        e.g. the CPU while compute-sanitizer watches the GPU kernels."""
        raise NotImplementedError

    def bytes_min(self, case: Case) -> int:
        raise NotImplementedError

    def state_bytes_per_request(self, case: Case) -> int:
        return 0

    def available(self, backend: str, device) -> tuple:
        """(usable, why) for this backend on ``device``."""
        return _library_backend_available(backend, device)


def _library_backend_available(backend: str, device) -> tuple:
    if backend in VARIANTS:
        ok, why = _library_backend_available(VARIANTS[backend], device)
        what = (f"kernel features {'+'.join(CUDA_VARIANTS[backend])}" if backend in CUDA_VARIANTS
                else f"rows kernel with {_triton_variant_text(TRITON_VARIANTS[backend])}")
        return ok, f"{why}; {what}" if ok else why
    from ..ops._common import backends as lib_backends, resolve_backend
    info = lib_backends().get(backend)
    if info is None:
        return False, f"{backend}: unknown backend"
    if not info["available"]:
        return False, info["why"]
    try:
        resolve_backend(backend, torch.device(device))
    except Exception as e:
        return False, f"{backend}: {e}"
    return True, info["why"]


def _moved(x, device):
    """``x`` with every tensor moved to ``device`` (tensors inside dicts, lists, tuples and dataclasses
    such as JacobiState, TreeLayout and the op outputs; other values as they are)."""
    import copy
    import dataclasses
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _moved(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_moved(v, device) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        y = copy.copy(x)
        for f in dataclasses.fields(x):
            object.__setattr__(y, f.name, _moved(getattr(x, f.name), device))
        return y
    return x


def _on(ref_device) -> str:
    return "" if ref_device is None else f" on {torch.device(ref_device).type}"


def _refuse_ref_device(bench, ref_device) -> None:
    if ref_device is not None:
        raise ValueError(f"{bench.name}: its check runs the reference beside the backend only (ref_device)")


# Bench-only backends: the CUDA kernel with optional code paths (sjd_kernels.cuda.jacobi_step.FEATURES),
# timed beside the default one to measure each path's share (leave one in at a time), and the
# Triton rows kernel with another warp count for rows of more than 4096 lanes
# (triton.jacobi_step.rows_warps) or with its top-k search and softmax over the whole row instead of
# through a candidate list, and with the sparse state its races, old-law lookups and compaction over
# the row too (triton.jacobi_step.cand_list).
CUDA_VARIANTS = {"cuda_bracket": ("bracket_topk",), "cuda_lists": ("bracket_topk", "list_races"),
                 "cuda_hist": ("hist_topk", "list_races")}
TRITON_VARIANTS = {"triton_w32": {"warps": 32}, "triton_rowsearch": {"cand_list": False}}
VARIANTS = {**{k: "cuda" for k in CUDA_VARIANTS}, **{k: "triton" for k in TRITON_VARIANTS}}


def _triton_variant_text(opts: dict) -> str:
    return ", ".join(f"{opts['warps']} warps" if k == "warps" else
                     f"the candidate list {'on' if opts[k] else 'off'}" for k in opts)


@contextlib.contextmanager
def _triton_variant(opts: dict):
    from ..triton import jacobi_step as tj
    with contextlib.ExitStack() as stack:
        if "warps" in opts:
            stack.enter_context(tj.rows_warps(opts["warps"]))
        if "cand_list" in opts:
            stack.enter_context(tj.cand_list(opts["cand_list"]))
        yield


def _variant(backend: str):
    """(library backend to call, context to call it in): a bench-only variant runs its library
    backend inside ``kernel_features`` (CUDA) or ``rows_warps`` / ``cand_list`` (Triton); every
    other backend passes through."""
    if backend in CUDA_VARIANTS:
        from ..cuda.jacobi_step import kernel_features
        return "cuda", kernel_features(*CUDA_VARIANTS[backend])
    if backend in TRITON_VARIANTS:
        return "triton", _triton_variant(TRITON_VARIANTS[backend])
    return backend, contextlib.nullcontext()


def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


# =========================================================================== jacobi_step
# top-k and CFG scale of the model family each vocabulary stands for (SPEC section 8)
FAMILY = {8192: (2000, 3.0), 16384: (1000, 4.0), 32768: (2048, 3.0)}


def _jacobi_params(B, W, V, *, cfg=True, dtype=torch.bfloat16, mode="sjd", beta=0.0, ragged=False, top_k=None,
                   capacity=None):
    """``capacity``: sparse state with that many entries per slot (None: dense state)."""
    tk, s = FAMILY.get(V, (max(1, V // 4), 3.0))
    tk = tk if top_k is None else top_k
    label = f"B{B}_W{W}_V{V}_{'cfg' if cfg else 'nocfg'}_{_DT[dtype]}_{mode}_k{tk}"
    if beta:
        label += f"_beta{beta:g}"
    if ragged:
        label += "_ragged"
    if capacity is not None:
        label += f"_sparse{capacity}"
    return {"B": B, "W": W, "V": V, "cfg": cfg, "dtype": dtype, "mode": mode, "beta": beta, "ragged": ragged,
            "top_k": tk, "cfg_scale": s, "label": label, "capacity": capacity}


_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class JacobiStepBench(OpBench):
    name = "jacobi_step"
    ref_device_ok = True
    backends = ("torch", "triton", "triton_w32", "triton_rowsearch", "cuda", "cuda_bracket", "cuda_lists", "cuda_hist",
                "reference_sjd")
    doc = ("one Jacobi step after the LM head: CFG, top-k, softmax, verification, residual/bonus, next drafts, "
           "state update")

    def cases(self) -> list:
        # the target shapes of the issue first (a time-boxed run reaches them), each with its sparse twin
        out = [Case(self.name, _jacobi_params(1, 32, 16384), ("full", "quick")),
               Case(self.name, _jacobi_params(1, 32, 16384, capacity=1064), ("full", "quick")),
               Case(self.name, _jacobi_params(32, 32, 16384), ("full", "quick")),
               Case(self.name, _jacobi_params(32, 32, 16384, capacity=1064), ("full", "quick")),
               Case(self.name, _jacobi_params(32, 32, 16384, mode="coupling"), ("full", "quick")),
               Case(self.name, _jacobi_params(32, 32, 16384, mode="coupling", capacity=1064), ("full", "quick")),
               # the same step without top-k: its difference to the k1000 row is the top-k search's share
               Case(self.name, _jacobi_params(32, 32, 16384, top_k=0), ("full", "quick"))]
        for B in (1, 32):
            for W in (16, 32, 64):
                for V in (8192, 16384, 32768):
                    if W == 32 and V == 16384:
                        continue                                   # listed above
                    grids = ("full", "quick") if (W == 16 and V == 16384) or (B == 32 and W == 32 and V == 32768) \
                        else ("full",)
                    out.append(Case(self.name, _jacobi_params(B, W, V), grids))
        out.append(Case(self.name, _jacobi_params(32, 32, 16384, mode="sjd", beta=0.5), ("full",)))
        out.append(Case(self.name, _jacobi_params(32, 32, 16384, mode="gumbel"), ("full",)))
        out.append(Case(self.name, _jacobi_params(32, 32, 16384, mode="gumbel_jacobi"), ("full",)))
        out.append(Case(self.name, _jacobi_params(32, 32, 16384, ragged=True), ("full",)))
        out.append(Case(self.name, _jacobi_params(32, 32, 16384, cfg=False, dtype=torch.float16), ("full",)))
        out.append(Case(self.name, _jacobi_params(64, 128, 32768), ("full",)))
        # sparse state (capacity top-k + 64): the same shapes with C entries per slot instead of V floats
        out.append(Case(self.name, _jacobi_params(32, 32, 16384, mode="sjd", beta=0.5, capacity=1064), ("full",)))
        out.append(Case(self.name, _jacobi_params(32, 32, 32768, capacity=2112), ("full",)))
        out.append(Case(self.name, _jacobi_params(64, 128, 32768, capacity=2112), ("full",)))
        # small shapes for CPU checks (V=257: not a multiple of any block size; V=100 with top-k off)
        out.append(Case(self.name, _jacobi_params(3, 4, 64, top_k=16), ("cpu", "cpu-quick")))
        out.append(Case(self.name, _jacobi_params(2, 8, 257, cfg=False, dtype=torch.float32, mode="coupling",
                                                  ragged=True, top_k=40), ("cpu", "cpu-quick")))
        out.append(Case(self.name, _jacobi_params(3, 4, 64, mode="sjd", beta=0.5, top_k=0), ("cpu",)))
        out.append(Case(self.name, _jacobi_params(2, 4, 100, mode="gumbel_jacobi", top_k=0), ("cpu",)))
        out.append(Case(self.name, _jacobi_params(3, 4, 64, mode="coupling", beta=0.5, top_k=16, capacity=24),
                        ("cpu", "cpu-quick")))
        # sparse without VP: the state keeps no previous rows (p_prev is empty)
        out.append(Case(self.name, _jacobi_params(2, 4, 64, top_k=16, capacity=20), ("cpu", "cpu-quick")))
        # sparse with the Triton candidate list on (V 257, top-k 20: its race list of 64 becomes the entries)
        out.append(Case(self.name, _jacobi_params(2, 8, 257, mode="coupling", beta=0.5, top_k=20, capacity=40),
                        ("cpu",)))
        return out

    # ---- inputs
    def _inputs(self, p: dict, device, seed: int) -> dict:
        from ..ops.jacobi_step import JacobiState
        from ..reference import jacobi_step as ref
        from ..reference.target import combine_logits, target_probs
        B, W, V = p["B"], p["W"], p["V"]
        g = _gen(device, seed)
        dev = torch.device(device)
        logits = (3.0 * torch.randn(B, W + 1, V, generator=g, device=dev)).to(p["dtype"])
        uncond = cfg = None
        if p["cfg"]:
            uncond = (logits.float() + 1.0 * torch.randn(B, W + 1, V, generator=g, device=dev)).to(p["dtype"])
            cfg = torch.full((B,), float(p["cfg_scale"]), device=dev)
        vp = p["beta"] != 0.0
        cap = p.get("capacity")
        seeds = [int(seed) * 1009 + i for i in range(B)]
        st = JacobiState.create(B, W, V, seed=seeds, device=dev, vp=vp, capacity=cap)
        pos = torch.randint(0, 1000, (B,), generator=g, device=dev)
        win = torch.full((B,), W, dtype=torch.int64, device=dev)
        if p["ragged"]:
            win = torch.randint(0, W + 1, (B,), generator=g, device=dev)
        # steady state: the drafts come from the laws of a previous iteration (perturbed targets)
        x = combine_logits(logits, uncond, cfg)
        prevx = x[:, :W] + 1.0 * torch.randn(B, W, V, generator=g, device=dev)
        Q = target_probs(prevx, 1.0, p["top_k"], 1.0)
        if p["mode"] in ("gumbel", "gumbel_jacobi"):
            Q = target_probs(x[:, :W], 1.0, p["top_k"], 1.0)
        drafts = torch.multinomial(Q.reshape(B * W, V), 1, generator=g).view(B, W)
        R = st.q_state.shape[1]
        slots = (pos.view(B, 1) + torch.arange(W, device=dev)) % R
        bi = torch.arange(B, device=dev).view(B, 1).expand(B, W)
        kind = ref.KIND_DENSE | (ref.FLAG_PREV if vp else 0)
        st.q_kind[bi, slots] = kind
        if cap is None:
            st.q_state[bi, slots] = Q
            if vp:
                st.p_prev[bi, slots] = target_probs(prevx + 0.5 * torch.randn(B, W, V, generator=g, device=dev),
                                                    1.0, p["top_k"], 1.0)
        else:
            # a sparse slot stores the support of the row it came from: Q and the previous row share it
            pp = target_probs(prevx + 0.5 * torch.randn(B, W, V, generator=g, device=dev), 1.0, p["top_k"], 1.0)
            pp = torch.where(Q > 0, pp, torch.zeros_like(pp))
            idx, (qv, pv) = ref.sparsify(Q > 0, [Q, pp], cap)
            st.q_idx[bi, slots] = idx
            st.q_state[bi, slots] = qv
            if vp:
                st.p_prev[bi, slots] = pv
        return {"logits": logits, "uncond": uncond, "cfg": cfg, "drafts": drafts, "win": win, "pos": pos, "state": st,
                "Q": Q}

    def _call(self, p: dict, inp: dict, state, backend: str):
        from ..ops.jacobi_step import jacobi_step
        be, ctx = _variant(backend)
        with ctx:
            return jacobi_step(inp["logits"], inp["drafts"], inp["win"], inp["pos"], state,
                               uncond_logits=inp["uncond"], cfg_scale=inp["cfg"], top_k=int(p["top_k"]),
                               mode=p["mode"], beta=float(p["beta"]), backend=be, advance=False)

    def prepare(self, case: Case, device, seed: int) -> Prepared:
        p = case.params
        inp = self._inputs(p, device, seed)
        st = inp["state"]
        pristine = [t.clone() for t in (st.q_state, st.q_kind, st.p_prev, st.status, st.step, st.q_idx)]

        def reset():
            for dst, src in zip((st.q_state, st.q_kind, st.p_prev, st.status, st.step, st.q_idx), pristine):
                dst.copy_(src)

        extra = {}

        def call(backend: str):
            if backend == "reference_sjd":
                from .reference_sjd import ReferenceSJD
                r = ReferenceSJD(p["B"], p["W"], p["V"], top_k=int(p["top_k"]), device=device,
                                 generator=_gen(device, seed + 1))
                d0, q0 = inp["drafts"].clone(), inp["Q"].clone()
                extra["reset_ref"] = lambda: r.set_window(d0, q0)
                extra["reset_ref"]()
                return lambda: r.step(inp["logits"], inp["uncond"], inp["cfg"])
            return lambda: self._call(p, inp, st, backend)

        def reset_all():
            reset()
            if "reset_ref" in extra:
                extra["reset_ref"]()

        return Prepared(call=call, reset=reset_all, extra=extra)

    # ---- checks
    def available(self, backend: str, device) -> tuple:
        if backend == "reference_sjd":
            return True, "reference_sjd: the public SJD loop in PyTorch (sjd_kernels/bench/reference_sjd.py)"
        return _library_backend_available(backend, device)

    def check(self, case: Case, backend: str, device, seed: int, min_requests: int = 64, ref_device=None) -> dict:
        """Backend vs the PyTorch reference on fresh random inputs (same seeds => same tokens).

        Pass: at most ``max(1, 2%)`` of requests differ in any output token (float rounding may
        move a sample across a boundary), at most 1% of written state rows differ beyond
        ``1e-6 + 1e-4 |ref|``, no device error, outputs in range. ``reference_sjd`` draws its
        own randomness, so its target rows are compared with the library's target law instead.
        """
        from ..reference import jacobi_step as ref_js
        from ..reference.target import combine_logits, target_probs
        p = case.params
        B, W, V = p["B"], p["W"], p["V"]
        trials = max(1, math.ceil(min_requests / B))
        n_req = n_bad_req = n_rows = n_bad_rows = 0
        max_err = 0.0
        problems = []
        for t in range(trials):
            s = seed + 7919 * t
            inp = self._inputs(p, device, s)
            if backend == "reference_sjd":
                from .reference_sjd import ReferenceSJD, warp_probs
                P_ref = target_probs(combine_logits(inp["logits"], inp["uncond"], inp["cfg"]), 1.0, p["top_k"], 1.0)
                P_pub = warp_probs(inp["logits"], inp["uncond"], inp["cfg"], 1.0, p["top_k"])
                err = (P_ref - P_pub).abs()
                tol = 1e-6 + 1e-4 * P_ref.abs()
                bad_rows = (err > tol).any(-1)
                n_rows += bad_rows.numel()
                n_bad_rows += int(bad_rows.sum())
                max_err = max(max_err, float(err.max()))
                r = ReferenceSJD(B, W, V, top_k=int(p["top_k"]), device=device, generator=_gen(device, s))
                r.set_window(inp["drafts"], inp["Q"])
                m, committed, nd = r.step(inp["logits"], inp["uncond"], inp["cfg"])
                n_req += B
                ok = (m >= 0).all() and (m <= W).all() and ((nd >= 0) & (nd < V)).all() and \
                    all(((c >= 0) & (c < V)).all() and c.numel() == int(mm) + 1 for c, mm in zip(committed, m))
                if not bool(ok):
                    problems.append("reference_sjd output out of range")
                    n_bad_req += B
                continue
            st_be = inp["state"].clone()
            inp_be = inp
            if ref_device is not None:       # the reference runs there; the backend's results are compared there
                inp = _moved(inp, ref_device)
            st_ref = inp["state"]
            sparse = st_ref.sparse

            def laws(st, vals):                # stored rows as dense [B, R, V] (sparse: densified)
                return ref_js.densify(st.q_idx, vals, V) if sparse else vals
            q_before = laws(st_ref, st_ref.q_state).clone()
            pp_before = laws(st_ref, st_ref.p_prev).clone() if st_ref.p_prev.numel() else None   # VP only
            out_ref = self._call(p, inp, st_ref, "torch")
            out_be = self._call(p, inp_be, st_be, backend)
            if ref_device is not None:
                out_be, st_be = _moved(out_be, ref_device), _moved(st_be, ref_device)
            same = (out_ref.num_accepted == out_be.num_accepted) & (out_ref.tokens == out_be.tokens).all(1) & \
                   (out_ref.next_drafts == out_be.next_drafts).all(1)
            n_req += B
            n_bad_req += int((~same).sum())
            # rows 1..win_len are written (their new law does not depend on the outcome); the pre-state is a
            # different random law, so an unwritten row shows; every other slot must be left untouched
            R = st_ref.q_state.shape[1]
            j = torch.arange(W + 1, device=inp["pos"].device)
            slots = (inp["pos"].view(B, 1) + j) % R
            rows = (j.view(1, -1) >= 1) & (j.view(1, -1) <= inp["win"].view(B, 1))
            written = torch.zeros(B, R, dtype=torch.bool, device=slots.device)
            written.scatter_(1, slots, rows)
            pairs = [(laws(st_ref, st_ref.q_state), laws(st_be, st_be.q_state), q_before)]
            if st_ref.p_prev.numel():
                pairs.append((laws(st_ref, st_ref.p_prev), laws(st_be, st_be.p_prev), pp_before))
            for a, b_, before in pairs:
                err = (a - b_).abs()
                bad = ~(err <= 1e-6 + 1e-4 * a.abs()).all(-1) & written
                n_rows += int(written.sum())
                n_bad_rows += int(bad.sum())
                max_err = max(max_err, float(torch.where(written.unsqueeze(-1), err, torch.zeros_like(err)).max()))
                stray = int((~written & (b_ != before).any(-1)).sum())
                if stray:
                    problems.append(f"{stray} state rows written that the step must leave alone")
            kind_bad = int(((st_ref.q_kind != st_be.q_kind).any(1) & same).sum())
            if kind_bad:
                problems.append(f"q_kind differs in {kind_bad} agreeing requests")
            if int(st_be.status[0]) or int(st_ref.status[0]):
                problems.append(f"device status error bits ref={int(st_ref.status[0])} {backend}={int(st_be.status[0])}")
            tok = out_be.tokens
            m = out_be.num_accepted
            if not bool(((m >= 0) & (m <= inp["win"])).all()):
                problems.append("num_accepted out of [0, win_len]")
            valid = torch.arange(W + 1, device=tok.device).view(1, -1) <= m.view(-1, 1)
            if not bool((((tok >= 0) & (tok < V)) | ~valid).all()) or not bool((tok[~valid] == -1).all()):
                problems.append("committed tokens out of range or not -1-padded")
        allowed_req = max(1, int(0.02 * n_req))
        allowed_rows = max(1, int(0.01 * n_rows)) if n_rows else 0
        ok = n_bad_req <= allowed_req and n_bad_rows <= allowed_rows and not problems
        if backend == "torch":
            detail = f"reference itself; {n_req} requests well-formed"
        elif backend == "reference_sjd":
            detail = (f"target rows vs library law: {n_bad_rows}/{n_rows} rows off (max abs err {max_err:.2e}); "
                      f"{n_req} requests well-formed")
        else:
            detail = (f"vs torch{_on(ref_device)}: {n_bad_req}/{n_req} requests differ (allowed {allowed_req}); "
                      f"state rows {n_bad_rows}/{n_rows} off (allowed {allowed_rows}, max abs err {max_err:.2e})")
        if problems:
            detail += "; " + "; ".join(sorted(set(problems)))
        return {"check": "pass" if ok else "FAIL", "check_detail": detail, "mismatch_rate": n_bad_req / max(1, n_req)}

    # ---- bytes
    def bytes_min(self, case: Case) -> int:
        """Fewest bytes one step must move (see docs in the module): logits read once, state rows counted.

        - logits (and uncond with CFG): ``B (W+1) V e`` each, read once;
        - draft laws: ``B V 4`` (one full row: the residual at the first rejection; the other drafts
          need one number each) for sjd/gumbel; ``B W V 4`` for coupling (every kept-or-redrawn
          draft needs its old row); nothing in full for gumbel_jacobi;
        - VP: previous target rows ``B (W-1) V 4`` read, ``B W V 4`` written;
        - state writes: ``B W V 4`` (rows 1..W get their new law);
        - small tensors (drafts, ids, counters, kinds, outputs) at their sizes.
        With ragged windows, ``W`` is replaced by the mean window length. With a sparse state of C
        entries, a law row is ``C`` ids and values (``8 C`` bytes) and a previous row ``4 C``.
        """
        p = case.params
        B, W, V = p["B"], p["W"], p["V"]
        Wm = W / 2.0 if p["ragged"] else W
        e = torch.empty((), dtype=p["dtype"]).element_size()
        n_logit = 2 if p["cfg"] else 1
        cap = p.get("capacity")
        law_row = V * 4 if cap is None else cap * 8
        prev_row = V * 4 if cap is None else cap * 4
        b = n_logit * B * (Wm + 1) * V * e
        mode = p["mode"]
        if mode == "coupling":
            b += B * Wm * law_row
        elif mode != "gumbel_jacobi":
            b += B * law_row
        if p["beta"] != 0.0:
            b += B * max(Wm - 1, 0) * prev_row + B * Wm * prev_row
        b += B * Wm * law_row                                          # q_state (and q_idx) writes
        b += B * (W * 8 + 4 * 8 + (4 if p["cfg"] else 0))              # drafts, win_len, pos, seed, step, cfg
        b += B * (W + 1) * 4 * 2                                       # q_kind read + write
        b += B * (8 + (W + 1) * 8 + W * 8)                             # outputs
        return int(b)

    def state_bytes_per_request(self, case: Case) -> int:
        p = case.params
        W, V = p["W"], p["V"]
        R = W + 1
        cap = p.get("capacity")
        if cap is not None:
            return R * cap * (8 + (4 if p["beta"] != 0.0 else 0)) + R * 4 + 2 * 8
        return R * V * 4 * (2 if p["beta"] != 0.0 else 1) + R * 4 + 2 * 8


# =========================================================================== sjd2_prepare
class SJD2PrepareBench(OpBench):
    name = "sjd2_prepare"
    backends = ("torch", "triton", "cuda")
    doc = "SJD2 model inputs with the window's DDIM update fused in"

    def cases(self) -> list:
        out = []
        for B in (1, 32):
            for W in (32, 64):
                for d, Vt in ((1280, 16384), (4096, 65536)):
                    grids = ("full", "quick") if (W == 64 and d == 4096) else ("full",)
                    out.append(Case(self.name, {"B": B, "W": W, "d": d, "Vt": Vt, "K": 20, "dtype": torch.bfloat16},
                                    grids))
        out.append(Case(self.name, {"B": 2, "W": 8, "d": 48, "Vt": 100, "K": 4, "dtype": torch.float32},
                        ("cpu", "cpu-quick")))
        return out

    def available(self, backend: str, device) -> tuple:
        return _library_backend_available(backend, device)

    def _inputs(self, p: dict, device, seed: int) -> dict:
        from ..sjd2.noise import NoiseSchedule
        B, W, d, Vt, K = p["B"], p["W"], p["d"], p["Vt"], p["K"]
        dev = torch.device(device)
        g = _gen(device, seed)
        N = W + 1
        R = W + 1
        E = (0.02 * torch.randn(Vt, d, generator=g, device=dev)).to(p["dtype"])
        mean = 0.001 * torch.randn(d, generator=g, device=dev)
        std = 0.02 + 0.001 * torch.rand(d, generator=g, device=dev)
        lt = 0.01 * torch.randn(K + 1, d, generator=g, device=dev)
        lt[0] = 0
        a, s = NoiseSchedule(levels=K).coefficients(dev)
        pos = torch.randint(0, 500, (B,), generator=g, device=dev)
        positions = pos.view(B, 1) - 1 + torch.arange(N, device=dev)   # slot 0 = X[n-1], committed
        tokens = torch.randint(0, Vt, (B, N), generator=g, device=dev)
        seeds = torch.arange(B, device=dev, dtype=torch.int64) + 1009 * seed
        commit_end = pos.clone()
        fresh_start = pos + W - W // 4          # the last quarter enters now (pure noise)
        row_end = pos + W - W // 4
        latent = torch.randn(B, R, d, generator=g, device=dev)
        level = torch.randint(1, K + 1, (B, R), generator=g, device=dev).to(torch.int32)
        return dict(embed_weight=E, mean=mean, std=std, level_table=lt, alpha=a, sigma=s, tokens=tokens,
                    positions=positions, seed=seeds, commit_end=commit_end, fresh_start=fresh_start,
                    row_end=row_end, latent=latent, level=level,
                    status=torch.zeros(4, dtype=torch.int32, device=dev))

    def _call(self, inp: dict, backend: str, latent=None, level=None):
        from ..ops.sjd2_prepare import sjd2_prepare
        args = dict(inp)
        if latent is not None:
            args["latent"], args["level"] = latent, level
        return sjd2_prepare(**args, backend=backend)    # args hold a status: no host checks on a GPU

    def prepare(self, case: Case, device, seed: int) -> Prepared:
        inp = self._inputs(case.params, device, seed)
        lat0, lev0 = inp["latent"].clone(), inp["level"].clone()

        def reset():
            inp["latent"].copy_(lat0)
            inp["level"].copy_(lev0)

        return Prepared(call=lambda be: (lambda: self._call(inp, be)), reset=reset)

    def check(self, case: Case, backend: str, device, seed: int, min_requests: int = 64, ref_device=None) -> dict:
        _refuse_ref_device(self, ref_device)
        p = case.params
        trials = max(1, math.ceil(min_requests / p["B"]))
        worst = 0.0
        problems = []
        for t in range(trials):
            inp = self._inputs(p, device, seed + 7919 * t)
            lat, lev = inp["latent"].clone(), inp["level"].clone()
            out_ref = self._call(inp, "torch")
            out_be = self._call(inp, backend, lat, lev)
            if not torch.isfinite(out_be.float()).all():
                problems.append("non-finite output")
            ref64 = out_ref.double()
            rel = float((out_be.double() - ref64).norm() / ref64.norm().clamp_min(1e-30))
            lrel = float((lat.double() - inp["latent"].double()).norm() / inp["latent"].double().norm())
            worst = max(worst, rel, lrel)
            if not torch.equal(lev, inp["level"]):
                problems.append("levels differ")
            if int(inp["status"][0]):
                problems.append(f"status error bits {int(inp['status'][0])}")
        tol = 1e-2 if p["dtype"] != torch.float32 else 1e-5
        ok = worst <= tol and not problems
        detail = ("reference itself" if backend == "torch" else
                  f"vs torch: worst relative error {worst:.2e} (tol {tol:.0e}) over {trials} trials")
        if problems:
            detail += "; " + "; ".join(sorted(set(problems)))
        return {"check": "pass" if ok else "FAIL", "check_detail": detail, "mismatch_rate": 0.0 if ok else 1.0}

    def bytes_min(self, case: Case) -> int:
        """Embedding rows gathered ``B N d e``; window latents read (not the fresh ones) and written
        ``B W d 4`` each; levels; output ``B N d e``; the small tables once."""
        p = case.params
        B, W, d, K = p["B"], p["W"], p["d"], p["K"]
        e = torch.empty((), dtype=p["dtype"]).element_size()
        N = W + 1
        fresh = W // 4
        b = B * N * d * e * 2                       # embedding gather + output
        b += B * (W - fresh) * d * 4 + B * W * d * 4  # latent read (non-fresh) + write
        b += B * W * 4 * 2 + B * N * 8 * 2           # levels r/w, tokens + positions
        b += (K + 1) * d * 4 + 2 * d * 4 + 2 * (K + 1) * 4 + B * 8 * 4
        return int(b)

    def state_bytes_per_request(self, case: Case) -> int:
        p = case.params
        return (p["W"] + 1) * (p["d"] * 4 + 4)


# =========================================================================== verification only (FlashInfer peer)
class VerifyOnlyBench(OpBench):
    """The verification-only subset (target and draft laws given as probabilities): FlashInfer's
    chain speculative sampling, a vectorised PyTorch verification written here, and this library's
    fused step on the same laws (backends torch, triton, cuda): the target logits are
    log(target) at temperature 1 without filters, so the step's target law is the given one up to
    rounding, and the stored law of each window row is the draft row. The fused step does more
    than verify (it also draws the next drafts and writes the state of every row), so its rows are
    an upper bound on what verification alone costs it. The ``chain_*`` backends run
    ``verify_chain``, which takes FlashInfer's inputs and reads only what the result depends on:
    they are the library's peer of FlashInfer here (``chain_cuda_t512``: its CUDA kernel with 512
    threads per block)."""
    name = "verify_only"
    backends = ("torch_verify", "flashinfer", "torch", "triton", "cuda", "chain_torch", "chain_triton", "chain_cuda",
                "chain_cuda_t512")
    reference_backend = "torch_verify"
    doc = ("verification only (probabilities in): FlashInfer chain_speculative_sampling peer, this library's "
           "verify_chain (chain_*) and the fused step")
    _LIB = ("torch", "triton", "cuda")
    _CHAIN = ("chain_torch", "chain_triton", "chain_cuda", "chain_cuda_t512")   # chain_<backend>[_t<threads>]

    def cases(self) -> list:
        out = []
        for B in (1, 32):
            for W in (16, 64):
                for V in (16384, 32768):
                    out.append(Case(self.name, {"B": B, "W": W, "V": V}, ("full", "quick") if W == 16 else ("full",)))
        out.append(Case(self.name, {"B": 3, "W": 4, "V": 64}, ("cpu", "cpu-quick")))
        return out

    def available(self, backend: str, device) -> tuple:
        if backend == "torch_verify":
            return True, "torch_verify: vectorised PyTorch verification (sjd_kernels/bench/cases.py)"
        if backend in self._LIB:
            return _library_backend_available(backend, device)
        if backend in self._CHAIN:
            return _library_backend_available(backend.split("_")[1], device)
        try:
            import flashinfer  # noqa: F401
            from flashinfer.sampling import chain_speculative_sampling  # noqa: F401
        except Exception as e:
            return False, f"flashinfer: not importable ({type(e).__name__}: {e})"
        if torch.device(device).type != "cuda":
            return False, "flashinfer: needs CUDA tensors"
        return True, f"flashinfer {getattr(flashinfer, '__version__', '?')}"

    def _inputs(self, p: dict, device, seed: int) -> dict:
        B, W, V = p["B"], p["W"], p["V"]
        dev = torch.device(device)
        g = _gen(device, seed)
        x = 3.0 * torch.randn(B, W + 1, V, generator=g, device=dev)
        target = torch.softmax(x, -1)
        draft = torch.softmax(x[:, :W] + torch.randn(B, W, V, generator=g, device=dev), -1)
        ids = torch.multinomial(draft.reshape(B * W, V), 1, generator=g).view(B, W).to(torch.int32)
        return {"target": target, "draft": draft, "ids": ids, "gen": _gen(device, seed + 3)}

    @staticmethod
    def _library_inputs(inp: dict, seed: int) -> dict:
        """The fused step's inputs for the same laws: logits log(target), the drafts' laws stored as dense rows."""
        from ..ops.jacobi_step import JacobiState
        from ..reference import jacobi_step as ref
        draft, target = inp["draft"], inp["target"]
        B, W, V = draft.shape
        dev = draft.device
        st = JacobiState.create(B, W, V, seed=[int(seed) * 1009 + i for i in range(B)], device=dev)
        st.q_state[:, :W] = draft                           # pos 0: window row j lives in ring slot j
        st.q_kind[:, :W] = ref.KIND_DENSE
        return {"logits": torch.log(target), "drafts": inp["ids"].long(), "state": st,
                "win": torch.full((B,), W, dtype=torch.int64, device=dev),
                "pos": torch.zeros(B, dtype=torch.int64, device=dev)}

    @staticmethod
    def _library_call(lib: dict, backend: str):
        from ..ops.jacobi_step import jacobi_step
        return jacobi_step(lib["logits"], lib["drafts"], lib["win"], lib["pos"], lib["state"], top_k=0,
                           mode="sjd", backend=backend, advance=False)

    @staticmethod
    def torch_verify(draft, ids, target, gen):
        """Vectorised SJD verification: accept while ``u Q(D) < P(D)``, residual or bonus by Gumbel-max."""
        B, W, V = draft.shape
        idx = ids.long().unsqueeze(-1)
        q = torch.gather(draft, -1, idx).squeeze(-1)
        pd = torch.gather(target[:, :W], -1, idx).squeeze(-1)
        u = torch.rand(B, W, device=draft.device, generator=gen)
        rej = ~(u * q < pd)
        j = torch.arange(W + 1, device=draft.device)
        first = torch.where(torch.cat([rej, torch.ones(B, 1, dtype=torch.bool, device=draft.device)], 1),
                            j.view(1, -1), W + 1).amin(1)
        row = torch.gather(target, 1, first.view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        qpad = torch.cat([draft, torch.zeros(B, 1, V, device=draft.device)], 1)
        qrow = torch.gather(qpad, 1, first.view(B, 1, 1).expand(B, 1, V)).squeeze(1)
        resid = (row - qrow).clamp(min=0)
        e = -torch.log(torch.rand(B, V, device=draft.device, generator=gen).clamp_min(1e-20))
        tok = torch.argmax(resid / e, -1)
        out = torch.where(j.view(1, -1) < first.view(B, 1), torch.cat([ids.long(), ids.new_zeros(B, 1).long()], 1), -1)
        return out.scatter(1, first.view(B, 1), tok.view(B, 1)), first

    @staticmethod
    def _chain_call(inp: dict, lib: dict, backend: str):
        """``verify_chain`` on the same laws and the same randomness keys as the fused step."""
        from ..ops.verify_chain import verify_chain
        st = lib["state"]
        parts = backend.split("_")                          # chain, backend[, t<threads> for the CUDA kernel]
        ctx = contextlib.nullcontext()
        if len(parts) == 3:
            from ..cuda.verify_chain import block_threads
            ctx = block_threads(int(parts[2][1:]))
        with ctx:
            return verify_chain(inp["target"], inp["draft"], inp["ids"].long(), seed=st.seed, step=st.step,
                                pos=lib["pos"], win_len=lib["win"], status=st.status, backend=parts[1])

    def _call(self, inp: dict, backend: str):
        if backend in self._CHAIN:
            return self._chain_call(inp, inp["lib"], backend)
        if backend == "flashinfer":
            from flashinfer.sampling import chain_speculative_sampling
            return chain_speculative_sampling(inp["draft"], inp["ids"], inp["target"])
        if backend in self._LIB:
            return self._library_call(inp["lib"], backend)
        return self.torch_verify(inp["draft"], inp["ids"], inp["target"], inp["gen"])

    def prepare(self, case: Case, device, seed: int) -> Prepared:
        inp = self._inputs(case.params, device, seed)
        inp["lib"] = lib = self._library_inputs(inp, seed)
        st = lib["state"]
        pristine = [t.clone() for t in (st.q_state, st.q_kind, st.status, st.step)]

        def reset():
            for dst, src in zip((st.q_state, st.q_kind, st.status, st.step), pristine):
                dst.copy_(src)

        return Prepared(call=lambda be: (lambda: self._call(inp, be)), reset=reset)

    def check(self, case: Case, backend: str, device, seed: int, min_requests: int = 64, ref_device=None) -> dict:
        """Well-formed output: a prefix of the drafts, one sampled token, then -1 padding. For the
        library's backends also: the committed tokens equal those of the torch backend of the same
        step with the same seeds in all but max(1, 2 %) of the requests (float rounding may move a
        sample across a boundary), and no device error. ``torch`` / ``chain_torch`` are that
        reference: their rows check well-formedness only (no comparison with themselves). Fresh
        inputs per trial until ``min_requests`` requests are checked, as the other ops. The laws
        themselves are tested in tests/test_jacobi_step_law.py."""
        _refuse_ref_device(self, ref_device)
        p = case.params
        B, W, V = p["B"], p["W"], p["V"]
        chain = backend in self._CHAIN
        itself = backend in ("torch", "chain_torch")
        trials = max(1, math.ceil(min_requests / B))
        n_req = differ = bad_status = 0
        ok = True
        for t in range(trials):
            s = seed + 7919 * t
            inp = self._inputs(p, device, s)
            if backend in self._LIB or chain:
                inp["lib"] = self._library_inputs(inp, s)
                out_lib = self._call(inp, backend)
                tok = out_lib.tokens
                bad_status = bad_status or int(inp["lib"]["state"].status[0])
                if not itself:
                    ref_lib = self._library_inputs(inp, s)
                    out_ref = (self._chain_call(inp, ref_lib, "chain_torch") if chain
                               else self._library_call(ref_lib, "torch"))
                    differ += int((~(out_lib.tokens == out_ref.tokens).all(1)).sum())
            else:
                out = self._call(inp, backend)
                tok = out[0] if isinstance(out, (tuple, list)) else out
            n_req += B
            tok = tok.long()
            good = tok.shape == (B, W + 1)
            if good:
                emitted = tok >= 0
                # a prefix of drafts, then one sampled token, then padding (-1)
                n = emitted.sum(1)
                pref = torch.arange(W + 1, device=tok.device).view(1, -1) < (n - 1).view(-1, 1)
                drafts_ok = ((tok[:, :W] == inp["ids"].long()) | ~pref[:, :W]).all()
                contiguous = (emitted == (torch.arange(W + 1, device=tok.device).view(1, -1) < n.view(-1, 1))).all()
                good = bool(drafts_ok) and bool(contiguous) and bool(((tok < V) | ~emitted).all()) \
                    and bool((n >= 1).all())
            ok = ok and good
        allowed = max(1, int(0.02 * n_req))
        formed = f"{n_req} requests {'well-formed' if ok else 'NOT well-formed'}"
        ref = "verify_chain" if chain else "step"
        if itself:
            detail = f"reference itself (the torch {ref}; no comparison); {formed}; status {bad_status}"
        elif backend in self._LIB or chain:
            detail = (f"vs the torch {ref}: {differ}/{n_req} requests differ (allowed {allowed}); "
                      f"status {bad_status}; {formed} accepted prefix + one sample (law: see the library's tests)")
        else:
            detail = f"{formed} accepted prefix + one sample (law: see the library's tests)"
        ok = ok and differ <= allowed and bad_status == 0
        return {"check": "pass" if ok else "FAIL", "check_detail": detail, "mismatch_rate": differ / max(1, n_req)}

    def bytes_min(self, case: Case) -> int:
        """Draft and target ids read as the scalar gathers; one full draft row and one target row per request
        (the residual); the uniforms/outputs. Whole-row reads are data-dependent, so this is a lower bound."""
        p = case.params
        B, W, V = p["B"], p["W"], p["V"]
        return int(B * (2 * W * 4 + 2 * V * 4 + W * 4 + (W + 1) * 8))

    def state_bytes_per_request(self, case: Case) -> int:
        p = case.params
        return p["W"] * p["V"] * 4


# =========================================================================== tree_verify
_TREE_KV_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _tree_verify_params(B, V, *, K=4, depth=3, W=32, cfg=True, dtype=torch.bfloat16, top_k=None):
    tk, s = FAMILY.get(V, (max(1, V // 4), 3.0))
    tk = tk if top_k is None else top_k
    label = f"B{B}_V{V}_K{K}_d{depth}_W{W}_{'cfg' if cfg else 'nocfg'}_{_DT[dtype]}_k{tk}"
    return {"B": B, "V": V, "K": K, "depth": depth, "W": W, "cfg": cfg, "dtype": dtype, "top_k": tk,
            "cfg_scale": s, "label": label}


class TreeVerifyBench(OpBench):
    """``tree_verify``: recursive rejection sampling over a K-ary draft tree plus a chain (SPEC section 5).

    Inputs are a decoding step's steady state: the ring of ``JacobiState`` holds the laws of a
    previous iteration (target laws of perturbed logits), the tree is drawn from them with
    ``build_tree`` (so drafts follow their stored laws), and node i's logits are a noisy copy of
    the logits those laws came from (so whole paths get accepted, partial paths end in residual
    draws and leaves in bonus draws). ``tree_verify`` mutates only ``state.status`` (``advance``
    off), which ``reset`` restores.
    """
    name = "tree_verify"
    ref_device_ok = True
    backends = ("torch", "triton", "cuda", "cuda_bracket", "cuda_hist")
    doc = ("verify a draft tree (K-ary tree then a chain) by recursive rejection sampling: CFG, top-k, "
           "softmax per walked node, sibling residuals, final draw; non-finite check at every node")

    def cases(self) -> list:
        out = []
        for V in (16384, 32768):
            for cfg in (True, False):
                for B in (1, 8, 32):
                    out.append(Case(self.name, _tree_verify_params(B, V, cfg=cfg),
                                    ("full", "quick") if V == 16384 else ("full",)))
        # small shapes for CPU checks (K 4 depth 3 with a chain; V=257 with top-k off, fp32, no CFG)
        out.append(Case(self.name, _tree_verify_params(3, 64, W=5, top_k=16), ("cpu", "cpu-quick")))
        out.append(Case(self.name, _tree_verify_params(2, 257, K=3, depth=2, W=6, cfg=False, dtype=torch.float32,
                                                       top_k=0), ("cpu",)))
        return out

    def _inputs(self, p: dict, device, seed: int) -> dict:
        from ..ops.jacobi_step import JacobiState
        from ..ops.tree import build_tree
        from ..reference.jacobi_step import KIND_DENSE
        from ..reference.target import target_probs
        B, V, K, depth, W = p["B"], p["V"], p["K"], p["depth"], p["W"]
        dev = torch.device(device)
        g = _gen(device, seed)
        st = JacobiState.create(B, W, V, seed=[int(seed) * 1009 + i for i in range(B)], device=dev)
        R = st.q_state.shape[1]
        pos = torch.randint(0, 1000, (B,), generator=g, device=dev)
        st.step.copy_(torch.randint(0, 30, (B,), generator=g, device=dev))
        base = 3.0 * torch.randn(B, R, V, generator=g, device=dev)        # logits of position p at slot p % R
        prev = base + 1.0 * torch.randn(B, R, V, generator=g, device=dev)
        st.q_state.copy_(target_probs(prev, 1.0, p["top_k"], 1.0))     # the drafts' laws (previous iteration)
        st.q_kind.fill_(KIND_DENSE)
        root = torch.randint(0, V, (B,), generator=g, device=dev)
        tree = build_tree(st, root, pos, K, depth, W)
        N = tree.num_nodes
        slot = (pos.view(B, 1) + tree.depth.clamp(min=0)) % R         # node i: the target of its children
        x = base[torch.arange(B, device=dev).view(B, 1), slot] + 0.5 * torch.randn(B, N, V, generator=g, device=dev)
        uncond = cfg = None
        if p["cfg"]:
            cfg = torch.full((B,), float(p["cfg_scale"]), device=dev)
            u = x + 1.0 * torch.randn(B, N, V, generator=g, device=dev)
            x = u + (x - u) / cfg.view(B, 1, 1)                        # so that the CFG row is x
            uncond = u.to(p["dtype"])
        return {"logits": x.to(p["dtype"]), "uncond": uncond, "cfg": cfg, "tree": tree, "pos": pos, "state": st}

    def _call(self, p: dict, inp: dict, state, backend: str):
        from ..ops.tree import tree_verify
        be, ctx = _variant(backend)
        with ctx:
            return tree_verify(inp["logits"], inp["tree"], inp["pos"], state, uncond_logits=inp["uncond"],
                               cfg_scale=inp["cfg"], top_k=int(p["top_k"]), backend=be, advance=False)

    def prepare(self, case: Case, device, seed: int) -> Prepared:
        inp = self._inputs(case.params, device, seed)
        st = inp["state"]
        status0 = st.status.clone()
        return Prepared(call=lambda be: (lambda: self._call(case.params, inp, st, be)),
                        reset=lambda: st.status.copy_(status0))

    def check(self, case: Case, backend: str, device, seed: int, min_requests: int = 64, ref_device=None) -> dict:
        """Backend vs the PyTorch reference on fresh inputs, token for token (same Philox numbers).

        Compared per request: ``num_accepted``, ``path`` and the committed tokens; and the error word
        ``status[0]`` (must be 0 for both). On the CPU (small shapes, the Triton interpreter) every
        request must agree exactly; on a GPU at most ``max(1, 2%)`` of requests may differ (a different
        float summation order can move a sample across a boundary), and the count is reported.
        """
        p = case.params
        B, V = p["B"], p["V"]
        trials = max(1, math.ceil(min_requests / B))
        n_req = n_bad = 0
        m_sum = 0
        problems = []
        for t in range(trials):
            inp = self._inputs(p, device, seed + 7919 * t)
            st_be = inp["state"].clone()
            inp_ref = inp if ref_device is None else _moved(inp, ref_device)
            st_ref = inp_ref["state"]
            o_ref = self._call(p, inp_ref, st_ref, "torch")
            o_be = self._call(p, inp, st_be, backend)
            if ref_device is not None:       # compared where the reference ran
                o_be, st_be = _moved(o_be, ref_device), _moved(st_be, ref_device)
            same = (o_ref.num_accepted == o_be.num_accepted) & (o_ref.path == o_be.path).all(1) & \
                (o_ref.tokens == o_be.tokens).all(1)
            n_req += B
            n_bad += int((~same).sum())
            m_sum += int(o_ref.num_accepted.clamp(min=0).sum())
            if int(st_ref.status[0]) or int(st_be.status[0]):
                problems.append(f"device status error bits ref={int(st_ref.status[0])} {backend}={int(st_be.status[0])}")
            m = o_be.num_accepted
            if not bool(((m >= 0) & (m <= p["W"])).all()):
                problems.append("num_accepted out of [0, W]")
            L1 = o_be.tokens.shape[1]
            valid = torch.arange(L1, device=m.device).view(1, -1) <= m.view(-1, 1)
            tok = o_be.tokens
            if not bool((((tok >= 0) & (tok < V)) | ~valid).all()) or not bool((tok[~valid] == -1).all()):
                problems.append("committed tokens out of range or not -1-padded")
        exact = torch.device(device).type == "cpu"
        allowed = 0 if exact else max(1, int(0.02 * n_req))
        ok = n_bad <= allowed and not problems
        if backend == "torch":
            detail = f"reference itself; {n_req} requests well-formed, mean accepted {m_sum / n_req:.2f}"
        else:
            detail = (f"vs torch{_on(ref_device)}: {n_bad}/{n_req} requests differ in num_accepted/path/tokens "
                      f"(allowed {allowed}"
                      f"{', exact on CPU' if exact else ''}); mean accepted {m_sum / n_req:.2f}")
        if problems:
            detail += "; " + "; ".join(sorted(set(problems)))
        return {"check": "pass" if ok else "FAIL", "check_detail": detail, "mismatch_rate": n_bad / max(1, n_req)}

    @staticmethod
    def num_nodes(p: dict) -> int:
        from ..reference.tree import tree_template
        return len(tree_template(p["K"], p["depth"], p["W"])[0])

    def bytes_min(self, case: Case) -> int:
        """Fewest bytes one call must move. Choice: the logits of EVERY node (and uncond with CFG),
        ``B N V e`` each, read once: the op's contract checks every node's row for non-finite values
        (error bit 1), not only the walked ones, so no implementation may skip a row. A walk-only
        variant without that check would read ``(m + 1)`` rows per request instead. Draft laws: one
        fp32 row ``B V 4`` per request (the root's; the deeper levels' rows are read only as far as
        the walk goes, which is data dependent: a lower bound). Tree tensors (tokens, parent, depth,
        sib, q_slot: ``5 B N 8``), q_kind, pos/seed/step/cfg and the outputs at their sizes."""
        p = case.params
        B, V, W = p["B"], p["V"], p["W"]
        N = self.num_nodes(p)
        e = torch.empty((), dtype=p["dtype"]).element_size()
        b = (2 if p["cfg"] else 1) * B * N * V * e
        b += B * V * 4
        b += 5 * B * N * 8 + B * (W + 1) * 4 + B * (3 * 8 + (4 if p["cfg"] else 0))
        b += B * (8 + 2 * (W + 1) * 8)
        return int(b)

    def state_bytes_per_request(self, case: Case) -> int:
        p = case.params
        R = p["W"] + 1
        return R * p["V"] * 4 + R * 4 + 2 * 8


# =========================================================================== tree_kv_update
TREE_KV_MODELS = {"llamagen-xl": dict(L=36, H=20, D=64, S=2048), "7b": dict(L=32, H=32, D=128, S=4096)}


def _tree_kv_params(model, R, P, layout, *, dtype=torch.bfloat16, ragged=False, **shape):
    m = dict(TREE_KV_MODELS.get(model, {}), **shape)
    label = f"{model}_L{m['L']}_H{m['H']}_D{m['D']}_S{m['S']}_R{R}_P{P}_{layout}_{_DT[dtype]}"
    if ragged:
        label += "_ragged"
    return {"model": model, **m, "R": R, "P": P, "layout": layout, "dtype": dtype, "ragged": ragged,
            "label": label}


class TreeKVUpdateBench(OpBench):
    """``tree_kv_update``: move the accepted path's K/V (all layers, K and V, all heads) in place.

    Path per row: nodes 0, 2, 5, 9, ... (gaps growing by one), so every entry after the root moves
    and sources overlap the destinations of later entries (the in-place hazard); with ``ragged``
    row r keeps ``P - r % 3`` entries (the rest -1 padding). ``cache_len`` differs per row. Random
    cache contents (never zeros); the list layout passes a pointer table built once, as a decoding
    loop would. ``reset`` restores the slot window the moves touch.
    """
    name = "tree_kv_update"
    backends = ("torch", "triton", "cuda")
    doc = "move the accepted tree path's K/V into place after the committed prefix (all layers, one launch)"

    def cases(self) -> list:
        out = []
        for model in TREE_KV_MODELS:
            for R in (1, 8):
                for layout in ("stacked", "list"):
                    grids = ("full", "quick") if (layout == "stacked" or R == 1) else ("full",)
                    out.append(Case(self.name, _tree_kv_params(model, R, 8, layout), grids))
        # small versions for CPU checks
        out.append(Case(self.name, _tree_kv_params("small", 1, 8, "stacked", L=3, H=2, D=64, S=64),
                        ("cpu", "cpu-quick")))
        out.append(Case(self.name, _tree_kv_params("small", 3, 8, "list", L=2, H=3, D=32, S=96, ragged=True),
                        ("cpu", "cpu-quick")))
        out.append(Case(self.name, _tree_kv_params("small", 2, 8, "stacked", L=2, H=2, D=16, S=80,
                                                   dtype=torch.float32), ("cpu",)))
        return out

    @staticmethod
    def _path(p: dict, device) -> torch.Tensor:
        R, P = p["R"], p["P"]
        nodes, n = [0], 0
        for j in range(1, P):
            n += j + 1
            nodes.append(n)
        path = torch.tensor(nodes, dtype=torch.int64).repeat(R, 1)
        if p["ragged"]:
            for r in range(R):
                path[r, P - r % 3:] = -1
        return path.to(device)

    def _inputs(self, p: dict, device, seed: int) -> dict:
        from ..ops.tree import kv_pointer_table
        L, H, D, S, R = p["L"], p["H"], p["D"], p["S"], p["R"]
        dev = torch.device(device)
        g = _gen(device, seed)
        path = self._path(p, dev)
        span = int(path.max()) + 1
        lo = max(0, S // 2 - 2 * span)
        cache_len = torch.randint(lo, S - span + 1, (R,), generator=g, device=dev)
        if p["layout"] == "stacked":
            kv = torch.empty(L, 2, R, H, S, D, dtype=p["dtype"], device=dev)
            for l in range(L):                      # layer by layer: no float32 temporary of the whole cache
                kv[l].normal_(generator=g)
            cache, tensors, table = kv, [kv], None
        else:
            keys = [torch.empty(R, H, S, D, dtype=p["dtype"], device=dev).normal_(generator=g) for _ in range(L)]
            values = [torch.empty(R, H, S, D, dtype=p["dtype"], device=dev).normal_(generator=g) for _ in range(L)]
            cache, tensors, table = (keys, values), keys + values, kv_pointer_table(keys, values)
        status = torch.zeros(4, dtype=torch.int32, device=dev)
        return {"cache": cache, "tensors": tensors, "ptr_table": table, "path": path, "cache_len": cache_len,
                "status": status, "window": (int(cache_len.min()), int(cache_len.max()) + span)}

    def _call(self, inp: dict, backend: str):
        from ..ops.tree import tree_kv_update
        return tree_kv_update(inp["cache"], inp["path"], inp["cache_len"], status=inp["status"],
                              ptr_table=inp["ptr_table"], backend=backend)

    def prepare(self, case: Case, device, seed: int) -> Prepared:
        inp = self._inputs(case.params, device, seed)
        a, b = inp["window"]                    # the slots any move touches (S is dim -2 in both layouts)
        saved = [t[..., a:b, :].clone() for t in inp["tensors"]]

        def reset():
            for t, s in zip(inp["tensors"], saved):
                t[..., a:b, :].copy_(s)
            inp["status"].zero_()

        return Prepared(call=lambda be: (lambda: self._call(inp, be)), reset=reset)

    @staticmethod
    def _oracle(tensors: list, stacked: bool, path: torch.Tensor, cache_len: torch.Tensor) -> None:
        """Independent sequential copy in increasing j (safe in place because ``path[j] >= j``)."""
        pth, cl = path.tolist(), cache_len.tolist()
        for r, row in enumerate(pth):
            for j, n in enumerate(row):
                if n >= 0 and n != j:
                    for t in tensors:
                        if stacked:
                            t[:, :, r, :, cl[r] + j] = t[:, :, r, :, cl[r] + n]
                        else:
                            t[r, :, cl[r] + j] = t[r, :, cl[r] + n]

    def check(self, case: Case, backend: str, device, seed: int, min_requests: int = 64, ref_device=None) -> dict:
        """Bit-identical caches: the backend's result against the PyTorch reference's (the torch backend
        against an independent sequential copy), compared as integers over the whole cache (nothing
        outside the moved slots may change); ``status[0]`` must stay 0. Fresh inputs per trial until
        ``min_requests`` rows are checked, as the other ops, but at most 8 trials (inputs are
        regenerated from the seed rather than cloned, so a full-size cache exists at most twice)."""
        _refuse_ref_device(self, ref_device)
        p = case.params
        bits = _TREE_KV_BITS[p["dtype"]]
        stacked = p["layout"] == "stacked"
        # at most 8 trials: each compares two whole caches (hundreds of MB in the large cases)
        trials = min(8, max(1, math.ceil(min_requests / p["R"])))
        n_t = n_bad = moved = n_rows = 0
        problems = []
        for t in range(trials):
            s = seed + 7919 * t
            got = self._inputs(p, device, s)
            self._call(got, backend)
            want = self._inputs(p, device, s)
            if backend == "torch":
                self._oracle(want["tensors"], stacked, want["path"], want["cache_len"])
            else:
                self._call(want, "torch")
            n_t += len(got["tensors"])
            n_bad += sum(not torch.equal(a.view(bits), b.view(bits)) for a, b in zip(got["tensors"], want["tensors"]))
            moved += int(((got["path"] >= 0) & (got["path"] != torch.arange(p["P"], device=got["path"].device))).sum())
            n_rows += p["R"]
            if int(got["status"][0]) or int(want["status"][0]):
                problems.append(f"status error bits {backend}={int(got['status'][0])} ref={int(want['status'][0])}")
            del got, want
        ok = not n_bad and not problems
        ref_name = "independent sequential copy" if backend == "torch" else "torch"
        detail = (f"vs {ref_name}: {'bit-identical' if not n_bad else f'{n_bad}/{n_t} cache tensors differ'} "
                  f"({trials} trial{'s' if trials > 1 else ''}, {n_t} tensor{'s' if n_t > 1 else ''}, {moved} moved "
                  f"entries over {n_rows} rows)")
        if problems:
            detail += "; " + "; ".join(sorted(set(problems)))
        return {"check": "pass" if ok else "FAIL", "check_detail": detail, "mismatch_rate": 0.0 if ok else 1.0}

    def bytes_min(self, case: Case) -> int:
        """2 x the bytes moved (each moved entry's K and V of every layer and head read once and
        written once: ``2 x moves x L x 2 x H x D x e``), plus the path and cache lengths."""
        p = case.params
        path = self._path(p, "cpu")
        moves = int(((path >= 0) & (path != torch.arange(p["P"]))).sum())
        e = torch.empty((), dtype=p["dtype"]).element_size()
        return int(2 * moves * p["L"] * 2 * p["H"] * p["D"] * e + p["R"] * (p["P"] + 1) * 8)

    def state_bytes_per_request(self, case: Case) -> int:
        """The KV cache of one model row: ``L x 2 x H x S x D x e``."""
        p = case.params
        e = torch.empty((), dtype=p["dtype"]).element_size()
        return p["L"] * 2 * p["H"] * p["S"] * p["D"] * e


# =========================================================================== registry
OPS: dict = {}


def register(bench: OpBench) -> OpBench:
    OPS[bench.name] = bench
    return bench


register(JacobiStepBench())
register(SJD2PrepareBench())
register(VerifyOnlyBench())
register(TreeVerifyBench())
register(TreeKVUpdateBench())


def select(ops=None, grid: str = "full") -> list:
    """Cases of the named ops (all when None) in ``grid``."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    names = list(OPS) if not ops else list(ops)
    out = []
    for n in names:
        if n not in OPS:
            raise ValueError(f"unknown op {n!r}; registered: {', '.join(OPS)}")
        out += [c for c in OPS[n].cases() if grid in c.grids]
    if grid == "full":      # the quick cases first: a run cut by its time box still has the headline shapes
        out.sort(key=lambda c: 0 if "quick" in c.grids else 1)
    return out


def case_matches(text: str, name: str) -> bool:
    """``bench ops --case``: ``text`` occurs in the case's name, or (with a trailing ``$``) ends it."""
    return name.endswith(text[:-1]) if text.endswith("$") else text in name
