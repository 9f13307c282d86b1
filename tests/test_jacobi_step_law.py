"""The committed-token law of ``jacobi_step`` equals the exact float64 AR law (SPEC sections 3, 4, 9).

Every check is a chi-square goodness-of-fit test against a law computed independently in
float64 (``stats.target_law64``, exact enumeration for sequences), with false-alarm rate
``stats.ALPHA = 1e-6`` per check and a sample size giving power >= 0.99 to detect an absolute
error of 0.02 in any cell (asserted in ``_assert_all``). Requests are simulated as one
large vectorised batch, each request with its own seed, position and step.

The checks are functions of the step implementation (the raw reference signature), so
``test_jacobi_step_mutations`` runs the very same checks on deliberately broken variants:

- ``first_token_checks``: one step, random logits, adversarial stored laws; the law of the
  first committed token is ``P[0]``.
- ``prefix_joint_checks``: one step on a prefix-to-row table (row j is computed from the drafts
  ``D[0:j]``), then exact AR completion: the joint law of the first 3 tokens.
- ``sequence_checks``: several steps of a synthetic table "model", feeding ``next_drafts`` and
  the state back; the law of the whole sequence against exact enumeration.
- ``gumbel_jacobi_mismatches`` / ``greedy_mismatches``: deterministic oracles, token for token.

Set ``SJD_LAW_BACKENDS=torch,triton,cuda`` (default ``torch``) to run the checks on other
backends through the public op; tensors go to ``SJD_LAW_DEVICE`` (default cuda for them).
"""
from __future__ import annotations

import contextlib
import os
import sys
import zlib

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import stats  # noqa: E402

import sjd_kernels as sk  # noqa: E402
from sjd_kernels import rng  # noqa: E402
from sjd_kernels.reference import jacobi_step as ref  # noqa: E402
from sjd_kernels.reference.target import target_probs  # noqa: E402

I64 = torch.int64
MODE_NAMES = {ref.MODE_SJD: "sjd", ref.MODE_COUPLING: "coupling", ref.MODE_GUMBEL: "gumbel",
              ref.MODE_GUMBEL_JACOBI: "gumbel_jacobi"}

# name -> (mode, beta, vp_form, state has p_prev)
MODE_SPECS = {
    "sjd": (ref.MODE_SJD, 0.0, ref.VP_ADD, False),
    "vp_add_b0": (ref.MODE_SJD, 0.0, ref.VP_ADD, True),
    "vp_add_b0.5": (ref.MODE_SJD, 0.5, ref.VP_ADD, True),
    "vp_add_b2": (ref.MODE_SJD, 2.0, ref.VP_ADD, True),
    "vp_log_b0.5": (ref.MODE_SJD, 0.5, ref.VP_LOG, True),
    "vp_log_b1": (ref.MODE_SJD, 1.0, ref.VP_LOG, True),
    "vp_log_b2": (ref.MODE_SJD, 2.0, ref.VP_LOG, True),
    "coupling": (ref.MODE_COUPLING, 0.0, ref.VP_ADD, False),
    "coupling_vp_add_b0.5": (ref.MODE_COUPLING, 0.5, ref.VP_ADD, True),
    "gumbel": (ref.MODE_GUMBEL, 0.0, ref.VP_ADD, False),
    "gumbel_jacobi": (ref.MODE_GUMBEL_JACOBI, 0.0, ref.VP_ADD, False),
}
SINGLE_STEP_MODES = list(MODE_SPECS)
SEQUENCE_MODES = ["sjd", "vp_add_b0.5", "vp_log_b1", "coupling", "coupling_vp_add_b0.5", "gumbel"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: torch runs single-threaded


# ----------------------------------------------------------------------------- implementations

def public_impl(backend: str = "torch", device: str = "cpu", chunk: int = 0):
    """The public op ``sjd_kernels.jacobi_step`` behind the raw reference signature.

    Tensors move to ``device`` and the mutated state is copied back. ``chunk > 0`` splits the batch
    into calls of at most ``chunk`` requests (exact: a request's numbers depend on its own seed and
    state only), for backends whose launch grids cannot take the test batches (B up to 170 000).
    """
    dev = torch.device(device)

    def step(logits, uncond, cfg_scale, drafts, win_len, pos, seed, stp, forced, q_state, q_kind, p_prev, status,
             temperature, top_k, top_p, mode, beta, vp_form, vp_eps, tail_init, q_idx=None):
        B = logits.shape[0]
        size = chunk if chunk > 0 else B
        outs = []
        for a in range(0, B, size):
            sl = slice(a, min(B, a + size))
            cut = lambda t: None if t is None else t[sl].to(dev)
            qs, qk = cut(q_state), cut(q_kind)
            pp = cut(p_prev) if p_prev.numel() else p_prev.to(dev)
            stt = torch.zeros_like(status, device=dev)
            qi = cut(q_idx) if q_idx is not None else None
            st = sk.JacobiState(qs, qk, pp, cut(seed), cut(stp), stt, q_idx=qi, vocab_size=logits.shape[2])
            out = sk.jacobi_step(cut(logits), cut(drafts), cut(win_len), cut(pos), st, uncond_logits=cut(uncond),
                                 cfg_scale=cut(cfg_scale), forced=cut(forced), temperature=temperature, top_k=top_k,
                                 top_p=top_p, mode=MODE_NAMES[mode], beta=beta,
                                 vp_form="add" if vp_form == ref.VP_ADD else "log", vp_eps=vp_eps,
                                 tail_init="uniform" if tail_init == ref.TAIL_UNIFORM else "left",
                                 backend=backend, advance=False)
            q_state[sl] = qs.cpu()
            q_kind[sl] = qk.cpu()
            if qi is not None:
                q_idx[sl] = qi.cpu()
            if p_prev.numel():
                p_prev[sl] = pp.cpu()
            stt = stt.cpu()
            status[0] |= stt[0]
            status[1:] += stt[1:]
            outs.append([t.cpu() for t in (out.num_accepted, out.tokens, out.next_drafts)])
        return tuple(torch.cat(ts, 0) for ts in zip(*outs))
    step.__name__ = f"public_{backend}"
    return step


def law_backends():
    """``SJD_LAW_BACKENDS`` (default torch); other backends on ``SJD_LAW_DEVICE`` (default cuda) in chunks
    of ``SJD_LAW_CHUNK`` requests (default 32768)."""
    names = [b.strip() for b in os.environ.get("SJD_LAW_BACKENDS", "torch").split(",") if b.strip()]
    out = []
    for b in names:
        dev = os.environ.get("SJD_LAW_DEVICE", "cpu" if b == "torch" else "cuda")
        chunk = 0 if b == "torch" else int(os.environ.get("SJD_LAW_CHUNK", "32768"))
        out.append(pytest.param(public_impl(b, dev, chunk), id=b))
    return out


IMPLS = law_backends()


def _label_seed(label: str) -> int:
    """A seed offset fixed by a case's label, so running a subset of cases draws the same samples."""
    return zlib.crc32(label.encode()) % 1000


def _new_state(B, R, V, vp):
    q_state = torch.zeros(B, R, V, dtype=torch.float32)
    q_kind = torch.full((B, R), ref.KIND_UNIFORM, dtype=torch.int32)
    p_prev = torch.zeros(B, R, V, dtype=torch.float32) if vp else torch.empty(0, dtype=torch.float32)
    return q_state, q_kind, p_prev, torch.zeros(4, dtype=torch.int32)


def _gumbel_draw(Q32: torch.Tensor, seed, position) -> torch.Tensor:
    """Draw from ``Q32 [B, V]`` with the position-keyed Gumbel noise, exactly as the gumbel mode drafts."""
    E = rng.exponential(rng.lane_words(seed, position, torch.zeros_like(position), rng.STREAM_GUMBEL, Q32.shape[-1]))
    return rng.race(Q32, E)


def _check_outputs(na, tok, nd, win, V, label):
    assert (na >= 0).all() and (na <= win).all(), f"{label}: num_accepted outside [0, win_len]"
    W1 = tok.shape[1]
    jj = torch.arange(W1).view(1, W1)
    used = jj <= na.view(-1, 1)
    assert ((tok >= 0) & (tok < V))[used].all(), f"{label}: committed token outside [0, V)"
    assert (tok[~used] == -1).all(), f"{label}: tokens after the commit are not -1"
    assert ((nd >= 0) & (nd < V)).all(), f"{label}: next draft outside [0, V)"


# ----------------------------------------------------------------------------- single step: first token

V1, W1D = 6, 2            # vocabulary and window of the single-step first-token checks
N1 = stats.required_n(V1) + 1500


def _draft_law(name, P, rs):
    """Stored law of one row: ``(kind, Q float32 [V] or None, one-hot token)``. ``P`` float64 target row."""
    V = P.size
    sup = np.flatnonzero(P > 0)
    if name == "uniform_flag":
        return ref.KIND_UNIFORM, None, -1
    if name == "uniform_dense":
        return ref.KIND_DENSE, np.full(V, 1.0 / V, np.float32), -1
    if name == "onehot_kind_rare":                 # stored law one-hot at the least likely token of the support
        return ref.KIND_ONEHOT, None, int(sup[np.argmin(P[sup])])
    if name == "onehot_dense_zeroP":               # one-hot where the target is zero (or the rarest token)
        zero = np.flatnonzero(P == 0)
        t = int(zero[0]) if zero.size else int(np.argmin(P))
        q = np.zeros(V, np.float32)
        q[t] = 1.0
        return ref.KIND_DENSE, q, -1
    if name == "onehot_mode":                      # one-hot at the mode: residual mass = 1 - max P (small)
        q = np.zeros(V, np.float32)
        q[int(np.argmax(P))] = 1.0
        return ref.KIND_DENSE, q, -1
    if name == "near":                             # close to P: <= 0.03 of mass moved from the 2nd token to the mode
        q = P.copy()
        order = np.argsort(-P)
        a, b = int(order[0]), int(order[1])
        d = min(0.03, 0.75 * P[b])
        q[a] += d
        q[b] -= d
        return ref.KIND_DENSE, q.astype(np.float32), -1
    if name == "far":                              # anti-correlated with P, positive everywhere
        q = 1.0 / (P + 0.02)
        return ref.KIND_DENSE, (q / q.sum()).astype(np.float32), -1
    if name == "zeros_where_P_pos":                # mass only on the less likely half of the support (+ off-support)
        order = np.argsort(P)
        q = np.zeros(V)
        q[order[: max(1, V // 2)]] = rs.uniform(0.5, 1.5, size=max(1, V // 2))
        return ref.KIND_DENSE, (q / q.sum()).astype(np.float32), -1
    if name == "decoy":                            # most mass on the 3rd token, the rest uneven on the 1st and 2nd
        order = np.argsort(-P)
        q = np.zeros(V)
        q[order[2]], q[order[0]], q[order[1]] = 0.7, 0.28, 0.02
        return ref.KIND_DENSE, q.astype(np.float32), -1
    if name == "equal":                            # Q = P: always accepted
        return ref.KIND_DENSE, P.astype(np.float32), -1
    raise KeyError(name)


# (label, temperature, top_k, top_p, cfg scale or None, logits, draft laws of the cases in this group).
# logits: the scale of random normal logits, or the name of a designed row (permuted, jittered):
# "peaked" (mode about 0.955, so a one-hot draft at the mode leaves residual mass below 0.05: where a
# residual that falls back to P is most visible); "decoy" (with the "decoy" draft law, a rejected
# draft's noise says much about the residual lanes: where reusing the draft's Gumbel noise in the
# residual is most visible).
FIRST_TOKEN_GROUPS = [
    ("plain", 1.0, 0, 1.0, None, 1.5, ["uniform_flag", "far", "equal", "onehot_kind_rare"]),
    ("topk3_T0.7", 0.7, 3, 1.0, None, 1.5, ["uniform_dense", "onehot_dense_zeroP", "zeros_where_P_pos"]),
    ("topp0.9_T1.3_cfg2", 1.3, 0, 0.9, 2.0, 0.6, ["far", "zeros_where_P_pos", "onehot_dense_zeroP"]),
    ("peaked", 1.0, 0, 1.0, None, "peaked", ["onehot_mode", "near", "uniform_flag"]),
    ("decoy", 1.0, 0, 1.0, None, "decoy", ["decoy", "far"]),
]
DESIGNED_ROWS = {"peaked": np.log([0.955, 0.02, 0.01, 0.008, 0.005, 0.002]),
                 "decoy": np.log([0.1, 0.57, 0.32, 0.004, 0.003, 0.003])}


def _group_logits(rs, C, W, V, scale):
    if not isinstance(scale, str):
        return torch.from_numpy(rs.standard_normal((C, W + 1, V)).astype(np.float32) * scale)
    base = DESIGNED_ROWS[scale]
    rows = np.stack([[rs.permutation(base) + rs.normal(0, 0.05, V) for _ in range(W + 1)] for _ in range(C)])
    return torch.from_numpy(rows.astype(np.float32))


def first_token_checks(impl, spec: str, n: int = N1, seed0: int = 1000, groups=None):
    """One step per group of cases; returns a ``LawResult`` per case (law of the first committed token)."""
    mode, beta, form, vp = MODE_SPECS[spec]
    V, W = V1, W1D
    R = W + 1
    results = []
    for glabel, T, k, p, cfg, scale, laws in groups or FIRST_TOKEN_GROUPS:
        gi = _label_seed(glabel)
        rs = np.random.RandomState(seed0 + gi)
        gen = torch.Generator().manual_seed(seed0 + gi)
        C = len(laws)
        B = C * n
        cond = _group_logits(rs, C, W, V, scale)
        unc = _group_logits(rs, C, W, V, scale) if cfg else None
        P64 = stats.target_law64(cond.numpy(), T, k, p, None if unc is None else unc.numpy(), cfg)
        pos = torch.from_numpy(rs.randint(0, 50, B)).to(I64)
        seed = torch.arange(B, dtype=I64) + (seed0 + gi) * 10_000_000
        stp = torch.from_numpy(rs.randint(0, 8, B)).to(I64)
        q_state, q_kind, p_prev, status = _new_state(B, R, V, vp)
        drafts = torch.zeros(B, W, dtype=I64)
        bi = torch.arange(B)
        for c, law in enumerate(laws):
            sl = slice(c * n, (c + 1) * n)
            for j in range(W):
                kind, Q, tok = _draft_law(law, P64[c, j], rs)
                slot = (pos[sl] + j) % R
                flag = ref.FLAG_PREV if vp else 0
                q_kind[bi[sl], slot] = kind | flag
                if vp:
                    prev = rs.dirichlet(np.ones(V)).astype(np.float32)
                    p_prev[bi[sl], slot] = torch.from_numpy(prev)
                if kind == ref.KIND_DENSE:
                    Qt = torch.from_numpy(Q)
                    q_state[bi[sl], slot] = Qt
                    if mode in (ref.MODE_GUMBEL, ref.MODE_GUMBEL_JACOBI):
                        d = _gumbel_draw(Qt.expand(n, V), seed[sl], pos[sl] + j)
                    else:
                        d = torch.multinomial(Qt.double().expand(n, V), 1, replacement=True, generator=gen)[:, 0]
                elif kind == ref.KIND_UNIFORM:
                    d = torch.randint(0, V, (n,), generator=gen)
                else:
                    d = torch.full((n,), tok, dtype=I64)
                drafts[sl, j] = d
        rep = lambda t: t.repeat_interleave(n, 0)
        logits = rep(cond)
        uncond = rep(unc) if unc is not None else None
        cfg_t = torch.full((B,), float(cfg), dtype=torch.float32) if cfg else None
        win = torch.full((B,), W, dtype=I64)
        na, tok, nd = impl(logits, uncond, cfg_t, drafts, win, pos, seed, stp, None, q_state, q_kind, p_prev,
                           status, T, k, p, mode, beta, form, 1e-6, ref.TAIL_UNIFORM)
        _check_outputs(na, tok, nd, win, V, f"{spec}/{glabel}")
        assert int(status[0]) == 0, f"{spec}/{glabel}: status error {status.tolist()}"
        first = tok[:, 0].numpy()
        for c, law in enumerate(laws):
            r = stats.chisq_gof(np.bincount(first[c * n:(c + 1) * n], minlength=V), P64[c, 0],
                                f"{spec}/{glabel}/{law}/first-token")
            results.append(r)
    return results


# ----------------------------------------------------------------------------- single step: joint of 3 tokens

def _prefix_offsets(V, L):
    return np.concatenate([[0], np.cumsum(V ** np.arange(L))])   # offset of prefixes of length l


def _prefix_codes(seq: torch.Tensor, V: int, L: int) -> torch.Tensor:
    """Code of every prefix ``seq[:, :l]`` for l = 0..seq.shape[1]: ``[B, len+1]`` (rows of the table)."""
    B, n = seq.shape
    off = torch.from_numpy(_prefix_offsets(V, max(L, n + 1))).to(I64)
    pw = V ** torch.arange(n, dtype=I64)
    cum = torch.cat([torch.zeros(B, 1, dtype=I64), torch.cumsum(seq.clamp(min=0) * pw, 1)], 1)
    return off[: n + 1].view(1, -1) + cum


class TableModel:
    """A synthetic "model": a table from prefix (tokens at positions < l) to the logits row of position l.

    Rows for positions >= L are zero logits. ``law(T, k, p)`` enumerates the exact AR law of
    the length-L sequence in float64 (cells ``stats.sequence_codes``).
    """

    def __init__(self, V, L, seed, scale=2.0, rows=None):
        self.V, self.L = V, L
        n = int(_prefix_offsets(V, L)[L])
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(n + 1, V, generator=g) * scale if rows is None else rows.clone()
        self.logits[n] = 0.0                                   # the row of every position >= L

    def rows(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits of position ``lengths[b, i]`` given the prefix ``seq[b, :lengths[b, i]]``: ``[B, I, V]``."""
        codes = _prefix_codes(seq, self.V, self.L)               # [B, S+1]
        c = torch.gather(codes, 1, lengths.clamp(max=codes.shape[1] - 1))
        c = torch.where(lengths < self.L, c, torch.full_like(c, self.logits.shape[0] - 1))
        return self.logits[c]

    def cond_law(self, prefix_codes: np.ndarray, T, k, p):
        return stats.target_law64(self.logits.numpy()[prefix_codes], T, k, p)

    def law(self, T, k, p, forced=None):
        V, L = self.V, self.L
        seqs = np.array(np.meshgrid(*[np.arange(V)] * L, indexing="ij")).reshape(L, -1).T   # [V^L, L]
        prob = np.ones(seqs.shape[0])
        off = _prefix_offsets(V, L)
        for l in range(L):
            code = off[l] + (seqs[:, :l] * (V ** np.arange(l))).sum(1)
            if forced is not None and forced[l] >= 0:
                prob *= (seqs[:, l] == forced[l])
            else:
                Pl = self.cond_law(code, T, k, p)
                prob *= Pl[np.arange(seqs.shape[0]), seqs[:, l]]
        cells = stats.sequence_codes(seqs, V)
        out = np.zeros(V ** L)
        out[cells] = prob
        return out


VJ, WJ, KJ = 3, 2, 3           # joint checks: vocabulary, window, tokens in the joint law
NJ = stats.required_n(VJ ** KJ) + 1500
JOINT_CASES = [                 # (label, temperature, top_k, draft laws of rows 0..W-1 (name or "stale"))
    ("uniform_flag", 1.0, 0, ["uniform_flag", "uniform_flag"]),
    ("stale_rows", 1.0, 0, ["stale", "stale"]),
    ("onehot_far_topk2", 1.0, 2, ["onehot_dense_zeroP", "far"]),
]


def prefix_joint_checks(impl, spec: str, n: int = NJ, seed0: int = 2000, cases=None):
    """One step on a table whose row j is computed from the drafts ``D[0:j]``; AR-complete to KJ tokens.

    Draft law "stale": ``D[j]`` drawn from the table row of a different prefix (the drafts' own
    earlier values permuted), as a stale Jacobi row would be - the stored law depends on D[0:j].
    """
    mode, beta, form, vp = MODE_SPECS[spec]
    V, W, K = VJ, WJ, KJ
    R = W + 1
    results = []
    for label, T, k, laws in cases or JOINT_CASES:
        ci = _label_seed(label)
        rs = np.random.RandomState(seed0 + ci)
        gen = torch.Generator().manual_seed(seed0 + ci)
        model = TableModel(V, K, seed0 + ci)
        B = n
        pos = torch.from_numpy(rs.randint(0, 50, B)).to(I64)
        seed = torch.arange(B, dtype=I64) + (seed0 + ci) * 10_000_000
        stp = torch.from_numpy(rs.randint(0, 8, B)).to(I64)
        q_state, q_kind, p_prev, status = _new_state(B, R, V, vp)
        drafts = torch.zeros(B, W, dtype=I64)
        bi = torch.arange(B)
        for j in range(W):
            slot = (pos + j) % R
            flag = ref.FLAG_PREV if vp else 0
            if vp:
                p_prev[bi, slot] = torch.from_numpy(rs.dirichlet(np.ones(V), size=B).astype(np.float32))
            if laws[j] == "stale":
                prefix = (drafts[:, :j] + 1) % V                    # a different prefix of the same length
                codes = _prefix_codes(prefix, V, K)[:, j].numpy()
                Q = torch.from_numpy(model.cond_law(codes, T, k, 1.0).astype(np.float32))
                kind = ref.KIND_DENSE
            else:
                P0 = model.cond_law(np.array([0]), T, k, 1.0)[0]  # shape the law on the first row
                kind, q, tok = _draft_law(laws[j], P0, rs)
                Q = None if q is None else torch.from_numpy(q).expand(B, V)
            q_kind[bi, slot] = kind | flag
            if kind == ref.KIND_DENSE:
                q_state[bi, slot] = Q
                if mode in (ref.MODE_GUMBEL, ref.MODE_GUMBEL_JACOBI):
                    d = _gumbel_draw(Q.contiguous(), seed, pos + j)
                else:
                    d = torch.multinomial(Q.double(), 1, replacement=True, generator=gen)[:, 0]
            elif kind == ref.KIND_UNIFORM:
                d = torch.randint(0, V, (B,), generator=gen)
            else:
                d = torch.full((B,), tok, dtype=I64)
            drafts[:, j] = d
        logits = model.rows(drafts, torch.arange(W + 1).expand(B, W + 1))
        win = torch.full((B,), W, dtype=I64)
        na, tok, nd = impl(logits, None, None, drafts, win, pos, seed, stp, None, q_state, q_kind, p_prev,
                           status, T, k, 1.0, mode, beta, form, 1e-6, ref.TAIL_UNIFORM)
        _check_outputs(na, tok, nd, win, V, f"{spec}/{label}")
        assert int(status[0]) == 0
        X = torch.full((B, K), -1, dtype=I64)
        X[:, : min(K, W + 1)] = tok[:, :K]
        for l in range(K):                                          # exact AR completion after the commit
            todo = X[:, l] < 0
            if todo.any():
                codes = _prefix_codes(X[:, :l], V, K)[:, l].numpy()
                Pl = torch.from_numpy(model.cond_law(codes, T, k, 1.0))
                draw = torch.multinomial(Pl, 1, replacement=True, generator=gen)[:, 0]
                X[:, l] = torch.where(todo, draw, X[:, l])
        cells = stats.sequence_codes(X.numpy(), V)
        results.append(stats.chisq_gof(np.bincount(cells, minlength=V ** K), model.law(T, k, 1.0),
                                       f"{spec}/{label}/joint-{K}"))
    return results


# ----------------------------------------------------------------------------- multi-step sequences

def run_sequences(impl, spec, model: TableModel, n, W, seed0, T=1.0, k=0, p=1.0, tail_init=ref.TAIL_UNIFORM,
                  forced=None, ring=None, step0=0, capacity=None):
    """Generate ``n`` sequences of ``model.L`` tokens by repeated steps; returns ``X [n, L]`` and stats.

    Each step builds the logits of rows ``j = 0..win_len`` from the committed tokens and the
    current drafts through the table (as a model would), calls ``impl``, commits, and feeds
    ``next_drafts`` and the state back. ``win_len = min(W, L - 1 - pos)`` (ragged near the end).
    ``capacity``: run with the sparse state of that many entries per slot (``impl`` takes ``q_idx``).
    """
    mode, beta, form, vp = MODE_SPECS[spec]
    V, L = model.V, model.L
    B = n
    R = ring or W + 1
    q_state, q_kind, p_prev, status = _new_state(B, R, V if capacity is None else capacity, vp)
    extra = {}
    if capacity is not None:
        extra["q_idx"] = torch.full((B, R, capacity), ref.IDX_PAD, dtype=torch.int32)
    seed = torch.arange(B, dtype=I64) + seed0 * 10_000_000
    stp = torch.full((B,), step0, dtype=I64)
    pos = torch.zeros(B, dtype=I64)
    f = None
    if forced is not None:
        f = torch.tensor(forced, dtype=I64).view(1, -1).expand(B, -1).contiguous()
    drafts = ref.init_window(seed, pos, stp, W, V, q_kind, f)
    X = torch.full((B, L + W + 1), -1, dtype=I64)
    jj = torch.arange(W + 1, dtype=I64)
    steps, accepted = 0, 0
    while (pos < L).any():
        active = pos < L
        win = torch.where(active, (L - 1 - pos).clamp(0, W), torch.zeros_like(pos))
        seq = X.clone()
        seq.scatter_(1, (pos.view(B, 1) + torch.arange(W)).clamp(max=L + W), drafts)
        logits = model.rows(seq[:, : L + W], pos.view(B, 1) + jj)
        na, tok, nd = impl(logits, None, None, drafts, win, pos, seed, stp, f, q_state, q_kind, p_prev, status,
                           T, k, p, mode, beta, form, 1e-6, tail_init, **extra)
        _check_outputs(na, tok, nd, win, V, f"{spec}/step{steps}")
        assert int(status[0]) == 0, f"{spec}: status error {status.tolist()}"
        commit = active.view(B, 1) & (jj.view(1, -1) <= na.view(B, 1))
        cols = (pos.view(B, 1) + jj).clamp(max=L + W)
        X.scatter_(1, cols, torch.where(commit, tok, torch.gather(X, 1, cols)))
        accepted += float(na[active].float().mean())
        pos = torch.where(active, pos + na + 1, pos)
        drafts = nd
        stp = stp + 1
        steps += 1
        assert steps <= L
    assert (X[:, :L] >= 0).all(), "a sequence was left incomplete"
    return X[:, :L], {"steps": steps, "accepted_per_step": accepted / max(1, steps),  # mean over active requests
                      "status": status.tolist()}


VS, LS, WS = 3, 4, 2           # sequence checks: vocabulary, length, window
NS = stats.required_n(VS ** LS) + 1500
# (label, table seed, logit scale, temperature, top_k, W, tail_init, forced)
SEQUENCE_CASES = [
    ("table_W2", 11, 2.5, 1.0, 0, 2, ref.TAIL_UNIFORM, None),
    ("table_W3_topk2_left", 12, 2.0, 1.0, 2, 3, ref.TAIL_LEFT, None),
    ("table_W3_forced", 13, 2.5, 0.8, 0, 3, ref.TAIL_UNIFORM, [-1, -1, 1, -1]),
]


def sequence_checks(impl, spec: str, n: int = NS, cases=None, seed0: int = 3000):
    results = []
    for label, tseed, scale, T, k, W, tail, forced in cases or SEQUENCE_CASES:
        model = TableModel(VS, LS, tseed, scale)
        X, info = run_sequences(impl, spec, model, n, W, seed0 + _label_seed(label), T, k, 1.0, tail, forced)
        cells = stats.sequence_codes(X.numpy(), VS)
        r = stats.chisq_gof(np.bincount(cells, minlength=VS ** LS), model.law(T, k, 1.0, forced),
                            f"{spec}/{label}/sequence (steps {info['steps']}, "
                            f"{info['accepted_per_step']:.2f} acc/step)")
        results.append(r)
    return results


def _bf16_trap_rows():
    """Constant rows P = (a, b, c): a just below a bf16 rounding midpoint (rounds up by ~2^-9), b and c
    small and rounding down. A correct step accepts every draft stored with Q = P; a stored law
    re-rounded to bf16 rejects ~2^-9 of them and moves that mass to the rare tokens b, c."""
    best = None
    for a in np.linspace(1 - 1.5 * 2 ** -8 + 1e-6, 1 - 1.5 * 2 ** -8 + 2e-4, 40):
        for c in np.linspace(4e-4, 2e-3, 40):
            lg = torch.tensor(np.log([a, 1 - a - c, c]), dtype=torch.float32)
            P = target_probs(lg.view(1, 3), 1.0, 0, 1.0)[0]
            up = (P.to(torch.bfloat16).to(torch.float32) - P)
            if up[0] <= 0 or (up[1:] > 0).any():
                continue
            gain = float(up[0]) / float(P[1] + P[2])
            if best is None or gain > best[0]:
                best = (gain, lg)
    assert best is not None and best[0] > 0.25, best
    return best[1]


def bf16_sequence_checks(impl, spec: str = "sjd", n: int = NS):
    """Sequences of i.i.d. tokens from a row designed so that a bf16 re-rounded stored law is visible."""
    row = _bf16_trap_rows()
    model = TableModel(VS, LS, 0, rows=row.view(1, 3).expand(int(_prefix_offsets(VS, LS)[LS]) + 1, 3))
    X, info = run_sequences(impl, spec, model, n, 2, 4000)
    cells = stats.sequence_codes(X.numpy(), VS)
    return [stats.chisq_gof(np.bincount(cells, minlength=VS ** LS), model.law(1.0, 0, 1.0),
                            f"{spec}/bf16-trap-rows/sequence (steps {info['steps']})")]


def gumbel_jacobi_mismatches(impl, n=4000, W=3, L=6, V=5, seed0=5000):
    """Tokens where Jacobi with exact-match verification differs from AR with the same position-keyed noise."""
    model = TableModel(V, L, seed0, 1.5)
    X, _ = run_sequences(impl, "gumbel_jacobi", model, n, W, seed0)
    seed = torch.arange(n, dtype=I64) + seed0 * 10_000_000
    A = torch.full((n, L), -1, dtype=I64)
    for l in range(L):                                    # AR: argmax(log P + g_pos), P from the same pipeline
        P = target_probs(model.rows(A[:, :l], torch.full((n, 1), l, dtype=I64))[:, 0], 1.0, 0, 1.0)
        A[:, l] = _gumbel_draw(P, seed, torch.full((n,), l, dtype=I64))
    return int((X != A).sum())


def greedy_mismatches(impl, spec, T=0.0, k=0, n=512, W=3, L=7, V=6, seed0=6000):
    """Tokens where a greedy run (T = 0 or top_k = 1) differs from the argmax AR sequence."""
    model = TableModel(V, L, seed0, 2.0)
    X, _ = run_sequences(impl, spec, model, n, W, seed0, T, k)
    A = torch.full((1, L), -1, dtype=I64)
    for l in range(L):
        row = model.rows(A[:, :l], torch.full((1, 1), l, dtype=I64))[0, 0].double().numpy()
        A[0, l] = int(np.argmax(row))
    return int((X != A).sum())


# ----------------------------------------------------------------------------- u = 1 edge

@contextlib.contextmanager
def _patched_rng(name, fn):
    old = getattr(rng, name)
    setattr(rng, name, fn)
    try:
        yield
    finally:
        setattr(rng, name, old)


def u_edge_failures(impl, B=512, W=3, V=7, seed0=7000):
    """Invalid outcomes when the acceptance word takes its largest value (u = 1 - 2^-24) and Q == P.

    SPEC section 3: the rule never rejects a draft with ``P >= Q > 0``, so every draft must be
    accepted; a rule with u in (0, 1] would reject and find an empty residual. Then, with a
    generator broken to give u = 1 exactly, the zero-mass residual must fall back to P (counted
    in ``status[1]``) instead of emitting -1. Works through the module ``sjd_kernels.rng``, so
    it applies to the torch backend only. Returns the number of failures.
    """
    g = torch.Generator().manual_seed(seed0)
    logits = torch.randn(B, W + 1, V, generator=g)
    P = target_probs(logits, 1.0, 0, 1.0)
    pos = torch.randint(0, 30, (B,), generator=g)
    seed = torch.arange(B, dtype=I64) + seed0
    stp = torch.zeros(B, dtype=I64)
    win = torch.full((B,), W, dtype=I64)
    drafts = torch.multinomial(P[:, :W].reshape(-1, V).double(), 1, generator=g).view(B, W)
    fails = 0
    for part in ("max_word", "u_one"):
        q_state, q_kind, p_prev, status = _new_state(B, W + 1, V, False)
        bi = torch.arange(B).view(B, 1).expand(B, W)
        slots = (pos.view(B, 1) + torch.arange(W)) % (W + 1)
        q_state[bi, slots] = P[:, :W]
        q_kind[bi, slots] = ref.KIND_DENSE
        if part == "max_word":
            orig = rng.four_words
            fn = lambda s_, p_, t_, stream: (torch.full_like(orig(s_, p_, t_, stream), 0xFFFFFFFF)
                                              if stream == rng.STREAM_ACCEPT else orig(s_, p_, t_, stream))
            name = "four_words"
        else:
            fn = lambda words: torch.ones(words.shape, dtype=torch.float32)
            name = "uniform24"
        with _patched_rng(name, fn):
            na, tok, nd = impl(logits, None, None, drafts, win, pos, seed, stp, None, q_state, q_kind, p_prev,
                               status, 1.0, 0, 1.0, ref.MODE_SJD, 0.0, ref.VP_ADD, 1e-6, ref.TAIL_UNIFORM)
        jj = torch.arange(W + 1).view(1, -1)
        used = jj <= na.view(-1, 1)
        fails += int(((tok < 0) | (tok >= V))[used].sum()) + int((na < 0).sum())
        if part == "max_word":
            fails += int((na != W).sum()) + int(status[1])
        else:
            fails += int(status[1] == 0)
    return fails


# ----------------------------------------------------------------------------- state contents

def vp_state_mismatches(impl, spec, B=96, W=3, V=5, seed0=8000):
    """Entries where the stored state after a step differs from the SPEC section 4 contract.

    Rows 1..win_len store ``Q = Qvp`` (computed here in float64 from the row and the previous
    row) where the slot held a previous row and the row is a draft row, else ``Q = P`` - in
    particular the bonus row, which has no previous row; ``p_prev = P``; kind DENSE | FLAG_PREV.
    Three steps run first so that the ring holds stale rows of earlier positions.
    """
    mode, beta, form, vp = MODE_SPECS[spec]
    assert vp
    g = torch.Generator().manual_seed(seed0)
    q_state, q_kind, p_prev, status = _new_state(B, W + 1, V, True)
    seed = torch.arange(B, dtype=I64) + seed0
    stp = torch.zeros(B, dtype=I64)
    pos = torch.zeros(B, dtype=I64)
    drafts = ref.init_window(seed, pos, stp, W, V, q_kind)
    win = torch.full((B,), W, dtype=I64)
    bad = 0
    for it in range(4):
        logits = torch.randn(B, W + 1, V, generator=g) * 1.5
        before_k, before_p = q_kind.clone(), p_prev.clone()
        na, tok, nd = impl(logits, None, None, drafts, win, pos, seed, stp, None, q_state, q_kind, p_prev, status,
                           1.0, 0, 1.0, mode, beta, form, 1e-6, ref.TAIL_UNIFORM)
        P = stats.target_law64(logits.numpy())
        for b in range(B):
            for j in range(1, W + 1):
                s_ = int(pos[b] + j) % (W + 1)
                Pj = P[b, j]
                has_prev = bool(int(before_k[b, s_]) & ref.FLAG_PREV) and j < W
                if has_prev and beta != 0.0:
                    pp = before_p[b, s_].double().numpy()
                    if form == ref.VP_ADD:
                        w = np.maximum(Pj + beta * (Pj - pp), 0)
                    else:
                        w = Pj * ((Pj + 1e-6) / (pp + 1e-6)) ** beta
                    want = w / w.sum() if w.sum() > 0 else Pj
                else:
                    want = Pj
                bad += int(np.abs(q_state[b, s_].double().numpy() - want).max() > 1e-5)
                bad += int(np.abs(p_prev[b, s_].double().numpy() - Pj).max() > 1e-5)
        pos = pos + na + 1
        drafts = nd
        stp = stp + 1
    return bad


# ----------------------------------------------------------------------------- tests

def _assert_all(results):
    for r in results:
        print(r)
    for r in results:
        assert r.power >= stats.POWER, f"underpowered: {r}"
    bad = [r for r in results if r.p_value < stats.ALPHA]
    assert not bad, "law rejected at alpha=%g:\n%s" % (stats.ALPHA, "\n".join(map(str, bad)))


def test_sample_sizes_have_power():
    """The documented sample sizes give power >= 0.99 for a 0.02 error at alpha 1e-6."""
    for cells, n in ((V1, N1), (VJ ** KJ, NJ), (VS ** LS, NS)):
        assert stats.chisq_power(n, cells) >= stats.POWER, (cells, n)
    print(f"alpha={stats.ALPHA} delta={stats.DELTA} power>={stats.POWER}: first-token {V1} cells N={N1}, "
          f"joint {VJ ** KJ} cells N={NJ}, sequence {VS ** LS} cells N={NS}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", SINGLE_STEP_MODES)
def test_first_token_law(impl, spec):
    _assert_all(first_token_checks(impl, spec))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", SINGLE_STEP_MODES)
def test_prefix_joint_law(impl, spec):
    _assert_all(prefix_joint_checks(impl, spec))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", SEQUENCE_MODES)
def test_sequence_law(impl, spec):
    _assert_all(sequence_checks(impl, spec))


@pytest.mark.parametrize("impl", IMPLS)
def test_sequence_law_bf16_trap_rows(impl):
    _assert_all(bf16_sequence_checks(impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_gumbel_jacobi_equals_ar_with_same_noise(impl):
    assert gumbel_jacobi_mismatches(impl) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", list(MODE_SPECS))
@pytest.mark.parametrize("T,k", [(0.0, 0), (1.0, 1)], ids=["T0", "topk1"])
def test_greedy_every_mode_is_argmax(impl, spec, T, k):
    assert greedy_mismatches(impl, spec, T, k) == 0


def test_u_edge_never_rejects_p_equal_q():
    assert u_edge_failures(ref.jacobi_step) == 0
    assert u_edge_failures(public_impl("torch")) == 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spec", ["vp_add_b0.5", "vp_log_b1", "coupling_vp_add_b0.5", "vp_add_b0"])
def test_vp_state_contents(impl, spec):
    """Stored laws follow SPEC section 4; the bonus row (no previous row) stores P, not a VP of a stale row."""
    assert vp_state_mismatches(impl, spec) == 0


@pytest.mark.parametrize("spec", ["sjd", "coupling", "gumbel"])
def test_one_hot_rows_survive_extreme_noise_words(spec):
    """Greedy rows are one-hot: every token must be the argmax whatever the noise words are, the
    largest word (u24 = 2^24 - 1, where the float32 exponential noise rounds to 0) included."""
    orig = rng.lane_words
    fn = lambda seed, position, step, stream, n_lanes: torch.full_like(orig(seed, position, step, stream, n_lanes),
                                                                        0xFFFFFFFF)
    with _patched_rng("lane_words", fn):
        assert greedy_mismatches(ref.jacobi_step, spec, 0.0, 0, n=8, L=5) == 0
