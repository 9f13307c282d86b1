"""Multi-step law harness of tree drafting + ``tree_verify`` (used by ``test_tree_verify``).

A synthetic "model" is a table from prefix to logits row. B requests with distinct seeds run
steps until each has committed at least ``L`` tokens: every step draws a tree with
``reference.tree.build_tree`` from per-position proposal laws (dense rows with zeros, uniform, or
one-hot at a given first token), optionally couples the first sibling of every level to an old
draft, evaluates every node's row from the table (prefix = committed tokens + the node's path) and
verifies with the op under test. ``extra={"forced": {position: id}}`` forces ids at absolute positions
(``"nan_forced_rows": True`` also makes the rows that are the target of a forced position NaN). The first ``L`` committed tokens must follow the exact AR law,
computed in float64 from the same table by independent code (``stats.target_law64``).

Mutations (SPEC section 3, tree traps) are switched on here, outside the package:
``siblings_from_resid``: siblings after a coupled first one drawn from the coupling residual
``max(0, T - Q_old)`` (their stored law still says ``T`` without the first);
``undepleted_q``: verification uses the undepleted proposal ``q`` instead of ``q_k`` (ratio and
residual), by replacing ``reference.tree._sibling_law``.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from sjd_kernels import rng
from sjd_kernels.reference import tree as T
from sjd_kernels.reference.jacobi_step import KIND_DENSE, KIND_ONEHOT, KIND_UNIFORM

import stats


@dataclass
class Case:
    name: str
    V: int
    K: int
    D: int
    W: int
    L: int                    # committed tokens whose joint law is tested
    n: int                    # requests (samples)
    seed: int
    kinds: tuple = (KIND_DENSE,)     # proposal kind per absolute position (cycled)
    coupled: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg: float | None = None
    zero_frac: float = 0.4    # fraction of zeros in dense proposal rows
    sharp: float = 2.0        # logit scale of the table
    extra: dict = field(default_factory=dict)


def _prefix_offsets(V, L):
    off = [0]
    for ln in range(L):
        off.append(off[-1] + V ** ln)
    return off                 # prefixes of length ln start at off[ln]; off[L] rows in all


class Table:
    """Logits rows for every prefix of length < L (longer prefixes use their first L-1 tokens)."""

    def __init__(self, case: Case, g: torch.Generator):
        V, L = case.V, case.L
        self.V, self.L = V, L
        self.off = _prefix_offsets(V, L)
        nrow = self.off[L]
        self.cond = (torch.randn(nrow, V, generator=g) * case.sharp).to(torch.float32)
        # a few rows with a dominant token, a few with near ties
        self.cond[::3, 0] += 3.0
        self.cond[1::4] = self.cond[1::4] * 0.05
        self.uncond = (torch.randn(nrow, V, generator=g) * case.sharp).to(torch.float32) if case.cfg else None

    def code(self, seq: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Row index of prefixes ``seq[..., :length]`` (truncated to L-1 tokens)."""
        V, L = self.V, self.L
        ln = length.clamp(max=L - 1)
        t = torch.arange(seq.shape[-1])
        w = torch.where(t < ln.unsqueeze(-1), seq.clamp(min=0) * (V ** t.clamp(max=L)), torch.zeros_like(seq))
        off = torch.tensor(self.off)[ln]
        return off + w.sum(-1)

    def exact_law(self, case: Case) -> np.ndarray:
        """float64 law of the first L tokens over all V**L sequences (mixed radix, token t weight V**t)."""
        V, L = self.V, self.L
        P64 = stats.target_law64(self.cond.numpy(), case.temperature, case.top_k, case.top_p,
                                 uncond=None if self.uncond is None else self.uncond.numpy(), cfg=case.cfg)
        forced = case.extra.get("forced", {})
        law = np.zeros(V ** L)
        for seq in itertools.product(range(V), repeat=L):
            pr = 1.0
            for t in range(L):
                if t in forced:                       # a forced position: one-hot at the forced id
                    pr *= float(seq[t] == forced[t])
                    continue
                code = self.off[t] + sum(seq[i] * V ** i for i in range(t))
                pr *= P64[code, seq[t]]
            law[sum(seq[i] * V ** i for i in range(L))] = pr
        return law


def _proposal_bank(case: Case, npos: int, g: torch.Generator):
    V = case.V
    dense = torch.rand(npos, V, generator=g) ** 2
    dense = dense * (torch.rand(npos, V, generator=g) >= case.zero_frac)
    dense[:, int(torch.randint(0, V, (1,), generator=g))] += 0.05        # never all zero
    dense = dense / dense.sum(-1, keepdim=True)
    kinds = torch.tensor([case.kinds[p % len(case.kinds)] for p in range(npos)], dtype=torch.int32)
    old = torch.rand(npos, V, generator=g) ** 3                           # laws of the old drafts (coupling)
    old = old / old.sum(-1, keepdim=True)
    return dense.to(torch.float32), kinds, old.to(torch.float32)


def _race(w, E):
    return rng.race(w, E)


def coupled_first(case, bank, kinds, old, seed, posd, step):
    """First-sibling tokens ``[B]`` of the level at absolute position ``posd`` and the levels' laws T.

    Old draft y ~ Q_old (stream DRAFT), kept iff ``u Q_old(y) < T(y)`` (stream COUPLE), else a draw from
    ``max(0, T - Q_old)`` (stream COUPLE_RES; zero mass: from T). The result has law T. One-hot levels
    use the token ``(7 * posd + 3) % V`` (deterministic, its own law).
    """
    V = case.V
    kind = kinds[posd]
    Tlaw = torch.where((kind == KIND_UNIFORM).unsqueeze(-1), torch.full_like(bank[posd], 1.0 / V), bank[posd])
    Qo = old[posd]
    E0 = rng.exponential(rng.lane_words(seed, posd, step, rng.STREAM_DRAFT, V))
    y = _race(Qo, E0)
    u = rng.uniform24(rng.four_words(seed, posd, step, rng.STREAM_COUPLE)[..., 0])
    yc = y.clamp(min=0).unsqueeze(-1)
    keep = u * torch.gather(Qo, -1, yc).squeeze(-1) < torch.gather(Tlaw, -1, yc).squeeze(-1)
    E1 = rng.exponential(rng.lane_words(seed, posd, step, rng.STREAM_COUPLE_RES, V))
    resid = torch.clamp(Tlaw - Qo, min=0.0)
    r = _race(resid, E1)
    r = torch.where(r < 0, _race(Tlaw, E1), r)
    tok = torch.where(keep, y, r)
    tok = torch.where(kind == KIND_ONEHOT, (7 * posd + 3) % V, tok)
    return tok, Tlaw, Qo


def run(case: Case, verify=None, mutation: str | None = None, n: int | None = None, return_steps: bool = False):
    """Committed-token codes ``[n]`` (first L tokens, mixed radix) and the table."""
    verify = verify or T.tree_verify
    if mutation == "undepleted_q":
        with _undepleted_q():
            return run(case, verify, None, n, return_steps)
    n = n or case.n
    g = torch.Generator().manual_seed(case.seed)
    table = Table(case, g)
    V, K, D, W, L = case.V, case.K, case.D, case.W, case.L
    npos = L + W + 2
    bank, kinds, old = _proposal_bank(case, npos, g)
    R = W + 1
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g)
    step = torch.randint(0, 1000, (n,), generator=g)
    cap = L + W + 1
    committed = torch.full((n, cap), -1, dtype=torch.int64)
    count = torch.zeros(n, dtype=torch.int64)
    q_state = torch.zeros(n, R, V)
    q_kind = torch.zeros(n, R, dtype=torch.int32)
    status = torch.zeros(4, dtype=torch.int32)
    _, _, _, levels = T.tree_template(K, D, W)
    forced = None
    if case.extra.get("forced"):
        forced = torch.full((n, npos + W + 1), -1, dtype=torch.int64)
        for p_, t_ in case.extra["forced"].items():
            forced[:, p_] = t_
    steps = 0
    ar = torch.arange(n)
    while bool((count < L).any()):
        steps += 1
        pos = count.clone()
        # ring: the law of position p in slot p % R
        first = torch.full((n, W), -1, dtype=torch.int64)
        Tl, Qo_l = {}, {}
        for d in range(1, W + 1):
            pd = (pos + d - 1).clamp(max=npos - 1)
            slot = (pos + d - 1) % R
            q_state[ar, slot] = bank[pd]
            q_kind[ar, slot] = kinds[pd]
            if case.coupled or bool((kinds[pd] == KIND_ONEHOT).any()):
                tok, Tlaw, Qo = coupled_first(case, bank, kinds, old, seeds, pd, step)
                if case.coupled:
                    first[:, d - 1] = tok
                else:
                    first[:, d - 1] = torch.where(kinds[pd] == KIND_ONEHOT, tok, first[:, d - 1])
                Tl[d], Qo_l[d] = Tlaw, Qo
        root = torch.where(count > 0, committed[ar, (count - 1).clamp(min=0)], torch.zeros_like(count))
        tree = T.build_tree(root, pos, seeds, step, q_state, q_kind, K, D, W, first=first, forced=forced)
        if mutation == "siblings_from_resid":
            _siblings_from_resid(tree, levels, case, Tl, Qo_l, seeds, pos, step, first)
        # node rows from the table: prefix = committed + the node's path
        N = tree.num_nodes
        anc_tok = torch.full((n, N, W + 1), -1, dtype=torch.int64)     # token at depth t of node i's path
        for i in range(N):
            p = tree.parent[:, i]
            if i > 0:
                anc_tok[:, i] = anc_tok[ar, p.clamp(min=0)]
            dep = tree.depth[:, i].clamp(min=0)
            anc_tok[ar, i, dep] = torch.where(tree.depth[:, i] >= 0, tree.tokens[:, i], anc_tok[ar, i, dep])
        Lm = L - 1
        tpos = torch.arange(max(Lm, 1))
        seq = torch.full((n, N, max(Lm, 1)), 0, dtype=torch.int64)
        cm = count.view(n, 1, 1)
        from_comm = tpos.view(1, 1, -1) < cm
        ci = tpos.view(1, 1, -1).expand(n, N, -1).clamp(max=cap - 1)
        seq_c = torch.gather(committed.view(n, 1, cap).expand(n, N, cap), 2, ci)
        di = (tpos.view(1, 1, -1) - cm + 1).clamp(0, W).expand(n, N, -1)
        seq_t = torch.gather(anc_tok, 2, di)
        seq = torch.where(from_comm, seq_c, seq_t)
        length = count.view(n, 1) + tree.depth.clamp(min=0)
        codes = table.code(seq, length)
        logits = table.cond[codes]
        unc = table.uncond[codes] if table.uncond is not None else None
        if forced is not None and case.extra.get("nan_forced_rows"):
            # rows whose children's position is forced are never read: make them NaN
            fr = T._forced_at(forced, count.view(n, 1) + tree.depth.clamp(min=0)) >= 0
            logits = torch.where(fr.unsqueeze(-1), torch.full_like(logits, float("nan")), logits)
        cfg = torch.full((n,), float(case.cfg), dtype=torch.float32) if case.cfg else None
        na, path, toks = verify(logits, unc, cfg, tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot, pos,
                                seeds, step, forced, q_state, q_kind, status, case.temperature, case.top_k,
                                case.top_p, tree.max_depth)
        assert int(status[0]) == 0, f"status {status.tolist()}"
        assert bool((na >= 0).all())
        k = na + 1
        j = torch.arange(toks.shape[1])
        dst = (count.view(n, 1) + j).clamp(max=cap - 1)
        w = (j.view(1, -1) < k.view(n, 1)) & (count.view(n, 1) + j < cap)
        committed.scatter_(1, torch.where(w, dst, torch.full_like(dst, cap - 1)),
                           torch.where(w, toks, torch.gather(committed, 1, torch.full_like(dst, cap - 1))))
        count = torch.where(count < L, count + k, count)
        step = step + 1
    x = committed[:, :L]
    codes = (x * (V ** torch.arange(L))).sum(-1)
    if return_steps:
        return codes.numpy(), table, steps
    return codes.numpy(), table


@contextlib.contextmanager
def _undepleted_q():
    """Mutation: every sibling verified against the base law ``q`` (earlier siblings not removed)."""
    orig = T._sibling_law

    def undepleted(q, keep):
        return orig(q, torch.ones_like(keep))

    T._sibling_law = undepleted
    try:
        yield
    finally:
        T._sibling_law = orig


MUTATIONS = ("siblings_from_resid", "undepleted_q")


def _siblings_from_resid(tree, levels, case, Tl, Qo_l, seeds, pos, step, first):
    """Mutation: siblings 2.. of coupled levels drawn from ``max(0, T - Q_old)`` (first removed)."""
    V = case.V
    n = tree.tokens.shape[0]
    lanes = torch.arange(V)
    for d in range(1, min(case.D, case.W) + 1):
        if d not in Tl:
            continue
        res = torch.clamp(Tl[d] - Qo_l[d], min=0.0)
        fst = first[:, d - 1]
        res = torch.where(lanes.view(1, V) == fst.view(n, 1), torch.zeros_like(res), res)
        by_parent = {}
        for node, a in levels[d]:
            by_parent.setdefault(a, []).append(node)
        for a, kids in by_parent.items():
            E = T.sibling_noise(seeds, pos + d - 1, step, a, V)
            key = torch.where(res > 0, res / E, torch.full_like(res, -1.0))
            order = torch.sort(key, dim=-1, descending=True, stable=True).indices
            for k, node in enumerate(kids[1:]):
                if k >= V:
                    break
                ok = (torch.gather(res, 1, order[:, k:k + 1]).squeeze(1) > 0) & (tree.parent[:, node] >= 0)
                tree.tokens[:, node] = torch.where(ok, order[:, k], tree.tokens[:, node])


def law_check(case: Case, verify=None, mutation=None, n=None):
    """``stats.LawResult`` of the committed-token law of ``case`` (no assertion)."""
    codes, table = run(case, verify, mutation, n)
    law = table.exact_law(case)
    counts = np.bincount(codes, minlength=law.size)
    return stats.chisq_gof(counts, law, f"{case.name}{'/' + mutation if mutation else ''}")
