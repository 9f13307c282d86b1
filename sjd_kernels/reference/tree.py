"""Tree drafts (SPEC section 5): the layout, its helpers, and the PyTorch spec of ``tree_verify`` and
``tree_kv_update``. Vectorised over requests; the CPU backend and the oracle of every test.

Layout of one request (``N`` node slots, fixed per batch; every tensor ``[B, N]`` int64):

    tokens  node token; node 0 is the root ``X[n-1]`` (the last committed token); -1 at padding
    parent  parent node index (< own index: topological order); -1 for the root and padding
    depth   0 for the root, ``depth[parent] + 1`` otherwise; -1 at padding
    sib     order among the parent's children (0, 1, ...): the order they were drawn, which is
            the order verification tries them; -1 at padding
    q_slot  row of ``q_state [B, R, V]`` / ``q_kind [B, R]`` holding the law ``q`` the node's
            children were drawn from (without replacement); with the JacobiState ring this is
            ``(pos + depth) % R``, the slot of the children's absolute position

A slot ``i > 0`` is a node iff ``parent[i] >= 0``. A node at depth d stands for absolute position
``pos - 1 + d`` (``pos = n``, the first uncommitted position); its children for ``pos + d``. For the
model: node i's K/V go to cache slot ``cache_len + i``, its position id is ``cache_len + depth``,
and it attends to the committed prefix and to its ancestors (itself included).

Sibling draws (``build_tree``). Siblings are drawn without replacement from ``q``: the k-th
sibling's stored law ``q_k`` is ``q`` with the earlier siblings removed and renormalised; no
sibling is added once the remaining mass is zero. They are the top keys of one exponential race
``w_i / E_i`` over the vocabulary: with ``E_i`` iid Exp(1), ``E_i / w_i`` is Exp with rate
``w_i``; the smallest of independent exponentials is lane i with probability ``w_i / sum(w)``,
and by memorylessness the others, shifted by that minimum, are again independent exponentials
with the same rates, so the second smallest is a draw from the remaining lanes with probability
``w_j / sum_{j remaining} w`` - successive sampling without replacement. The top-K keys are K
draws without replacement, in draw order (equal keys: lowest lane first). Noise: stream
``STREAM_TREE``, counter position = the children's absolute position, the request's step, and
lane ``node * 4 * ceil(V / 4) + v`` so that every parent node has its own noise. The first
sibling of every node at a depth may instead be a given token (an old draft coupled to the
level's law, whose law is then that law: store it); the later siblings are drawn from the same
law without the first, never from the coupling residual.

Verification (``tree_verify``), per node i with children ``c_1, c_2, ...`` in sibling order,
target row ``P_i`` (the full target pipeline of ``reference.target`` on logits row i) and base
law ``q``: ``p_1 = P_i``; child k with token x is accepted iff ``u_k * q_k(x) < p_k(x)``; on
rejection ``p_{k+1} = norm(max(0, p_k - q_k))``. The walk starts at the root and descends into
the accepted child; at the node where every child fails (or that has no child) it draws from the
last ``p`` (the last residual, or ``P_i`` itself: the bonus token). This is recursive rejection
sampling and commits tokens with the target law. Noise: acceptance uniform of sibling k of a
node at depth d: stream ``STREAM_TREE_ACCEPT``, ``(seed, pos + d, step)``, lane k; the final draw:
stream ``STREAM_TREE_RESID``, ``(seed, pos + d, step)``, lanes ``0..V-1`` (exponential race).
Only one node per depth is ever used by the walk, so these are fresh for every decision. (The
reference evaluates target rows, laws and noise only at the nodes the walk visits; errors are
checked at every node.)

Numbers, identical in every backend (float32; only the order of the float sums differs):
``q_k = (q * keep_k) / sum(q * keep_k)`` (0 when the sum is 0), ``r = max(0, p_k - q_k)``,
``p_{k+1} = r / sum(r)``; a zero ``sum(r)`` (rounding only) keeps ``p_{k+1} = p_k`` and is counted
in ``status[1]``. A child with ``q_k(x) = 0`` (a token its law could not have produced, e.g. a
duplicate) is skipped. The uniform kind is ``q = 1/V`` in every lane, the one-hot kind is one-hot
at the first child's token. At a forced position (``forced [B, L]``, per absolute position) the
child equal to the forced id is accepted, none else, and the forced id is committed otherwise.

Errors (bits of ``status[0]``, the request returns -1 everywhere): 1 a non-finite target row of a
node whose children's position is not forced; 2 a child token outside ``[0, V)`` that is not the
forced id; 4 a malformed tree (parent not earlier or not a node, depth not parent's + 1, sibling
orders not ``0..n-1``, more than ``MAX_SIBLINGS`` children, ``q_slot`` outside ``[0, R)`` at a node
with children, depth above ``max_depth``, ``parent[0] != -1``).

``tree_kv_update`` moves the accepted path's K/V (node slot ``cache_len + path[j]`` to slot
``cache_len + j``, all layers and heads) in place; see its docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import rng
from .jacobi_step import (ERR_DRAFT_RANGE, ERR_NONFINITE, ERR_TREE_INDEX, KIND_DENSE, KIND_MASK, KIND_ONEHOT,
                          KIND_UNIFORM, STATUS_ERR, STATUS_ZERO_RESID)
from .target import bad_rows, combine_logits, target_probs

MAX_SIBLINGS = 16      # children per node (the CUDA kernel keeps the removed tokens in registers)
MAX_NODES = 1024       # node slots per request (one tile / one shared-memory row of the kernels)

__all__ = ["TreeLayout", "tree_template", "build_tree", "sibling_noise", "ancestor_mask", "tree_verify",
           "tree_kv_update", "tree_kv_update_list", "structure_errors", "kv_moves", "MAX_SIBLINGS", "MAX_NODES",
           "KIND_DENSE", "KIND_UNIFORM", "KIND_ONEHOT", "ERR_TREE_INDEX"]


# ----------------------------------------------------------------------------- layout

@dataclass
class TreeLayout:
    """A ragged batch of draft trees (see the module docstring); all tensors ``[B, N]`` int64."""
    tokens: torch.Tensor
    parent: torch.Tensor
    depth: torch.Tensor
    sib: torch.Tensor
    q_slot: torch.Tensor
    max_depth: int

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """``[B, N]`` bool: slot i holds a node (the root, or a node with a parent)."""
        idx = torch.arange(self.num_nodes, device=self.parent.device)
        return (idx.view(1, -1) == 0) | (self.parent >= 0)

    def input_ids(self) -> torch.Tensor:
        """Tokens to feed the model, padding slots as token 0 (their outputs are never read)."""
        return self.tokens.clamp(min=0)

    def _cache_len(self, cache_len) -> torch.Tensor:
        """``cache_len`` as ``[B]`` int64 on the layout's device: an int (every request) or a ``[B]``
        integer tensor, every value >= 0 (checked on the host for CPU tensors: the decoding loop calls
        this every step on the GPU, where it must not synchronise)."""
        from ..ops._common import INT_DTYPES, SJDInputError, as_int, check_tensor, host_checks
        B = self.parent.shape[0]
        dev = self.parent.device
        i = as_int(cache_len)
        if i is not None:
            if i < 0:
                raise SJDInputError(f"cache_len must be >= 0, got {i}")
            return torch.full((B,), i, dtype=torch.int64, device=dev)
        if not isinstance(cache_len, torch.Tensor):
            raise SJDInputError(f"cache_len must be an int or a [B={B}] integer tensor, got {type(cache_len).__name__}")
        check_tensor("cache_len", cache_len, dtypes=INT_DTYPES, dim=1, shape=(B,), device=dev, last_contiguous=False)
        if host_checks(cache_len) and bool((cache_len < 0).any()):
            raise SJDInputError(f"cache_len must be >= 0, got {cache_len.tolist()}")
        return cache_len.to(torch.int64)

    def position_ids(self, cache_len) -> torch.Tensor:
        """``cache_len [B] + depth``: node 0 at the request's cache length (padding at ``cache_len``).
        ``cache_len``: a ``[B]`` integer tensor or one int for every request."""
        return self._cache_len(cache_len).view(-1, 1) + self.depth.clamp(min=0)

    def node_slots(self, cache_len) -> torch.Tensor:
        """Cache slots the forward writes node i's K/V to: ``cache_len + i``, ``[B, N]``."""
        cl = self._cache_len(cache_len)
        return cl.view(-1, 1) + torch.arange(self.num_nodes, device=cl.device).view(1, -1)

    def ancestor_mask(self) -> torch.Tensor:
        """``[B, N, N]`` bool: ``[b, i, j]`` iff node j is node i or one of its ancestors."""
        return ancestor_mask(self.parent)

    def attention_mask(self, cache_len, kv_len: int) -> torch.Tensor:
        """``[B, N, kv_len]`` bool over cache slots: the committed prefix ``< cache_len`` and the node's
        ancestors (and itself) at slots ``cache_len + j``. Padding slots see the prefix and themselves.

        ``kv_len`` must hold every node slot (``kv_len >= cache_len + N`` for every request): a shorter
        mask would cut nodes off from themselves. Checked on the host (one synchronisation on a GPU;
        none while tracing or capturing). The decoding loop builds its masks with
        ``PacPlan.attention_mask``."""
        from ..ops._common import SJDInputError, as_int, may_sync
        cl = self._cache_len(cache_len)
        B, N = self.parent.shape
        L = as_int(kv_len)
        if L is None or L < N:
            raise SJDInputError(f"kv_len must be an int >= N = {N} (the cache slots the mask covers), got {kv_len!r}")
        if may_sync(cl) and bool((cl + N > L).any()):
            raise SJDInputError(f"kv_len {L} is too short: request(s) {(cl + N > L).nonzero().flatten().tolist()[:8]} "
                                f"put their {N} node slots up to cache_len + N = {int(cl.max()) + N}")
        dev = self.parent.device
        s = torch.arange(L, device=dev).view(1, 1, L)
        cl = cl.view(B, 1, 1)
        rel = s - cl                                                   # node index of the slot
        anc = self.ancestor_mask()                                     # [B, N, N]
        in_tree = (rel >= 0) & (rel < N)
        seen = torch.gather(anc, 2, rel.clamp(0, N - 1).expand(B, N, L))
        return (s < cl) | (in_tree & seen)

    def rows(self, index) -> "TreeLayout":
        """The layout of model rows ``index`` (e.g. ``torch.arange(B).repeat(2)`` for CFG pairs): a 1-D
        integer tensor (or sequence) of request indices in ``[0, B)``, checked on the host (one
        synchronisation on a GPU; none while tracing or capturing)."""
        from ..ops._common import INT_DTYPES, SJDInputError, check_tensor, may_sync
        B = self.parent.shape[0]
        if not isinstance(index, torch.Tensor):
            try:
                index = torch.as_tensor(index, device=self.parent.device)
            except (TypeError, ValueError, RuntimeError) as e:
                raise SJDInputError(f"rows: index must be a 1-D sequence of request indices, got {index!r}") from e
        check_tensor("rows: index", index, dtypes=INT_DTYPES, dim=1, device=self.parent.device, last_contiguous=False)
        if may_sync(index) and bool(((index < 0) | (index >= B)).any()):
            raise SJDInputError(f"rows: index values must lie in [0, B={B}), got {index.tolist()[:16]}")
        return self._select(index.to(torch.int64))

    def _select(self, index: torch.Tensor) -> "TreeLayout":
        """``rows`` without checks or synchronisation (the decoding loop's own CFG index)."""
        return TreeLayout(*(t.index_select(0, index) for t in (self.tokens, self.parent, self.depth, self.sib,
                                                                 self.q_slot)), self.max_depth)


def tree_template(K: int, depth: int, window: int):
    """Node slots of a K-ary tree of ``depth`` levels followed by a chain up to ``window`` levels.

    Level d (1-based) of the tree has ``K**d`` nodes, children of one parent adjacent and in
    sibling order; the chain (levels ``depth+1 .. window``, one node each) hangs under the spine
    (the node reached by following sibling 0 from the root), where the first, most likely draft of
    every level sits. Returns python lists ``(parent, depth, sib, level_nodes)``; ``level_nodes[d]``
    lists ``(node, parent)`` of level d.
    """
    if K < 1 or depth < 0 or window < depth:
        raise ValueError(f"need K >= 1 and 0 <= depth <= window, got K={K}, depth={depth}, window={window}")
    parent, dep, sib = [-1], [0], [0]
    levels = [[(0, -1)]]
    spine = 0
    for d in range(1, window + 1):
        cur = []
        parents = [n for n, _ in levels[-1]] if d <= depth else [spine]
        k_here = K if d <= depth else 1
        for a in parents:
            for k in range(k_here):
                cur.append((len(parent), a))
                parent.append(a)
                dep.append(d)
                sib.append(k)
        spine = cur[0][0]
        levels.append(cur)
    if len(parent) > MAX_NODES:
        raise ValueError(f"a tree of K={K}, depth={depth}, window={window} has {len(parent)} nodes; "
                         f"the kernels take at most {MAX_NODES}")
    return parent, dep, sib, levels


def sibling_noise(seed, position, step, node, V: int) -> torch.Tensor:
    """Exp(1) noise ``[..., V]`` of the sibling race under parent ``node`` (stream ``STREAM_TREE``).

    Counter ``(node * G + v // 4, position, step, STREAM_TREE)`` with ``G = ceil(V / 4)``: lane
    ``node * 4G + v`` of the generator's lane space, so every parent node draws its own noise.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64)
    dev = seed.device
    position = torch.as_tensor(position, dtype=torch.int64, device=dev)
    step = torch.as_tensor(step, dtype=torch.int64, device=dev)
    node = torch.as_tensor(node, dtype=torch.int64, device=dev)
    G = (V + 3) // 4
    shape = torch.broadcast_shapes(seed.shape, position.shape, step.shape, node.shape)
    ex = lambda t: t.expand(shape).unsqueeze(-1)
    k0, k1 = rng.split_seed(seed)
    g = ex(node) * G + torch.arange(G, dtype=torch.int64, device=dev)
    w = rng.philox4x32(g, ex(position), ex(step), rng.STREAM_TREE, ex(k0), ex(k1))
    words = torch.stack(w, dim=-1).reshape(*shape, G * 4)[..., :V]
    return rng.exponential(words)


def _forced_at(forced, positions):
    """Forced id at absolute ``positions`` (any shape ``[B, ...]``), -1 where none."""
    if forced is None or forced.numel() == 0:
        return torch.full_like(positions, -1)
    B, L = forced.shape
    flat = positions.reshape(B, -1)
    f = torch.gather(forced, 1, flat.clamp(0, L - 1))
    f = torch.where((flat >= 0) & (flat < L), f, torch.full_like(f, -1))
    return f.reshape(positions.shape)


def build_tree(root_token, pos, seed, step, q_state, q_kind, K: int, depth: int, window: int,
               first=None, forced=None) -> TreeLayout:
    """Draw a K-ary tree of ``depth`` levels then a chain to ``window`` levels, for B requests.

    ``root_token [B]`` (``X[n-1]``), ``pos [B]`` (n), ``seed, step [B]``; the law of level d
    (position ``pos + d - 1``) is row ``(pos + d - 1) % R`` of ``q_state [B, R, V]`` / ``q_kind
    [B, R]`` (dense, uniform, or one-hot at ``first``). ``first [B, window]`` (optional, -1 = none):
    the first sibling of every node of level d is ``first[:, d-1]`` (a coupled old draft whose law
    is the level's law); the rest are drawn without replacement from the law without it.
    ``forced [B, L]`` (optional): at a forced position every parent gets the forced id as its
    only child. Siblings stop when the remaining mass is zero; the chain level of a request whose
    spine node is missing is empty. Returns a :class:`TreeLayout` with ``q_slot`` on the ring.
    """
    parent_l, dep_l, sib_l, levels = tree_template(K, depth, window)
    B = root_token.shape[0]
    R, V = q_state.shape[1], q_state.shape[2]
    N = len(parent_l)
    dev = q_state.device
    i64 = torch.int64
    tokens = torch.full((B, N), -1, dtype=i64, device=dev)
    exists = torch.zeros((B, N), dtype=torch.bool, device=dev)
    tokens[:, 0] = root_token
    exists[:, 0] = True
    bidx = torch.arange(B, device=dev)
    lanes = torch.arange(V, device=dev)
    for d in range(1, window + 1):
        posd = pos + (d - 1)
        slot = posd % R
        kind = q_kind[bidx, slot].to(i64) & KIND_MASK
        fst = first[:, d - 1] if first is not None else torch.full((B,), -1, dtype=i64, device=dev)
        fst_ok = (fst >= 0) & (fst < V)
        w = torch.where((kind == KIND_DENSE).view(B, 1), q_state[bidx, slot],
                        torch.where((kind == KIND_UNIFORM).view(B, 1), torch.ones(B, V, device=dev),
                                    (lanes.view(1, V) == fst.view(B, 1)).to(torch.float32)))
        has_first = fst >= 0
        w_rest = torch.where(has_first.view(B, 1) & (lanes.view(1, V) == fst.view(B, 1)), torch.zeros_like(w), w)
        f = _forced_at(forced, posd.view(B, 1)).view(B)
        by_parent: dict[int, list[int]] = {}
        for node, a in levels[d]:
            by_parent.setdefault(a, []).append(node)
        for a, kids in by_parent.items():
            n = len(kids)
            E = sibling_noise(seed, posd, step, a, V)                          # [B, V]
            key = torch.where(w_rest > 0, w_rest / E, torch.full_like(w_rest, -1.0))
            order = torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :n]   # equal keys: lowest lane
            ok_race = torch.gather(w_rest, 1, order) > 0
            if order.shape[1] < n:                                             # fewer lanes than siblings
                pad = n - order.shape[1]
                order = torch.cat([order, torch.zeros(B, pad, dtype=i64, device=dev)], 1)
                ok_race = torch.cat([ok_race, torch.zeros(B, pad, dtype=torch.bool, device=dev)], 1)
            hf = has_first.view(B, 1)
            cand = torch.where(hf, torch.cat([fst.view(B, 1), order[:, :n - 1]], 1), order)
            ok = torch.where(hf, torch.cat([fst_ok.view(B, 1), ok_race[:, :n - 1]], 1), ok_race)
            ok = torch.cumprod(ok.to(i64), 1).to(torch.bool)                   # no sibling after zero mass
            par_ok = exists[:, a]
            for k, node in enumerate(kids):
                if k == 0:                                                     # a forced position: one child
                    e = par_ok & torch.where(f >= 0, torch.ones_like(par_ok), ok[:, 0])
                    t = torch.where(f >= 0, f, cand[:, 0])
                else:
                    e = par_ok & ok[:, k] & (f < 0)
                    t = cand[:, k]
                exists[:, node] = e
                tokens[:, node] = torch.where(e, t, torch.full_like(t, -1))
    parent = torch.tensor(parent_l, dtype=i64, device=dev).view(1, N).expand(B, N)
    dep = torch.tensor(dep_l, dtype=i64, device=dev).view(1, N).expand(B, N)
    sib = torch.tensor(sib_l, dtype=i64, device=dev).view(1, N).expand(B, N)
    neg = torch.full((B, N), -1, dtype=i64, device=dev)
    parent = torch.where(exists, parent, neg).contiguous()
    dep = torch.where(exists, dep, neg).contiguous()
    sib = torch.where(exists, sib, neg).contiguous()
    q_slot = torch.where(exists, (pos.view(B, 1) + dep) % R, neg).contiguous()
    return TreeLayout(tokens, parent, dep, sib, q_slot, max_depth=window)


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` bool, ``[b, i, j]``: j is i or an ancestor of i (parents precede children)."""
    B, N = parent.shape
    dev = parent.device
    eye = torch.eye(N, dtype=torch.bool, device=dev)
    anc = eye.unsqueeze(0).repeat(B, 1, 1)
    bidx = torch.arange(B, device=dev)
    for i in range(1, N):
        p = parent[:, i]
        ok = (p >= 0) & (p < i)
        anc[:, i] |= anc[bidx, p.clamp(0, N - 1)] & ok.view(B, 1)
    return anc


# ----------------------------------------------------------------------------- verification

def structure_errors(parent, depth, sib, q_slot, R: int, max_depth: int):
    """Per request: True where the tree is malformed (error bit 4; see the module docstring).

    Also returns the children count ``[B, N]`` (of valid nodes with a correct parent).
    """
    B, N = parent.shape
    dev = parent.device
    i64 = torch.int64
    idx = torch.arange(N, device=dev).view(1, N)
    valid = (idx == 0) | (parent >= 0)
    nonroot = valid & (idx > 0)
    par = parent.clamp(0, N - 1)
    par_ok = (parent < idx) & torch.gather(valid, 1, par)
    dep_ok = depth == torch.gather(depth, 1, par) + 1
    node_bad = nonroot & ~(par_ok & dep_ok)
    root_bad = (parent[:, 0] != -1) | (depth[:, 0] != 0)
    node_bad |= valid & ((depth > max_depth) | (depth < 0))
    child = nonroot & par_ok
    nch = torch.zeros(B, N, dtype=i64, device=dev).scatter_add_(1, torch.where(child, par, 0), child.to(i64))
    # sibling orders of each node's children must be exactly 0..nch-1: each < nch and no two equal
    # (equal (parent, sib) pairs are adjacent after a sort; non-children get distinct negative keys)
    sib_c = sib.clamp(0, MAX_SIBLINGS)
    pair = torch.where(child, par * (MAX_SIBLINGS + 1) + sib_c, -1 - idx.expand(B, N))
    srt = torch.sort(pair, dim=1).values
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(1)
    sib_bad = child & ((sib < 0) | (sib >= torch.gather(nch, 1, par)))
    many = nch > MAX_SIBLINGS
    slot_bad = valid & (nch > 0) & ((q_slot < 0) | (q_slot >= R))
    bad = root_bad | dup | (node_bad | sib_bad | many | slot_bad).any(1)
    return bad, nch


def _sibling_law(q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``q_k``: ``q`` with the removed lanes (``keep == 0``) zeroed and renormalised (0 on zero mass)."""
    qm = q * keep
    z = qm.sum(-1, keepdim=True)
    return torch.where(z > 0, qm / torch.where(z > 0, z, torch.ones_like(z)), torch.zeros_like(qm))


def tree_verify(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step, forced,
                q_state, q_kind, status, temperature: float, top_k: int, top_p: float, max_depth: int):
    """Recursive rejection sampling over a draft tree (module docstring) for B requests.

    ``logits, uncond [B, N, V]`` (row i: the target of node i's children), tree tensors ``[B, N]``,
    ``pos, seed, step [B]``, ``forced [B, L]`` or None, ``q_state [B, R, V]`` f32, ``q_kind [B, R]``
    i32, ``status [4]`` i32 (mutated). Returns ``num_accepted [B]`` (m accepted nodes; -1 on error),
    ``path [B, max_depth+1]`` (node indices from the root, m + 1 of them, then -1) and
    ``tokens [B, max_depth+1]`` (the m + 1 committed tokens, then -1).
    """
    B, N, V = logits.shape
    R = q_state.shape[1]
    L1 = max_depth + 1
    dev = logits.device
    i64 = torch.int64
    idx = torch.arange(N, device=dev).view(1, N)
    bidx = torch.arange(B, device=dev)
    lanes = torch.arange(V, device=dev)
    valid = (idx == 0) | (parent >= 0)
    tree_bad, _ = structure_errors(parent, depth, sib, q_slot, R, max_depth)

    # children in sibling order; malformed entries go to a spare column that is never read
    nonroot = valid & (idx > 0)
    KM = max(1, min(MAX_SIBLINGS, N - 1))     # a static bound (no host sync): sib < min(16, N - 1) in a valid tree
    ok_child = nonroot & (parent < idx) & (sib >= 0) & (sib < KM)
    col = torch.where(ok_child, parent.clamp(0, N - 1) * (KM + 1) + sib.clamp(0, KM - 1), torch.full_like(parent, KM))
    child_at = torch.full((B, N * (KM + 1)), -1, dtype=i64, device=dev)
    child_at.scatter_(1, col, torch.where(ok_child, idx.expand(B, N), torch.full_like(parent, -1)))
    child_at[:, KM] = -1
    child_at = child_at.view(B, N, KM + 1)[..., :KM]                    # [B, N, KM]
    exists = child_at >= 0
    ctok = torch.where(exists, torch.gather(tokens, 1, child_at.clamp(min=0).view(B, -1)).view(B, N, KM),
                       torch.full_like(child_at, -1))

    cpos = pos.view(B, 1) + depth.clamp(min=0)                          # the children's position
    f = _forced_at(forced, cpos)
    is_forced = f >= 0

    # errors, checked at every node (not only the visited ones)
    x = combine_logits(logits, uncond, cfg_scale)                       # [B, N, V] f32
    nonfinite = bad_rows(x, temperature)                                # after scaling, as target_probs
    row_bad = nonfinite & valid & ~is_forced
    in_range = (ctok >= 0) & (ctok < V)
    # a child's id outside [0, V) that is not its position's forced id, over every child with a valid parent
    # and a sibling order below MAX_SIBLINGS (the kernels' rule: also children a malformed tree drops or
    # collapses in child_at, so a malformed tree with such an id sets both bits on every backend)
    pc = parent.clamp(0, N - 1)
    par_valid = (pc == 0) | (torch.gather(parent, 1, pc) >= 0)
    f_par = torch.gather(f, 1, pc)
    counted = nonroot & (parent < idx) & par_valid & (sib >= 0) & (sib < MAX_SIBLINGS)
    draft_bad = counted & ((tokens < 0) | (tokens >= V)) & ~((f_par >= 0) & (tokens == f_par))

    # the walk: at the node reached at level d, try its children in sibling order
    cur = torch.zeros(B, dtype=i64, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)               # still descending
    m = torch.zeros(B, dtype=i64, device=dev)
    path = torch.full((B, L1), -1, dtype=i64, device=dev)
    out = torch.full((B, L1), -1, dtype=i64, device=dev)
    path[:, 0] = 0
    p_fin = torch.zeros(B, V, device=dev)                              # law of the final draw
    f_fin = torch.full((B,), -1, dtype=i64, device=dev)
    zero_used = torch.zeros(B, dtype=i64, device=dev)
    stepb, seedb = step.view(B), seed.view(B)
    for d in range(L1):
        kt = ctok[bidx, cur]                                           # [B, KM] children tokens
        kex = exists[bidx, cur]
        kin = in_range[bidx, cur]
        fc = f[bidx, cur]
        forced_c = fc >= 0
        P = torch.nan_to_num(target_probs(x[bidx, cur], temperature, top_k, top_p), nan=0.0)    # [B, V]
        slot = q_slot[bidx, cur].clamp(0, R - 1)
        kind = q_kind[bidx, slot].to(i64) & KIND_MASK
        q = torch.where((kind == KIND_DENSE).view(B, 1), q_state[bidx, slot],
                        torch.where((kind == KIND_UNIFORM).view(B, 1), torch.full((B, V), 1.0 / V, device=dev),
                                    (lanes.view(1, V) == kt[:, :1]).to(torch.float32)))
        u = rng.uniform24(rng.lane_words(seedb, pos + d, stepb, rng.STREAM_TREE_ACCEPT, KM))   # [B, KM]
        p = P
        keep = torch.ones(B, V, device=dev)
        acc_child = torch.full((B,), -1, dtype=i64, device=dev)
        nz = torch.zeros(B, dtype=i64, device=dev)
        for k in range(KM):
            xk = kt[:, k]
            ex = kex[:, k] & (acc_child < 0)
            inr = kin[:, k]
            xc = xk.clamp(0, V - 1).view(B, 1)
            qk = _sibling_law(q, keep)
            qx = torch.where(inr, torch.gather(qk, 1, xc).view(B), torch.zeros_like(p[:, 0]))
            px = torch.where(inr, torch.gather(p, 1, xc).view(B), torch.zeros_like(p[:, 0]))
            live = ex & (qx > 0) & ~forced_c
            acc = torch.where(forced_c, ex & (xk == fc), live & (u[:, k] * qx < px))
            acc_child = torch.where(acc, child_at[bidx, cur, k], acc_child)
            rej = live & ~acc
            r = torch.clamp(p - qk, min=0.0)
            zr = r.sum(-1, keepdim=True)
            pos_mass = zr > 0
            pn = torch.where(pos_mass, r / torch.where(pos_mass, zr, torch.ones_like(zr)), p)
            p = torch.where(rej.view(B, 1), pn, p)
            nz += (rej & ~pos_mass.view(B)).to(i64)
            keep = keep * ~((lanes.view(1, V) == xc) & (kex[:, k] & inr).view(B, 1))
        zero_used += torch.where(alive, nz, torch.zeros_like(nz))
        go = alive & (acc_child >= 0) & (d + 1 < L1)
        stop = alive & ~go
        p_fin = torch.where(stop.view(B, 1), p, p_fin)
        f_fin = torch.where(stop, fc, f_fin)
        if d + 1 < L1:
            path[:, d + 1] = torch.where(go, acc_child, path[:, d + 1])
            out[:, d] = torch.where(go, tokens[bidx, acc_child.clamp(min=0)], out[:, d])
        cur = torch.where(go, acc_child, cur)
        m += go.to(i64)
        alive = go
    # the final draw at the children's position pos + m of the last node: the last residual, or P (bonus)
    E = rng.exponential(rng.lane_words(seedb, pos + m, stepb, rng.STREAM_TREE_RESID, V))   # [B, V]
    cand = torch.where(f_fin >= 0, f_fin, rng.race(p_fin, E))
    out.scatter_(1, m.clamp(max=L1 - 1).view(B, 1), cand.view(B, 1))

    rbad = row_bad.any(1)
    dbad = draft_bad.any(1)
    req_bad = tree_bad | rbad | dbad
    err = (rbad.any().to(torch.int32) * ERR_NONFINITE) | (dbad.any().to(torch.int32) * ERR_DRAFT_RANGE) \
        | (tree_bad.any().to(torch.int32) * ERR_TREE_INDEX)
    status[STATUS_ERR] |= err.to(status.dtype)
    status[STATUS_ZERO_RESID] += torch.where(req_bad, torch.zeros_like(zero_used), zero_used).sum().to(status.dtype)
    neg = lambda t: torch.full_like(t, -1)
    num_accepted = torch.where(req_bad, neg(m), m)
    path = torch.where(req_bad.view(B, 1), neg(path), path)
    out = torch.where(req_bad.view(B, 1), neg(out), out)
    return num_accepted, path, out


# ----------------------------------------------------------------------------- KV update

def kv_moves(path: torch.Tensor, cache_len: torch.Tensor, S: int):
    """The copies of ``tree_kv_update``: ``(move [R, P] bool, src [R, P], dst [R, P], row_bad [R])``.

    Entry j of row r moves slot ``cache_len + path[j]`` to slot ``cache_len + j`` when
    ``path[j] >= 0`` (negative entries are padding) and ``path[j] != j``. A row is malformed
    (error bit 4, nothing of it is moved) when an entry has ``path[j] < j`` (not a path of a tree in
    topological order, and unsafe in place), its source slot is outside ``[0, S)``, or
    ``cache_len < 0``.
    """
    Rr, P = path.shape
    j = torch.arange(P, device=path.device).view(1, P)
    used = path >= 0
    cl = cache_len.view(Rr, 1)
    src = cl + path
    dst = cl + j
    # src >= S tested as path >= S - cache_len: the sum of two large values would wrap past 2^63
    row_bad = (used & ((path < j) | (path >= S - cl.clamp(min=0)))).any(1) | (cache_len < 0)
    move = used & (path != j) & ~row_bad.view(Rr, 1)
    return move, src, dst, row_bad


def _copy_pairs(move, src, dst, S: int):
    """``(src, dst) [R, P]`` of every entry, for one gather and one scatter without a host synchronisation:
    moving entries keep their pair; the others repeat the pair of their row's last moving entry, or copy
    the row's first destination slot (clamped into the cache) onto itself, so that every destination
    written twice receives the same value."""
    Rr, P = move.shape
    j = torch.arange(P, device=move.device).view(1, P)
    last = torch.where(move, j, torch.full_like(j, -1)).amax(1, keepdim=True)       # [R, 1], -1: none
    some = last >= 0
    li = last.clamp(min=0)
    own = dst[:, :1].clamp(0, S - 1)
    fill_src = torch.where(some, torch.gather(src, 1, li), own)
    fill_dst = torch.where(some, torch.gather(dst, 1, li), own)
    return torch.where(move, src, fill_src), torch.where(move, dst, fill_dst)


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its element size: moved bit for bit (the CPU scatter of bf16 rewrote
    NaN payloads in slots it did not write)."""
    return t.view(_BITS[t.element_size()])


def _flag(status, row_bad):
    if status is not None:
        status[STATUS_ERR] |= (row_bad.any().to(torch.int32) * ERR_TREE_INDEX).to(status.dtype)


def tree_kv_update(kv: torch.Tensor, path: torch.Tensor, cache_len: torch.Tensor, status) -> None:
    """Move the accepted path's K/V in place in a stacked cache ``kv [layers, 2, R, H_kv, S, D]``.

    For every model row r and entry j with ``path[r, j] >= 0``: slot ``cache_len[r] + j`` takes the
    old contents of slot ``cache_len[r] + path[r, j]`` (all layers, K and V, all heads), as one
    parallel copy: every source is read before any destination is written. With ``path[j] >= j``
    (what ``kv_moves`` requires) this equals copying in increasing j. Rows that ``kv_moves`` marks
    malformed are left untouched and set bit 4 of ``status[0]``. Nothing else changes. No host
    synchronisation (``_copy_pairs``).
    """
    move, src, dst, row_bad = kv_moves(path, cache_len, kv.shape[4])
    _flag(status, row_bad)
    if path.shape[1] == 0:                                         # an empty path moves nothing
        return
    s, d = _copy_pairs(move, src, dst, kv.shape[4])                # no host synchronisation (capturable)
    L, two, Rr, H, _, D = kv.shape
    shape = (L, two, Rr, H, s.shape[1], D)
    kb = _bits(kv)
    P2 = s.shape[1]                                                # (not -1: R = 0 rows hold 0 elements)
    vals = torch.gather(kb, 4, s.view(1, 1, Rr, 1, P2, 1).expand(shape))        # every source read first
    kb.scatter_(4, d.view(1, 1, Rr, 1, P2, 1).expand(shape), vals)


def tree_kv_update_list(keys, values, path: torch.Tensor, cache_len: torch.Tensor, status) -> None:
    """``tree_kv_update`` for per-layer caches ``keys[l], values[l] [R, H_kv, S, D]`` (Hugging Face style)."""
    move, src, dst, row_bad = kv_moves(path, cache_len, keys[0].shape[2])
    _flag(status, row_bad)
    if path.shape[1] == 0:
        return
    s, d = _copy_pairs(move, src, dst, keys[0].shape[2])
    for c in list(keys) + list(values):
        Rr, H, _, D = c.shape
        shape = (Rr, H, s.shape[1], D)
        cb = _bits(c)
        vals = torch.gather(cb, 2, s.view(Rr, 1, s.shape[1], 1).expand(shape))
        cb.scatter_(2, d.view(Rr, 1, s.shape[1], 1).expand(shape), vals)
