"""Tree drafting and verification (SPEC sections 3, 5, 7, 9): ``build_tree`` and ``tree_verify``.

- Law: several steps of tree drafting + verification on a prefix-to-row table "model"
  (``tree_law``); the law of the first L committed tokens is compared with the exact float64 AR law
  by a chi-square test with false-alarm rate ``stats.ALPHA = 1e-6`` and power >= 0.99 against an
  error of 0.02 in any cell (``stats.assert_law``). Cases: K up to 4, depth up to 3, dense proposals
  with zeros, uniform and one-hot kinds, a coupled first sibling, K larger than the support, forced
  positions (with NaN rows that must not be read), CFG with temperature and top-k, greedy.
- Mutations: the two tree traps of SPEC section 3 (later siblings drawn from the coupling
  residual; verification against the undepleted ``q``) make the same law check reject.
- Sibling law of ``build_tree``: the joint law of the first two siblings equals drawing without
  replacement (exact enumeration); siblings stop when the remaining mass is zero.
- Structure and input errors: SJDInputError on CPU with a clear message, nothing changed; in the
  reference only the bad request returns -1.
- Determinism and batch invariance.

Backends: ``BACKENDS`` lists ``torch`` and, when their modules exist, ``triton``
(``sjd_kernels.triton.tree_verify``; CPU tensors under ``TRITON_INTERPRET=1``, else CUDA) and
``cuda`` (``sjd_kernels.cuda.tree_verify`` with the extension and a GPU). The small deterministic
tests run on all of them; the law tests run on ``SJD_LAW_BACKENDS`` (default ``torch``), through
the public op.
"""
from __future__ import annotations

import contextlib

import importlib.util
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import stats  # noqa: E402
import tree_law as TL  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from sjd_kernels.ops._common import triton_available  # noqa: E402
from sjd_kernels.reference import tree as ref  # noqa: E402
from sjd_kernels.reference.jacobi_step import KIND_DENSE, KIND_ONEHOT, KIND_UNIFORM  # noqa: E402

I64 = torch.int64
INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def available_backends(kind: str = "tree_verify") -> list:
    """``torch`` plus the backends whose ``kind`` module exists and can run here."""
    out = ["torch"]
    if _has_module(f"sjd_kernels.triton.{kind}") and triton_available()[0]:
        out.append("triton")
    if _has_module(f"sjd_kernels.cuda.{kind}") and torch.cuda.is_available() and sk.backends()["cuda"]["available"]:
        out.append("cuda")
    return out


def backend_device(backend: str) -> str:
    if backend in ("torch", "auto") or (backend == "triton" and INTERP):
        return "cpu"
    return "cuda"


BACKENDS = available_backends()


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


def public_verify(backend: str = "torch", device: str = "cpu"):
    """The public op ``sk.tree_verify`` behind the raw reference signature (used by ``tree_law.run``)."""
    dev = torch.device(device)

    def verify(logits, uncond, cfg, tokens, parent, depth, sib, q_slot, pos, seed, step, forced, q_state, q_kind,
               status, temperature, top_k, top_p, max_depth):
        mv = lambda t: None if t is None else t.to(dev)
        tree = sk.TreeLayout(*(mv(t).contiguous() for t in (tokens, parent, depth, sib, q_slot)), max_depth)
        st = sk.JacobiState(mv(q_state), mv(q_kind), torch.empty(0, device=dev), mv(seed), mv(step),
                            torch.zeros(4, dtype=torch.int32, device=dev))
        out = sk.tree_verify(mv(logits), tree, mv(pos), st, uncond_logits=mv(uncond), cfg_scale=mv(cfg),
                             forced=mv(forced), temperature=temperature, top_k=top_k, top_p=top_p, backend=backend,
                             advance=False)
        stt = st.status.cpu()
        status[0] |= stt[0]
        status[1:] += stt[1:]
        return tuple(t.cpu() for t in (out.num_accepted, out.path, out.tokens))
    verify.__name__ = f"public_{backend}"
    return verify


def law_impls():
    names = [b.strip() for b in os.environ.get("SJD_LAW_BACKENDS", "torch").split(",") if b.strip()]
    return [pytest.param(public_verify(b, os.environ.get("SJD_LAW_DEVICE", backend_device(b))), id=b) for b in names]


# ----------------------------------------------------------------------------- multi-step law

C = TL.Case
LAW_CASES = [
    # K exceeds the support (V = 3, dense rows with zeros): siblings stop at zero remaining mass
    C("dense_k4_d2", V=3, K=4, D=2, W=3, L=2, n=48000, seed=11),
    C("dense_k2_d3", V=3, K=2, D=3, W=3, L=3, n=60000, seed=12),
    C("uniform_onehot_k3_d2", V=3, K=3, D=2, W=3, L=3, n=60000, seed=13, kinds=(KIND_DENSE, KIND_UNIFORM, KIND_ONEHOT)),
    C("uniform_k3_d3", V=3, K=3, D=3, W=3, L=3, n=60000, seed=14, kinds=(KIND_UNIFORM,)),
    C("coupled_k3_d2", V=4, K=3, D=2, W=3, L=2, n=60000, seed=15, coupled=True),
    C("v2_k4_d2", V=2, K=4, D=2, W=2, L=4, n=55000, seed=16, zero_frac=0.3),
    C("forced_nan_rows", V=3, K=3, D=2, W=3, L=4, n=60000, seed=17, kinds=(KIND_DENSE, KIND_UNIFORM),
      extra={"forced": {1: 2}, "nan_forced_rows": True}),
    C("cfg_t0.8_topk3", V=4, K=2, D=2, W=2, L=2, n=50000, seed=18, cfg=3.0, top_k=3, temperature=0.8),
    C("greedy", V=3, K=3, D=2, W=3, L=4, n=3000, seed=19, temperature=0.0),
]


@pytest.mark.parametrize("impl", law_impls())
@pytest.mark.parametrize("case", LAW_CASES, ids=[c.name for c in LAW_CASES])
def test_committed_law(case, impl):
    codes, table = TL.run(case, verify=impl)
    r = stats.assert_law(codes, table.exact_law(case), f"{case.name}/{impl.__name__}")
    print(r)


# ----------------------------------------------------------------------------- mutations

MUTATION_CASES = {
    "siblings_from_resid": [c for c in LAW_CASES if c.name == "coupled_k3_d2"],
    "undepleted_q": [c for c in LAW_CASES if c.name == "coupled_k3_d2"],
}


def test_every_mutation_is_tested():
    assert set(MUTATION_CASES) == set(TL.MUTATIONS)


@pytest.mark.parametrize("mutation", TL.MUTATIONS)
def test_law_check_rejects_tree_trap(mutation):
    """The law check of the same case, samples and alpha rejects each tree trap of SPEC section 3."""
    for case in MUTATION_CASES[mutation]:
        r = TL.law_check(case, mutation=mutation)
        print(r)
        assert r.power >= stats.POWER
        assert r.p_value < stats.ALPHA, f"the law check does not reject the {mutation} mutant: {r}"


def test_mutation_switch_leaves_reference_intact():
    """The undepleted-q switch is undone after use (the reference's ``_sibling_law`` is restored)."""
    orig = ref._sibling_law
    case = C("tiny", V=3, K=2, D=1, W=2, L=2, n=200, seed=3)
    TL.run(case, mutation="undepleted_q")
    assert ref._sibling_law is orig


# ----------------------------------------------------------------------------- sibling law of build_tree

def _one_level(q, kind, K, n, seed, first=None):
    """Children of the root of a one-level tree for ``n`` requests with the same law ``q [V]``."""
    V = q.shape[0]
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g)
    step = torch.randint(0, 1000, (n,), generator=g)
    pos = torch.randint(0, 50, (n,), generator=g)
    R = 2
    q_state = q.view(1, 1, V).expand(n, R, V).contiguous()
    q_kind = torch.full((n, R), kind, dtype=torch.int32)
    fst = None if first is None else torch.full((n, 1), first, dtype=I64)
    tree = ref.build_tree(torch.zeros(n, dtype=I64), pos, seeds, step, q_state, q_kind, K, 1, 1, first=fst)
    return tree


def _pair_law(q, first=None):
    """Exact law of (sibling 1, sibling 2) drawn without replacement; cell ``a * (V + 1) + b``, b = V: none."""
    q = np.asarray(q, dtype=np.float64)
    q = q / q.sum()
    V = q.size
    law = np.zeros(V * (V + 1))
    for a in range(V):
        pa = (1.0 if a == first else 0.0) if first is not None else q[a]
        if pa == 0:
            continue
        rest = q.copy()
        rest[a] = 0
        if rest.sum() == 0:
            law[a * (V + 1) + V] += pa
            continue
        for b in range(V):
            law[a * (V + 1) + b] += pa * rest[b] / rest.sum()
    return law


SIBLING_CASES = {
    "dense_zeros": (torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3]), KIND_DENSE, None),
    "dense_coupled_first": (torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.3]), KIND_DENSE, 3),
    "uniform": (torch.zeros(4), KIND_UNIFORM, None),
    "support_two": (torch.tensor([0.0, 0.7, 0.0, 0.3]), KIND_DENSE, None),
}


@pytest.mark.parametrize("name", list(SIBLING_CASES))
def test_sibling_joint_law(name):
    """(first, second) sibling of ``build_tree`` ~ sampling without replacement (or: first given, second from
    q without it), against the exact enumerated law; K = 3 so the third sibling is drawn too."""
    q, kind, first = SIBLING_CASES[name]
    V = q.shape[0]
    qlaw = torch.full((V,), 1.0 / V) if kind == KIND_UNIFORM else q
    law = _pair_law(qlaw.numpy(), first)
    n = stats.required_n(int((law > 0).sum())) + 2000
    tree = _one_level(q, kind, 3, n, seed=100 + len(name), first=first)
    a, b = tree.tokens[:, 1], tree.tokens[:, 2]
    assert bool((a >= 0).all())
    b = torch.where(b >= 0, b, torch.full_like(b, V))
    assert bool((tree.tokens[:, 1:4] != tree.tokens[:, [2, 3, 1]]).logical_or(tree.tokens[:, 1:4] < 0).all()), \
        "siblings repeat a token"
    print(stats.assert_law((a * (V + 1) + b).numpy(), law, name))


def test_siblings_stop_at_zero_mass():
    V = 5
    # dense law with support {1, 3}: K = 4 gives exactly two children
    q = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0])
    t = _one_level(q, KIND_DENSE, 4, 300, seed=1)
    kids = t.parent[:, 1:5] >= 0
    assert bool((kids.sum(1) == 2).all())
    assert bool((kids[:, :2]).all()), "children must be the first sibling slots"
    assert set(t.tokens[:, 1:3].flatten().tolist()) == {1, 3}
    assert bool((t.tokens[:, 3:5] == -1).all() and (t.depth[:, 3:5] == -1).all() and (t.sib[:, 3:5] == -1).all())
    # a coupled first sibling uses one of the two; the other comes next, then nothing
    t = _one_level(q, KIND_DENSE, 4, 50, seed=2, first=3)
    assert bool((t.tokens[:, 1] == 3).all() and (t.tokens[:, 2] == 1).all() and (t.parent[:, 3:5] == -1).all())
    # one-hot kind: only the given first token
    t = _one_level(torch.zeros(V), KIND_ONEHOT, 4, 20, seed=3, first=2)
    assert bool((t.tokens[:, 1] == 2).all() and (t.parent[:, 2:5] == -1).all())
    # one-hot kind without a first token, or an all-zero dense row: no children at all
    for qq, kind in ((torch.zeros(V), KIND_ONEHOT), (torch.zeros(V), KIND_DENSE)):
        t = _one_level(qq, kind, 4, 20, seed=4)
        assert bool((t.parent[:, 1:] == -1).all())


def test_chain_under_missing_spine_is_empty_and_verifies():
    """A level with no mass ends the tree there; verification then draws the bonus token from the root's row."""
    B, V, W = 64, 4, 3
    g = torch.Generator().manual_seed(5)
    q_state = torch.zeros(B, W + 1, V)
    q_state[:, :, 1] = 1.0
    q_kind = torch.full((B, W + 1), KIND_DENSE, dtype=torch.int32)
    pos = torch.zeros(B, dtype=I64)
    q_state[:, 1] = 0.0                                                   # position 1 (level 2) has no mass
    seeds = torch.randint(0, 2 ** 40, (B,), generator=g)
    step = torch.zeros(B, dtype=I64)
    tree = ref.build_tree(torch.zeros(B, dtype=I64), pos, seeds, step, q_state, q_kind, 2, 1, W)
    assert bool((tree.valid.sum(1) == 2).all()), "only the root and its one child (support 1) exist"
    logits = torch.randn(B, tree.num_nodes, V, generator=g)
    st = torch.zeros(4, dtype=torch.int32)
    na, path, tok = ref.tree_verify(logits, None, None, tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot,
                                    pos, seeds, step, None, q_state, q_kind, st, 1.0, 0, 1.0, tree.max_depth)
    assert int(st[0]) == 0 and bool((na <= 1).all() and (na >= 0).all())
    assert bool(((tok >= 0) & (tok < V))[torch.arange(W + 1).view(1, -1) <= na.view(-1, 1)].all())


# ----------------------------------------------------------------------------- a random small batch

def random_batch(B=6, V=7, K=3, D=2, W=3, seed=0, forced=False, cfg=False):
    """A batch of trees drawn with ``build_tree`` from random laws, with random logits: raw tensors."""
    g = torch.Generator().manual_seed(seed)
    R = W + 2
    q_state = torch.rand(B, R, V, generator=g) ** 2
    q_state = q_state * (torch.rand(B, R, V, generator=g) > 0.3)
    q_state[:, :, 0] += 0.01
    q_state = q_state / q_state.sum(-1, keepdim=True)
    q_kind = torch.randint(0, 3, (B, R), generator=g).to(torch.int32)
    pos = torch.randint(0, 20, (B,), generator=g)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (B,), generator=g)
    step = torch.randint(0, 100, (B,), generator=g)
    first = torch.randint(0, V, (B, W), generator=g)
    first = torch.where(torch.rand(B, W, generator=g) < 0.5, first, torch.full_like(first, -1))
    fc = None
    if forced:
        fc = torch.full((B, 40), -1, dtype=I64)
        fc[:, 3::5] = 2
        fc[:, 4::7] = V + 3                        # a forced id outside the image slice
    tree = ref.build_tree(torch.randint(0, V, (B,), generator=g), pos, seeds, step, q_state, q_kind, K, D, W,
                          first=first, forced=fc)
    N = tree.num_nodes
    logits = torch.randn(B, N, V, generator=g) * 2
    unc = torch.randn(B, N, V, generator=g) * 2 if cfg else None
    cfg_scale = torch.rand(B, generator=g) * 4 + 1 if cfg else None
    return dict(logits=logits, uncond=unc, cfg=cfg_scale, tree=tree, pos=pos, seed=seeds, step=step, forced=fc,
                q_state=q_state, q_kind=q_kind)


def _run_public(b, backend, index=None, temperature=0.9, top_k=5, top_p=0.95, logits=None, device=None):
    dev = device or backend_device(backend)   # device: e.g. CPU tensors for the CUDA backend in the simulator
    idx = torch.arange(b["pos"].shape[0]) if index is None else index
    sel = lambda t: None if t is None else t.index_select(0, idx).contiguous().to(dev)
    tree = b["tree"].rows(idx)
    tree = sk.TreeLayout(*(t.contiguous().to(dev) for t in (tree.tokens, tree.parent, tree.depth, tree.sib,
                                                           tree.q_slot)), tree.max_depth)
    st = sk.JacobiState(sel(b["q_state"]), sel(b["q_kind"]), torch.empty(0, device=dev), sel(b["seed"]),
                        sel(b["step"]), torch.zeros(4, dtype=torch.int32, device=dev))
    lg = b["logits"] if logits is None else logits
    out = sk.tree_verify(sel(lg), tree, sel(b["pos"]), st, uncond_logits=sel(b["uncond"]), cfg_scale=sel(b["cfg"]),
                         forced=sel(b["forced"]), temperature=temperature, top_k=top_k, top_p=top_p, backend=backend)
    return out, st


def _ref_out(b, temperature=0.9, top_k=5, top_p=0.95):
    t = b["tree"]
    st = torch.zeros(4, dtype=torch.int32)
    out = ref.tree_verify(b["logits"], b["uncond"], b["cfg"], t.tokens, t.parent, t.depth, t.sib, t.q_slot, b["pos"],
                          b["seed"], b["step"], b["forced"], b["q_state"], b["q_kind"], st, temperature, top_k, top_p,
                          t.max_depth)
    return out, st


def _check_walk(b, na, path, tok, V):
    """Outputs are a root-to-node walk: parents chain, tokens are the nodes', m + 1 tokens then -1."""
    t = b["tree"]
    B, L1 = path.shape
    for r in range(B):
        m = int(na[r])
        assert 0 <= m < L1
        assert int(path[r, 0]) == 0
        for j in range(1, m + 1):
            node = int(path[r, j])
            assert int(t.parent[r, node]) == int(path[r, j - 1]) and int(t.depth[r, node]) == j
            assert int(tok[r, j - 1]) == int(t.tokens[r, node])
        assert bool((path[r, m + 1:] == -1).all() and (tok[r, m + 1:] == -1).all())
        last = int(tok[r, m])
        f = -1 if b["forced"] is None else int(b["forced"][r, int(b["pos"][r]) + m])
        assert (0 <= last < V) or last == f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["plain", "forced_cfg"])
def test_determinism_and_batch_invariance(backend, variant):
    """Same seeds, same tokens; a request's result does not depend on the other requests in the batch."""
    small = backend != "torch"                   # interpreted kernels are slow: fewer requests and calls
    B = 3 if small else 6
    b = random_batch(B=B, forced=variant != "plain", cfg=variant != "plain", seed=21)
    V = b["logits"].shape[2]
    o1, st1 = _run_public(b, backend)
    o2, _ = _run_public(b, backend)
    for x, y in zip((o1.num_accepted, o1.path, o1.tokens), (o2.num_accepted, o2.path, o2.tokens)):
        assert torch.equal(x, y)
    na, path, tok = (t.cpu() for t in (o1.num_accepted, o1.path, o1.tokens))
    _check_walk(b, na, path, tok, V)
    assert int(st1.status[0]) == 0 and bool((st1.step.cpu() == b["step"] + 1).all())
    perm = torch.tensor([2, 0]) if small else torch.tensor([4, 1, 5, 0])
    op, _ = _run_public(b, backend, index=perm)
    assert torch.equal(op.tokens.cpu(), tok[perm]) and torch.equal(op.path.cpu(), path[perm])
    for r in ((1,) if small else (0, 3)):
        o, _ = _run_public(b, backend, index=torch.tensor([r]))
        assert torch.equal(o.tokens.cpu(), tok[r:r + 1]) and torch.equal(o.num_accepted.cpu(), na[r:r + 1])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"] or
                         [pytest.param("none", marks=pytest.mark.skip(reason="no other tree_verify backend here"))])
@pytest.mark.parametrize("variant", ["plain", "forced_cfg", "greedy"])
def test_backend_matches_reference(backend, variant):
    """Other backends give the reference's tokens and paths on small random trees."""
    b = random_batch(B=5, K=3, D=2, W=3, seed=31, forced=variant == "forced_cfg", cfg=variant == "forced_cfg")
    kw = dict(temperature=0.0) if variant == "greedy" else {}
    (na, path, tok), _ = _ref_out(b, **kw)
    o, _ = _run_public(b, backend, **kw)
    assert torch.equal(o.num_accepted.cpu(), na) and torch.equal(o.path.cpu(), path) and torch.equal(o.tokens.cpu(), tok)


def test_public_op_equals_reference():
    b = random_batch(B=6, forced=True, cfg=True, seed=41)
    (na, path, tok), st = _ref_out(b)
    o, _ = _run_public(b, "torch")
    assert torch.equal(o.num_accepted, na) and torch.equal(o.path, path) and torch.equal(o.tokens, tok)
    o, _ = _run_public(b, "auto")
    assert torch.equal(o.tokens, tok)


def test_greedy_commits_the_argmax_path():
    """T = 0: every committed token is the argmax of its row (lowest id on ties)."""
    b = random_batch(B=8, seed=51)
    (na, path, tok), _ = _ref_out(b, temperature=0.0)
    for r in range(8):
        for j in range(int(na[r]) + 1):
            node = int(path[r, j])
            assert int(tok[r, j]) == int(torch.argmax(b["logits"][r, node]))


# ----------------------------------------------------------------------------- errors

def _corrupt(name, t: sk.TreeLayout, R):
    t = sk.TreeLayout(*(x.clone() for x in (t.tokens, t.parent, t.depth, t.sib, t.q_slot)), t.max_depth)
    r = 1
    if name == "parent_not_earlier":
        t.parent[r, 2] = 5
    elif name == "parent_not_a_node":
        t.parent[r, 5] = 4
        t.parent[r, 4] = -1                  # node 4 removed, node 5 still points at it
    elif name == "root_has_parent":
        t.parent[r, 0] = 0
    elif name == "depth_wrong":
        t.depth[r, 3] = 1                    # a level-2 node
    elif name == "depth_above_max":
        t.max_depth = 1
    elif name == "sib_duplicate":
        t.sib[r, 2] = t.sib[r, 1]
    elif name == "sib_gap":
        t.sib[r, 2] = 5
    elif name == "q_slot_out_of_range":
        t.q_slot[r, 0] = R
    elif name == "q_slot_negative":
        t.q_slot[r, 1] = -2
    elif name == "token_out_of_range":
        t.tokens[r, 2] = 7                   # V = 7
    elif name == "token_negative":
        t.tokens[r, 1] = -3
    else:
        raise AssertionError(name)
    return t


STRUCTURE_ERRORS = ["parent_not_earlier", "parent_not_a_node", "root_has_parent", "depth_wrong", "depth_above_max",
                    "sib_duplicate", "sib_gap", "q_slot_out_of_range", "q_slot_negative"]
INPUT_ERRORS = ["token_out_of_range", "token_negative", "nan_logits", "inf_logits", "all_neg_inf_row"]


def _full_batch(seed=61):
    """A batch where request 1 has a full K=2, D=2 tree (uniform laws), so every corruption applies."""
    b = random_batch(B=3, V=7, K=2, D=2, W=2, seed=seed)
    b["q_kind"][:] = KIND_UNIFORM
    t = b["tree"]
    b["tree"] = ref.build_tree(t.tokens[:, 0], b["pos"], b["seed"], b["step"], b["q_state"], b["q_kind"], 2, 2, 2)
    assert bool(b["tree"].valid.all())
    return b


@pytest.mark.parametrize("name", STRUCTURE_ERRORS + INPUT_ERRORS)
def test_errors_raise_on_cpu_and_change_nothing(name):
    b = _full_batch()
    R = b["q_state"].shape[1]
    logits = b["logits"].clone()
    if name in INPUT_ERRORS[2:]:
        v = {"nan_logits": float("nan"), "inf_logits": float("inf")}.get(name)
        if v is None:
            logits[1, 2] = float("-inf")
        else:
            logits[1, 2, 3] = v
        tree = b["tree"]
    else:
        tree = _corrupt(name, b["tree"], R)
    snap = [x.clone() for x in (tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot, logits)]
    st = sk.JacobiState(b["q_state"].clone(), b["q_kind"].clone(), torch.empty(0), b["seed"].clone(),
                        b["step"].clone(), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(sk.SJDInputError) as ei:
        sk.tree_verify(logits, tree, b["pos"], st, temperature=1.0)
    msg = str(ei.value)
    print(msg)
    want = {"token_out_of_range": "outside [0, V=7)", "token_negative": "outside [0, V=7)",
            "nan_logits": "non-finite", "inf_logits": "non-finite", "all_neg_inf_row": "non-finite"}
    assert want.get(name, "malformed tree") in msg, msg
    # each corruption is named by the rule it breaks (the message listed every rule for all of them)
    rule = {"parent_not_earlier": "in request 1, node 2's parent 5 is not an earlier node",
            "parent_not_a_node": r"in request 1, node 5's parent 4 is not a node \(parent\[4\] = -1\)",
            "root_has_parent": r"in request 1, node 0 \(the root\) has parent 0 and depth 0, not -1 and 0",
            "depth_wrong": r"in request 1, node 3 has depth 1, its parent \d+ depth 1",
            "depth_above_max": r"in request \d, node \d+ has depth 2, outside \[0, max_depth=1\]",
            "sib_duplicate": r"in request 1, node 0's children \[1, 2\] have sibling orders \[0, 0\], not 0..1",
            "sib_gap": r"in request 1, node 0's children \[1, 2\] have sibling orders \[0, 5\], not 0..1",
            "q_slot_out_of_range": r"in request 1, node 0 has children and q_slot 4, outside \[0, 4\)",
            "q_slot_negative": r"in request 1, node 1 has children and q_slot -2, outside \[0, 4\)"}.get(name)
    assert rule is None or re.search(rule, msg), msg
    assert ("max_depth=1" in msg) if name == "depth_above_max" else ("request(s) [1]" in msg), msg
    assert bool((st.status == 0).all()) and torch.equal(st.step, b["step"])
    assert torch.equal(st.q_state, b["q_state"]) and torch.equal(st.q_kind, b["q_kind"])
    for x, y in zip((tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot, logits), snap):
        assert torch.equal(x, y) or (x.is_floating_point() and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True))

    # the reference (what a device sees): only request 1 returns -1, the others are unaffected
    st_raw = torch.zeros(4, dtype=torch.int32)
    na, path, tok = ref.tree_verify(logits, None, None, tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot,
                                    b["pos"], b["seed"], b["step"], None, b["q_state"], b["q_kind"], st_raw, 1.0, 0,
                                    1.0, tree.max_depth)
    bit = (ref.ERR_TREE_INDEX if name in STRUCTURE_ERRORS else
           ref.ERR_DRAFT_RANGE if name.startswith("token") else ref.ERR_NONFINITE)
    assert int(st_raw[0]) == bit
    if name == "depth_above_max":                          # max_depth is per batch: every request is malformed
        assert bool((na == -1).all())
        return
    assert int(na[1]) == -1 and bool((path[1] == -1).all() and (tok[1] == -1).all())
    clean = sk.JacobiState(b["q_state"].clone(), b["q_kind"].clone(), torch.empty(0), b["seed"].clone(),
                           b["step"].clone(), torch.zeros(4, dtype=torch.int32))
    good = sk.tree_verify(b["logits"], b["tree"], b["pos"], clean, temperature=1.0)
    for r in (0, 2):
        assert int(na[r]) >= 0 and torch.equal(tok[r], good.tokens[r])


@pytest.mark.parametrize("bad_pos", [-5, 2 ** 62 + 1, 2 ** 63 - 1])
def test_pos_out_of_range(monkeypatch, bad_pos):
    """pos outside [0, 2^62], as in jacobi_step: on the CPU an SJDInputError with nothing changed;
    without a host check (a GPU; here the traced path) that request returns -1 and sets status bit
    16, the others are as without it."""
    import sjd_kernels.ops._common as common
    b = _full_batch()

    def state():
        return sk.JacobiState(b["q_state"].clone(), b["q_kind"].clone(), torch.empty(0), b["seed"].clone(),
                              b["step"].clone(), torch.zeros(4, dtype=torch.int32))
    clean = sk.tree_verify(b["logits"], b["tree"], b["pos"], state())
    pos = b["pos"].clone()
    pos[1] = bad_pos
    st = state()
    with pytest.raises(sk.SJDInputError, match=r"pos must be in \[0, 2\^62\]"):
        sk.tree_verify(b["logits"], b["tree"], pos, st)
    assert bool((st.status == 0).all()) and torch.equal(st.step, b["step"])
    monkeypatch.setattr(common, "compiling", lambda: True)
    st = state()
    out = sk.tree_verify(b["logits"], b["tree"], pos, st)
    assert int(out.num_accepted[1]) == -1 and bool((out.path[1] == -1).all() and (out.tokens[1] == -1).all())
    for r in (0, 2):
        assert torch.equal(out.tokens[r], clean.tokens[r]) and torch.equal(out.path[r], clean.path[r])
    assert int(st.status[0]) == 16 and torch.equal(st.step, b["step"] + 1)          # ERR_POS
    with pytest.raises(sk.SJDDeviceError, match="pos outside"):
        sk.check_status(st.status)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERP and triton_available()[0]), reason="needs TRITON_INTERPRET=1")), "cuda_sim"])
def test_temperature_overflow_is_a_nonfinite_row_on_every_backend(backend):
    """Finite logits that a tiny temperature scales past float32 are non-finite rows, as in jacobi_step:
    every backend refuses the request on the CPU and names the nodes, and the reference (the device
    contract) marks only that request."""
    b = _full_batch()
    logits = b["logits"].clone()
    logits[1] *= 30.0                                      # |x| / 1e-38 overflows in request 1 only
    logits[0] *= 1e-30
    logits[2] *= 1e-30
    st = sk.JacobiState(b["q_state"].clone(), b["q_kind"].clone(), torch.empty(0), b["seed"].clone(),
                        b["step"].clone(), torch.zeros(4, dtype=torch.int32))
    ctx = contextlib.nullcontext()
    if backend == "cuda_sim":
        from _util import sim_module
        from sjd_kernels.cuda import sim
        sim_module()
        ctx = sim.simulate("reverse")
    with ctx, pytest.raises(sk.SJDInputError, match=r"request\(s\) \[1\]: non-finite .* at \(request, node\) \[\[1,"):
        sk.tree_verify(logits, b["tree"], b["pos"], st, temperature=1e-38,
                       backend="cuda" if backend == "cuda_sim" else backend)
    assert bool((st.status == 0).all()) and torch.equal(st.step, b["step"])
    t = b["tree"]
    st_raw = torch.zeros(4, dtype=torch.int32)
    na, path, tok = ref.tree_verify(logits, None, None, t.tokens, t.parent, t.depth, t.sib, t.q_slot, b["pos"],
                                    b["seed"], b["step"], None, b["q_state"], b["q_kind"], st_raw, 1e-38, 0, 1.0,
                                    t.max_depth)
    assert int(st_raw[0]) == ref.ERR_NONFINITE and int(na[1]) == -1 and bool((tok[1] == -1).all())
    assert bool((na[[0, 2]] >= 0).all()) and bool((tok[[0, 2], 0] >= 0).all())


def test_nan_row_at_forced_position_is_not_an_error():
    b = _full_batch()
    B = 3
    forced = torch.full((B, 40), -1, dtype=I64)
    forced[torch.arange(B), b["pos"]] = 4                  # the root's children's position
    tree = ref.build_tree(b["tree"].tokens[:, 0], b["pos"], b["seed"], b["step"], b["q_state"], b["q_kind"], 2, 2, 2,
                          forced=forced)
    logits = b["logits"].clone()
    logits[:, 0] = float("nan")
    st = sk.JacobiState(b["q_state"], b["q_kind"], torch.empty(0), b["seed"], b["step"].clone(),
                        torch.zeros(4, dtype=torch.int32))
    out = sk.tree_verify(logits, tree, b["pos"], st, forced=forced)
    assert bool((out.tokens[:, 0] == 4).all() and (out.num_accepted >= 1).all())


def test_argument_errors():
    b = _full_batch()
    st = sk.JacobiState(b["q_state"], b["q_kind"], torch.empty(0), b["seed"], b["step"].clone(),
                        torch.zeros(4, dtype=torch.int32))
    t = b["tree"]
    with pytest.raises(sk.SJDInputError, match="tree.parent"):
        sk.tree_verify(b["logits"], sk.TreeLayout(t.tokens, t.parent.to(torch.int32), t.depth, t.sib, t.q_slot,
                                                  t.max_depth), b["pos"], st)
    with pytest.raises(sk.SJDInputError, match="max_depth"):
        sk.tree_verify(b["logits"], sk.TreeLayout(t.tokens, t.parent, t.depth, t.sib, t.q_slot, 99), b["pos"], st)
    with pytest.raises(sk.SJDInputError, match="tree.tokens must have shape"):
        sk.tree_verify(b["logits"][:, :-1], t, b["pos"], st)
    with pytest.raises(sk.SJDInputError, match="logits must have dtype"):
        sk.tree_verify(b["logits"].to(torch.float64), t, b["pos"], st)
    with pytest.raises(sk.SJDInputError, match="top_k"):
        sk.tree_verify(b["logits"], t, b["pos"], st, top_k=99)
    with pytest.raises(sk.SJDInputError, match="cfg_scale was given without uncond_logits"):
        sk.tree_verify(b["logits"], t, b["pos"], st, cfg_scale=torch.full((t.tokens.shape[0],), 2.0))
    with pytest.raises(sk.SJDInputError, match="K must be"):
        sk.build_tree(st, t.tokens[:, 0], b["pos"], K=0, depth=1, window=2)
    with pytest.raises(sk.SJDInputError, match="depth <= window"):
        sk.build_tree(st, t.tokens[:, 0], b["pos"], K=2, depth=3, window=2)
    with pytest.raises(sk.SJDInputError, match="ring"):
        sk.build_tree(st, t.tokens[:, 0], b["pos"], K=2, depth=2, window=9)
    for bad in (dict(K=True), dict(K=2.0), dict(depth=1.0), dict(window="2")):
        kw = dict(dict(K=2, depth=1, window=2), **bad)
        with pytest.raises(sk.SJDInputError, match="K must be" if "K" in bad else "depth <= window"):
            sk.build_tree(st, t.tokens[:, 0], b["pos"], **kw)
    # a coupled first sibling outside the slice (it would remove its level and every one below); at a
    # forced position ``first`` is not read, so a structural id there is fine
    Bt, V = t.tokens.shape[0], st.q_state.shape[2]
    for bad in (V, -2):
        first = torch.full((Bt, 2), -1, dtype=I64)
        first[Bt - 1, 1] = bad
        with pytest.raises(sk.SJDInputError, match=rf"first: request {Bt - 1}'s level 2 .* holds {bad}, outside"):
            sk.build_tree(st, t.tokens[:, 0], b["pos"], K=2, depth=2, window=2, first=first)
        forced = torch.full((Bt, int(b["pos"].max()) + 3), -1, dtype=I64)
        forced[Bt - 1, int(b["pos"][Bt - 1]) + 1] = V + 1
        sk.build_tree(st, t.tokens[:, 0], b["pos"], K=2, depth=2, window=2, first=first, forced=forced)
    assert int(st.status[0]) == 0


def test_numpy_integers_are_ints():
    """NumPy integers (e.g. from a config array) count as ints for K, depth, window and max_depth, as
    they do for top_k and window elsewhere."""
    np = pytest.importorskip("numpy")
    b = _full_batch()

    def state():
        return sk.JacobiState(b["q_state"].clone(), b["q_kind"].clone(), torch.empty(0), b["seed"].clone(),
                              b["step"].clone(), torch.zeros(4, dtype=torch.int32))
    root = b["tree"].tokens[:, 0]
    t_py = sk.build_tree(state(), root, b["pos"], K=2, depth=2, window=2)
    t_np = sk.build_tree(state(), root, b["pos"], K=np.int64(2), depth=np.int32(2), window=np.int64(2))
    assert type(t_np.max_depth) is int and t_np.max_depth == t_py.max_depth
    for f in ("tokens", "parent", "depth", "sib", "q_slot"):
        assert torch.equal(getattr(t_np, f), getattr(t_py, f)), f
    t_md = sk.TreeLayout(t_py.tokens, t_py.parent, t_py.depth, t_py.sib, t_py.q_slot, np.int64(t_py.max_depth))
    want = sk.tree_verify(b["logits"], t_py, b["pos"], state())
    got = sk.tree_verify(b["logits"], t_md, b["pos"], state())
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.path, want.path)


def test_public_build_tree_equals_reference():
    b = random_batch(B=4, seed=71)
    st = sk.JacobiState(b["q_state"], b["q_kind"], torch.empty(0), b["seed"], b["step"],
                        torch.zeros(4, dtype=torch.int32))
    root = b["tree"].tokens[:, 0].contiguous()
    t1 = sk.build_tree(st, root, b["pos"], K=3, depth=2, window=3)
    t2 = ref.build_tree(root, b["pos"], b["seed"], b["step"], b["q_state"], b["q_kind"], 3, 2, 3)
    for name in ("tokens", "parent", "depth", "sib", "q_slot"):
        assert torch.equal(getattr(t1, name), getattr(t2, name))
    # batch invariance of the drafts
    t3 = ref.build_tree(root[2:3], b["pos"][2:3], b["seed"][2:3], b["step"][2:3], b["q_state"][2:3],
                        b["q_kind"][2:3], 3, 2, 3)
    assert torch.equal(t3.tokens, t1.tokens[2:3])


def test_tree_layout_helpers():
    b = random_batch(B=2, K=2, D=2, W=3, seed=81)
    t = b["tree"]
    cl = torch.tensor([5, 9])
    anc = t.ancestor_mask()
    for r in range(2):
        for i in range(t.num_nodes):
            if not bool(t.valid[r, i]):
                continue
            chain, a = set(), i
            while a >= 0:
                chain.add(a)
                a = int(t.parent[r, a]) if a > 0 else -1
            assert {j for j in range(t.num_nodes) if bool(anc[r, i, j])} == chain
    m = t.attention_mask(cl, 20)
    assert bool(m[0, :, :5].all()) and not bool(m[0, :, 5 + t.num_nodes:].any())
    assert torch.equal(m[1, :, 9:9 + t.num_nodes], anc[1])
    assert torch.equal(t.position_ids(cl)[:, 0], cl) and torch.equal(t.node_slots(cl)[:, 1], cl + 1)


def test_tree_layout_helper_errors():
    """The layout helpers name a bad argument instead of failing deep inside (AttributeError,
    IndexError) or silently cutting the mask short."""
    b = random_batch(B=2, K=2, D=2, W=3, seed=81)
    t = b["tree"]
    N = t.num_nodes
    cl = torch.tensor([5, 9])
    # an int is a cache length for every request
    assert torch.equal(t.position_ids(5), t.position_ids(torch.tensor([5, 5])))
    assert torch.equal(t.node_slots(3)[:, 0], torch.tensor([3, 3]))
    assert torch.equal(t.attention_mask(9, 9 + N), t.attention_mask(torch.tensor([9, 9]), 9 + N))
    for bad, msg in ((torch.tensor([5.0, 9.0]), "cache_len must have dtype int32, int64"),
                     (torch.tensor([5, 9, 1]), "cache_len must have shape \\[2\\]"),
                     (torch.tensor([-1, 9]), "cache_len must be >= 0"), (-3, "cache_len must be >= 0"),
                     ("5", "cache_len must be an int or a \\[B=2\\]"),
                     (torch.tensor([True, False]), "cache_len must have dtype int32, int64")):
        for f in (t.position_ids, t.node_slots, lambda c: t.attention_mask(c, 64)):
            with pytest.raises(sk.SJDInputError, match=msg):
                f(bad)
    # the mask must cover every node slot: kv_len >= cache_len + N for every request
    assert t.attention_mask(cl, 9 + N).shape == (2, N, 9 + N)
    with pytest.raises(sk.SJDInputError, match="too short: request\\(s\\) \\[1\\]"):
        t.attention_mask(cl, 8 + N)
    for kv_len in (N - 1, 20.0, None):
        with pytest.raises(sk.SJDInputError, match="kv_len"):
            t.attention_mask(torch.tensor([0, 0]), kv_len)
    # rows: request indices in [0, B)
    assert torch.equal(t.rows([1, 0]).tokens, t.tokens.flip(0))
    for idx, msg in ((torch.tensor([0, 2]), "\\[0, B=2\\)"), (torch.tensor([-1]), "\\[0, B=2\\)"),
                     (torch.tensor([[0, 1]]), "rows: index must be 1-D"),
                     (torch.tensor([0.0]), "rows: index must have dtype int32, int64"),
                     (["a"], "request indices")):
        with pytest.raises(sk.SJDInputError, match=msg):
            t.rows(idx)


@pytest.mark.parametrize("where", ["q_state_nan", "q_state_neg", "q_state_inf", "q_kind"])
def test_corrupt_state_is_refused_on_the_cpu(where):
    """A state whose stored laws are no probabilities (or whose kinds are unknown) cannot give the
    drafts a law: ``build_tree``, ``tree_verify`` and ``jacobi_step`` refuse it on the CPU, naming
    the (request, slot), and change nothing."""
    b = _full_batch()
    st = sk.JacobiState(b["q_state"].clone(), b["q_kind"].clone(), torch.empty(0), b["seed"], b["step"].clone(),
                        torch.zeros(4, dtype=torch.int32))
    t = b["tree"]
    if where == "q_kind":
        st.q_kind[1, 2] = 3
        msg = "q_kind holds unknown kinds \\[3\\] at \\(request, slot\\) \\[\\[1, 2\\]\\]"
    else:
        st.q_state[1, 2, 3] = {"q_state_nan": float("nan"), "q_state_neg": -0.25, "q_state_inf": float("inf")}[where]
        msg = "q_state holds NaN, infinite or negative values at \\(request, slot\\) \\[\\[1, 2\\]\\]"
    bits = lambda: [x.clone() for x in (st.q_state.view(torch.int32), st.q_kind, st.step, st.status)]  # noqa: E731
    snap = bits()
    with pytest.raises(sk.SJDInputError, match=msg):
        sk.tree_verify(b["logits"], t, b["pos"], st)
    with pytest.raises(sk.SJDInputError, match=msg):
        sk.build_tree(st, t.tokens[:, 0].contiguous(), b["pos"], K=2, depth=1, window=2)
    B, R, V = st.q_state.shape
    W = R - 1
    with pytest.raises(sk.SJDInputError, match=msg):
        sk.jacobi_step(torch.zeros(B, W + 1, V), torch.zeros(B, W, dtype=I64), torch.zeros(B, dtype=I64), b["pos"],
                       st)
    assert all(torch.equal(x, y) for x, y in zip(bits(), snap)), "a refused call changed the state"


def test_opcheck_registration():
    """Schema, fake kernels and autograd registration of the three tree ops (``torch.library.opcheck``)."""
    b = random_batch(B=3, seed=91)
    t = b["tree"]
    st = torch.zeros(4, dtype=torch.int32)
    args = (b["logits"], None, None, t.tokens, t.parent, t.depth, t.sib, t.q_slot, b["pos"], b["seed"], b["step"],
            None, b["q_state"], b["q_kind"], st, 0.9, 0, 1.0, t.max_depth, 1)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.sjd.tree_verify.default, args, test_utils=tests)
    kv = torch.randn(2, 2, 3, 2, 16, 8)
    path, cl = torch.tensor([[0, 2, 3, -1]] * 3), torch.tensor([0, 1, 2])
    torch.library.opcheck(torch.ops.sjd.tree_kv_update.default, (kv, path, cl, torch.zeros(4, dtype=torch.int32), 1),
                          test_utils=tests[:2])
    ks, vs = [kv[0, 0].clone(), kv[1, 0].clone()], [kv[0, 1].clone(), kv[1, 1].clone()]
    torch.library.opcheck(torch.ops.sjd.tree_kv_update_list.default,
                          (ks, vs, path, cl, None, torch.zeros(4, dtype=torch.int32), 1), test_utils=tests[:2])
