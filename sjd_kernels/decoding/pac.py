"""Method ``pac``: maximal coupling plus a K-ary draft tree at the rejection point (SJD-PAC, SPEC section 5).

One step of a request with ``n`` committed tokens and ``w = min(W, N - 1 - n)`` drafts:

1. **Tree.** The window drafts ``D[0..W-1]`` (positions ``n .. n+W-1``, laws on the JacobiState
   ring) become the first sibling of every node of their level; ``build_tree`` adds up to K - 1
   later siblings per node for the first ``tree_depth`` levels, drawn from the level's stored law
   without replacement (never from a coupling residual), then a chain to depth W under the spine
   (the all-first-sibling path). Levels deeper than ``w`` are pruned per request (ragged batches).
2. **One forward** over all node slots: node i at cache slot ``cache_len + i``, position id
   ``cache_len + depth``, attending to the committed prefix and its ancestors
   (``TreeLayout.attention_mask``); CFG rows share the tree and use their own cache lengths.
3. **Verify** with ``tree_verify`` (recursive rejection sampling), commit ``m + 1`` tokens, and
   move the accepted path's K/V with ``tree_kv_update`` (per model row); the cache length advances.
4. **Next window** (positions ``n+m+1 .. n+m+W``), as method ``coupling`` does on a chain: for the
   position at depth ``d = m + 1 + i`` the proposal row is the output of the *continuation node*
   at depth d, the node reached from the last accepted node by following first siblings (the
   old drafts), or, once that runs out below a node off the spine, the chain node of depth d
   (its row is conditioned on the spine's drafts, still a valid proposal law). The old draft of
   that position (``D[d]``, when ``d < w``) is kept with probability ``min(1, Qt / Qold)`` (stream
   COUPLE), else redrawn from ``max(0, Qt - Qold)`` (stream COUPLE_RES; zero mass: from ``Qt``,
   counted in ``status[2]``); the position with no old draft (``d = w``) gets a fresh draw from
   its row (stream DRAFT); positions without a continuation node enter as new tail positions
   (uniform, stream TAIL, or a copy of the left neighbour); forced positions draft the forced id.
   ``Qt`` (the target pipeline of SPEC section 2 on that row) is stored as the draft's law.

Exactness: the choice of row for position p depends only on decisions and drafts at positions
before p, and coupling gives the draft exactly the stored law; siblings are drawn without
replacement from the stored law of their level. Randomness: every stream at ``(seed, position,
step)`` with the request's step advanced once per step, so a request draws the same numbers alone
or in any batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rng
from ..reference.jacobi_step import KIND_DENSE, KIND_MASK, KIND_ONEHOT, KIND_UNIFORM, STATUS_ZERO_COUPLE
from ..reference.target import combine_logits, target_probs
from ..reference.tree import MAX_NODES, MAX_SIBLINGS, TreeLayout, tree_template

DEFAULT_TREE_WIDTH = 3
DEFAULT_TREE_DEPTH = 3


@dataclass
class PacPlan:
    """The fixed node template of one batch: K, tree depth D (already cut to W), window W."""
    K: int
    D: int
    W: int
    num_nodes: int
    chain_at: torch.Tensor        # [W + 2] i64: the chain node of depth d (d > D), else -1
    anc: torch.Tensor             # [N, N] bool: the template's ancestor mask (j is i or an ancestor of i)

    @classmethod
    def create(cls, K: int, D: int, W: int, device) -> "PacPlan":
        parent, dep, _, levels = tree_template(K, D, W)
        chain = [-1] * (W + 2)
        for d in range(D + 1, W + 1):
            chain[d] = levels[d][0][0]
        N = len(parent)
        anc = torch.eye(N, dtype=torch.bool)
        for i in range(1, N):
            anc[i] |= anc[parent[i]]
        return cls(K, D, W, N, torch.tensor(chain, dtype=torch.int64, device=device), anc.to(device))

    def attention_mask(self, tree: TreeLayout, cache_len: torch.Tensor, kv_len: int) -> torch.Tensor:
        """``TreeLayout.attention_mask`` for trees drawn into this template (no per-node loop).

        A node that exists has all its template ancestors (parents exist before children and
        pruning is by depth), so its row of the template mask is exact; a missing node sees itself.
        """
        R, N = tree.parent.shape
        dev = tree.parent.device
        idx = torch.arange(N, device=dev)
        valid = (idx.view(1, N) == 0) | (tree.parent >= 0)
        eye = idx.view(N, 1) == idx.view(1, N)
        anc = torch.where(valid.view(R, N, 1), self.anc.view(1, N, N), eye.view(1, N, N))
        s = torch.arange(kv_len, device=dev).view(1, 1, kv_len)
        cl = cache_len.view(R, 1, 1)
        rel = s - cl
        in_tree = (rel >= 0) & (rel < N)
        seen = torch.gather(anc, 2, rel.clamp(0, N - 1).expand(R, N, kv_len))
        return (s < cl) | (in_tree & seen)


def check_tree_options(tree_width, tree_depth, window: int, num_tokens: int | None = None) -> tuple[int, int]:
    """Validate ``tree_width`` / ``tree_depth`` against the requested window; returns (K, D). The node
    count is that of the window the loop uses, ``min(window, num_tokens - 1)`` when ``num_tokens`` is
    given (a longer window is cut to the image, as for the chain methods), with the depth cut to it."""
    from ..ops._common import SJDInputError, as_int
    K = DEFAULT_TREE_WIDTH if tree_width is None else as_int(tree_width)
    D = DEFAULT_TREE_DEPTH if tree_depth is None else as_int(tree_depth)
    if K is None or not 1 <= K <= MAX_SIBLINGS:
        raise SJDInputError(f"tree_width must be an int in [1, {MAX_SIBLINGS}] (children per tree node), "
                            f"got {tree_width!r}")
    if D is None or D < 0:
        raise SJDInputError(f"tree_depth must be an int >= 0 (tree levels before the chain), got {tree_depth!r}")
    if D > window:
        default = " (the default)" if tree_depth is None else ""
        raise SJDInputError(f"tree_depth {D}{default} exceeds the window {window}: the tree's levels are window "
                            f"positions (use a window >= {D} or tree_depth <= window)")
    Wu = window if num_tokens is None else max(0, min(window, num_tokens - 1))
    Du = min(D, Wu)
    nodes = 1 + sum(K ** d for d in range(1, Du + 1)) + (Wu - Du)
    if nodes > MAX_NODES:
        raise SJDInputError(f"a tree of width {K}, depth {Du} and window {Wu} has {nodes} nodes; at most "
                            f"{MAX_NODES} per request (use a smaller tree_width or tree_depth, or a smaller window)")
    return K, D


def window_problem(window: int, num_tokens: int | None = None) -> str | None:
    """Why ``pac`` with its default tree cannot use a window of ``window`` drafts (None: it can). Its tree of
    depth ``DEFAULT_TREE_DEPTH`` lies inside the window; ``check_tree_options`` gives the other limits
    (``num_tokens``: the image's tokens, when known)."""
    from ..ops._common import SJDInputError
    if window < DEFAULT_TREE_DEPTH:
        return (f"pac puts its tree of depth {DEFAULT_TREE_DEPTH} (its default tree_depth) inside the window, so it "
                f"needs a window >= {DEFAULT_TREE_DEPTH}, got {window}")
    try:
        check_tree_options(None, None, window, num_tokens)
    except SJDInputError as e:
        return f"pac cannot use the window {window}: {e}"
    return None


def prune(tree: TreeLayout, win_len: torch.Tensor) -> TreeLayout:
    """Drop the nodes deeper than each request's window ``win_len [B]`` (their subtrees go with them)."""
    keep = (tree.depth >= 0) & (tree.depth <= win_len.view(-1, 1))
    neg = torch.full_like(tree.tokens, -1)
    f = lambda t: torch.where(keep, t, neg).contiguous()       # noqa: E731
    return TreeLayout(f(tree.tokens), f(tree.parent), f(tree.depth), f(tree.sib), f(tree.q_slot), tree.max_depth)


def first_child(tree: TreeLayout) -> torch.Tensor:
    """``[B, N]``: each node's sibling-0 child (the old draft of the next level), -1 if none."""
    B, N = tree.parent.shape
    idx = torch.arange(N, device=tree.parent.device).view(1, N).expand(B, N)
    ok = (tree.parent >= 0) & (tree.sib == 0)
    out = torch.full((B, N + 1), -1, dtype=torch.int64, device=tree.parent.device)
    out.scatter_(1, torch.where(ok, tree.parent, torch.full_like(idx, N)),
                 torch.where(ok, idx, torch.full_like(idx, -1)))
    return out[:, :N]


def continuation(plan: PacPlan, tree: TreeLayout, path: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``[B, W]``: the node whose row proposes position ``n + m + 1 + i`` (depth ``m + 1 + i``), -1 if none."""
    B, N = tree.parent.shape
    W = plan.W
    bidx = torch.arange(B, device=path.device)
    fc = first_child(tree)
    mm = m.clamp(min=0)
    cur = path[bidx, mm.clamp(max=path.shape[1] - 1)].clamp(min=0)
    valid = tree.parent >= 0
    c = fc[bidx, cur]
    cols = []
    for i in range(W):
        d = mm + 1 + i
        ch = plan.chain_at[d.clamp(max=W + 1)]
        ch = torch.where((ch >= 0) & valid[bidx, ch.clamp(min=0)], ch, torch.full_like(ch, -1))
        node = torch.where(c >= 0, c, ch)
        cols.append(node)
        c = torch.where(node >= 0, fc[bidx, node.clamp(min=0)], torch.full_like(node, -1))
    if not cols:
        return torch.zeros(B, 0, dtype=torch.int64, device=path.device)
    return torch.stack(cols, 1)


def propose(logits, uncond, cfg_scale, cont, m, drafts, win_len, pos, last_tok, state, forced, *, temperature: float,
            top_k: int, top_p: float, tail_init: str, write: torch.Tensor) -> torch.Tensor:
    """Next window ``[B, W]`` (positions ``pos + m + 1 + i``) and its laws on the state ring (module docstring).

    ``logits, uncond [B, N, V]`` node rows; ``cont [B, W]`` continuation nodes; ``m [B]`` accepted
    drafts; ``drafts [B, W]`` the old window (positions ``pos + j``); ``last_tok [B]`` the last
    committed token; ``write [B]`` bool: requests whose state is updated (active, no error).
    Reads the old laws before writing. Uses ``state.step`` (the caller advances it afterwards).
    """
    B, W = cont.shape
    V = logits.shape[-1]
    dev = logits.device
    R = state.q_state.shape[1]
    i64 = torch.int64
    if W == 0:
        return drafts
    bidx = torch.arange(B, device=dev).view(B, 1).expand(B, W)
    mm = m.clamp(min=0).view(B, 1)
    d = mm + 1 + torch.arange(W, device=dev).view(1, W)                 # depth = offset from pos
    p = pos.view(B, 1) + d                                               # absolute positions
    slot = p % R
    has_node = cont >= 0
    node = cont.clamp(min=0)
    rows = logits[bidx, node]                                            # [B, W, V]
    urows = uncond[bidx, node] if uncond is not None else None
    Qt = target_probs(combine_logits(rows, urows, cfg_scale), temperature, top_k, top_p)
    Qt = torch.nan_to_num(Qt, nan=0.0)
    if forced is not None and forced.numel() > 0:
        L = forced.shape[1]
        f = torch.gather(forced, 1, p.clamp(max=L - 1))
        f = torch.where(p < L, f, torch.full_like(f, -1))
    else:
        f = torch.full_like(p, -1)
    is_forced = f >= 0

    # the old draft of each position and its stored law (read before any write)
    has_old = has_node & (d < win_len.view(B, 1))
    y = torch.gather(drafts, 1, d.clamp(max=W - 1))
    q_rows, kind_rows = state.q_state[bidx, slot], state.q_kind[bidx, slot]   # [B, W, V], [B, W]
    kind = kind_rows.to(i64) & KIND_MASK
    lanes = torch.arange(V, device=dev)
    y_in = (y >= 0) & (y < V)
    Qold = torch.where((kind == KIND_DENSE).unsqueeze(-1), q_rows,
                       torch.where((kind == KIND_UNIFORM).unsqueeze(-1), torch.full_like(Qt, 1.0 / V),
                                   (lanes.view(1, 1, V) == y.unsqueeze(-1)).to(torch.float32)))
    yc = y.clamp(0, V - 1).unsqueeze(-1)
    q_y = torch.where(y_in, torch.gather(Qold, 2, yc).squeeze(-1), torch.zeros_like(Qt[..., 0]))
    t_y = torch.where(y_in, torch.gather(Qt, 2, yc).squeeze(-1), torch.zeros_like(Qt[..., 0]))

    seedb, stepb = state.seed.view(B, 1), state.step.view(B, 1)
    u_c = rng.uniform24(rng.four_words(seedb, p, stepb, rng.STREAM_COUPLE)[..., 0])
    keep = u_c * q_y < t_y
    E_cr = rng.exponential(rng.lane_words(seedb, p, stepb, rng.STREAM_COUPLE_RES, V))
    rc = rng.race(torch.clamp(Qt - Qold, min=0.0), E_cr)
    zero = (rc < 0) & has_old & ~keep & ~is_forced & write.view(B, 1)
    rc = torch.where(rc < 0, rng.race(Qt, E_cr), rc)
    fresh = rng.race(Qt, rng.exponential(rng.lane_words(seedb, p, stepb, rng.STREAM_DRAFT, V)))
    new = torch.where(has_old, torch.where(keep, y, rc), fresh)
    state.status[STATUS_ZERO_COUPLE] += zero.sum().to(state.status.dtype)

    # positions without a proposal row: new tail positions
    tail = ~has_node
    if tail_init == "uniform":
        tail_tok = rng.uniform_token(seedb, p, stepb, rng.STREAM_TAIL, V)
        new = torch.where(tail, tail_tok, new)
        new = torch.where(is_forced, f, new)
        tail_kind = torch.full_like(p, KIND_UNIFORM)
    else:
        cols, prev = [], last_tok
        for i in range(W):
            t = torch.where(is_forced[:, i], f[:, i], torch.where(tail[:, i], prev, new[:, i]))
            cols.append(t)
            prev = t
        new = torch.stack(cols, 1)
        # as jacobi_step's left copy: a copied id outside [0, V) (a forced structural id such as a row
        # end) cannot be a draft, so that slot draws uniformly instead (law KIND_UNIFORM)
        oob = tail & ~is_forced & ((new < 0) | (new >= V))
        new = torch.where(oob, rng.uniform_token(seedb, p, stepb, rng.STREAM_TAIL, V), new)
        tail_kind = torch.where(oob, torch.full_like(p, KIND_UNIFORM), torch.full_like(p, KIND_ONEHOT))
    new = torch.where(is_forced, f, new)

    # stored laws: Qt where a row proposed, the tail kind elsewhere, one-hot at forced positions
    wr = write.view(B, 1).expand(B, W)
    dense = wr & has_node & ~is_forced
    # selected by torch.where over the rows read above, not boolean indexing (which synchronises); the W slots
    # are distinct (R = W + 1)
    state.q_state[bidx, slot] = torch.where(dense.unsqueeze(-1), Qt, q_rows)
    k = torch.where(is_forced, torch.full_like(p, KIND_ONEHOT),
                    torch.where(has_node, torch.full_like(p, KIND_DENSE), tail_kind))
    state.q_kind[bidx, slot] = torch.where(wr, k.to(state.q_kind.dtype), kind_rows)
    return new
