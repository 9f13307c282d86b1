"""Tree ops: ``tree_verify`` and ``tree_kv_update`` (validation, ``torch.library`` registration, dispatch).

Declared once each as ``sjd::tree_verify``, ``sjd::tree_kv_update`` (stacked cache) and
``sjd::tree_kv_update_list`` (per-layer K/V tensors) with the PyTorch reference
(``sjd_kernels.reference.tree``) as the implementation for every device, the Triton and CUDA
kernels selected by the ``backend`` code, and fake kernels for ``torch.compile``. Outputs have
fixed shapes and device errors go to a status tensor, so a step can be captured in a CUDA graph.

Typical use in a decoding loop (``state`` is a :class:`JacobiState` whose ring holds the laws)::

    tree = build_tree(state, root_token, pos, K=4, depth=3, window=W, first=coupled)   # drafts
    ... one forward over tree.input_ids() with tree.attention_mask(...), tree.position_ids(...),
        K/V written at tree.node_slots(cache_len) ...
    out = tree_verify(logits, tree, pos, state)          # logits [B, N, V], row i = node i's output
    tree_kv_update(cache.kv, out.path, cache_len, status=state.status)   # (path per model row)
    cache_len += out.num_accepted + 1;  pos += out.num_accepted + 1
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..reference import tree as ref
from ..reference.jacobi_step import ERR_POS
from ..reference.target import bad_rows
from ._common import (ANY_FLOAT_DTYPES, BACKEND_CODE, CODE_BACKEND, FLOAT_DTYPES, LANES_MAX, ROWS_MAX, SJDDeviceError,
                      SJDInputError, as_int, check_cfg, check_sizes, check_state_and_sampling, check_state_contents,
                      check_status, check_tensor, compiling, guard_pos, host_checks, mark_request_errors, may_sync,
                      new_status, resolve_backend, triton_device)
from .jacobi_step import JacobiState, check_state_type

I64 = (torch.int64,)
TreeLayout = ref.TreeLayout


# ----------------------------------------------------------------------------- registration

@torch.library.custom_op("sjd::tree_verify", mutates_args=("status",))
def _tree_verify_op(logits: torch.Tensor, uncond: Optional[torch.Tensor], cfg_scale: Optional[torch.Tensor],
                    tokens: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor, sib: torch.Tensor,
                    q_slot: torch.Tensor, pos: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                    forced: Optional[torch.Tensor], q_state: torch.Tensor, q_kind: torch.Tensor,
                    status: torch.Tensor, temperature: float, top_k: int, top_p: float, max_depth: int,
                    backend: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step, forced, q_state, q_kind,
            status, temperature, top_k, top_p, max_depth)
    name = CODE_BACKEND[backend]
    if name == "triton":
        from ..triton.tree_verify import tree_verify_triton
        with triton_device(args[0]):
            return tree_verify_triton(*args)
    if name == "cuda":
        from ..cuda.tree_verify import tree_verify_cuda
        return tree_verify_cuda(*args)
    return ref.tree_verify(*args)


@_tree_verify_op.register_fake
def _(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step, forced, q_state, q_kind,
      status, temperature, top_k, top_p, max_depth, backend):
    B = logits.shape[0]
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B, max_depth + 1), dtype=torch.int64),
            logits.new_empty((B, max_depth + 1), dtype=torch.int64))


@torch.library.custom_op("sjd::tree_kv_update", mutates_args=("kv", "status"))
def _tree_kv_update_op(kv: torch.Tensor, path: torch.Tensor, cache_len: torch.Tensor, status: torch.Tensor,
                       backend: int) -> None:
    name = CODE_BACKEND[backend]
    if name == "triton":
        from ..triton.tree_kv_update import tree_kv_update_triton
        with triton_device(path):
            return tree_kv_update_triton(kv, path, cache_len, status)
    if name == "cuda":
        from ..cuda.tree_kv_update import tree_kv_update_cuda
        return tree_kv_update_cuda(kv, path, cache_len, status)
    return ref.tree_kv_update(kv, path, cache_len, status)


@_tree_kv_update_op.register_fake
def _(kv, path, cache_len, status, backend):
    return None


@torch.library.custom_op("sjd::tree_kv_update_list", mutates_args=("keys", "values", "status"))
def _tree_kv_update_list_op(keys: List[torch.Tensor], values: List[torch.Tensor], path: torch.Tensor,
                            cache_len: torch.Tensor, ptr_table: Optional[torch.Tensor], status: torch.Tensor,
                            backend: int) -> None:
    name = CODE_BACKEND[backend]
    if name == "triton":
        from ..triton.tree_kv_update import tree_kv_update_list_triton
        with triton_device(path):
            return tree_kv_update_list_triton(keys, values, path, cache_len, ptr_table, status)
    if name == "cuda":
        from ..cuda.tree_kv_update import tree_kv_update_list_cuda
        return tree_kv_update_list_cuda(keys, values, path, cache_len, ptr_table, status)
    return ref.tree_kv_update_list(keys, values, path, cache_len, status)


@_tree_kv_update_list_op.register_fake
def _(keys, values, path, cache_len, ptr_table, status, backend):
    return None


# ----------------------------------------------------------------------------- helpers

class TreeRowError(SJDInputError):
    """tree_verify on CPU tensors: a row or draft that the device path flags in the status (non-finite
    rows, draft ids out of range), raised at once; a decoding loop treats it as a device error."""


def _dense_only(state: JacobiState) -> None:
    if state.sparse:
        raise SJDInputError("tree drafting needs the dense state (JacobiState.create without capacity): "
                            "siblings are drawn from the stored laws with earlier siblings removed")


def build_tree(state: JacobiState, root_token: torch.Tensor, pos: torch.Tensor, K: int, depth: int, window: int,
               first: torch.Tensor | None = None, forced: torch.Tensor | None = None) -> TreeLayout:
    """Draw a K-ary draft tree of ``depth`` levels then a chain to ``window`` levels (SPEC section 5).

    Laws come from the state's ring (slot ``p % R`` holds the law of absolute position p), noise
    from stream ``STREAM_TREE`` at ``state.step``; ``first [B, window]`` (-1 = none) gives a
    coupled first sibling per level: an id in ``[0, V)`` except at forced positions (checked on the host
    for CPU tensors; on a GPU an id outside the slice ends the request's tree at that level). See
    ``sjd_kernels.reference.tree.build_tree``.
    """
    check_state_type(state)
    _dense_only(state)
    check_tensor("state.q_state", state.q_state, dtypes=(torch.float32,), dim=3)
    B, R, V = state.q_state.shape
    dev = state.q_state.device
    check_tensor("state.q_kind", state.q_kind, dtypes=(torch.int32,), shape=(B, R), dim=2, device=dev)
    for name in ("seed", "step"):
        check_tensor(f"state.{name}", getattr(state, name), dtypes=I64, shape=(B,), dim=1, device=dev)
    check_tensor("root_token", root_token, dtypes=I64, shape=(B,), dim=1, device=dev,
                 last_contiguous=False)   # e.g. x[:, -1]
    check_tensor("pos", pos, dtypes=I64, shape=(B,), dim=1, device=dev)
    if host_checks(pos):
        guard_pos(pos)
    k_, depth_, window_ = as_int(K), as_int(depth), as_int(window)      # Python or NumPy integers, not bools
    if k_ is None or not 1 <= k_ <= ref.MAX_SIBLINGS:
        raise SJDInputError(f"K must be an int in [1, {ref.MAX_SIBLINGS}], got {K!r}")
    if depth_ is None or window_ is None or not 0 <= depth_ <= window_:
        raise SJDInputError(f"need ints 0 <= depth <= window, got depth={depth!r}, window={window!r}")
    K, depth, window = k_, depth_, window_
    if R < window + 1:
        raise SJDInputError(f"state ring ({R} slots) must be >= window + 1 = {window + 1}")
    if first is not None:
        check_tensor("first", first, dtypes=I64, shape=(B, window), dim=2, device=dev)
    if forced is not None:
        check_tensor("forced", forced, dtypes=I64, shape=(B, None), dim=2, device=dev)
    check_state_contents(state, V)
    if first is not None and host_checks(first) and first.numel():
        # an old draft outside the slice would remove its level and every level below (no first sibling,
        # no tree); at a forced position the forced id is the child and ``first`` is not read
        lvl = pos.view(B, 1) + torch.arange(window, device=dev).view(1, window)
        bad = ((first < -1) | (first >= V)) & (ref._forced_at(forced, lvl) < 0)
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise SJDInputError(f"first: request {b}'s level {i + 1} (position {int(lvl[b, i])}) holds "
                                f"{int(first[b, i])}, outside [0, {V}) (-1 = no coupled first sibling)")
    try:
        return ref.build_tree(root_token, pos, state.seed, state.step, state.q_state, state.q_kind, K, depth, window,
                              first=first, forced=forced)
    except ValueError as e:
        raise SJDInputError(str(e)) from None


@dataclass
class TreeOutput:
    num_accepted: torch.Tensor   # [B] i64: accepted draft nodes m; -1 for a request in error
    path: torch.Tensor           # [B, max_depth+1] i64: node indices from the root (m + 1), then -1
    tokens: torch.Tensor         # [B, max_depth+1] i64: the m + 1 committed tokens, then -1


def _first_structure_problem(parent: list, depth: list, sib: list, q_slot: list, R: int, max_depth: int) -> str:
    """The first rule of ``reference.tree.structure_errors`` that one request's tree breaks, in words
    (host lists of that request; for the error message only)."""
    if parent[0] != -1 or depth[0] != 0:
        return f"node 0 (the root) has parent {parent[0]} and depth {depth[0]}, not -1 and 0"
    valid = [i == 0 or parent[i] >= 0 for i in range(len(parent))]
    children = {}
    for i in range(1, len(parent)):
        if not valid[i]:
            continue
        p = parent[i]
        if p >= i:
            return f"node {i}'s parent {p} is not an earlier node"
        if not valid[p]:
            return f"node {i}'s parent {p} is not a node (parent[{p}] = {parent[p]})"
        if depth[i] != depth[p] + 1:
            return f"node {i} has depth {depth[i]}, its parent {p} depth {depth[p]}"
        children.setdefault(p, []).append(i)
    for i in range(len(parent)):
        if valid[i] and not 0 <= depth[i] <= max_depth:
            return f"node {i} has depth {depth[i]}, outside [0, max_depth={max_depth}]"
    for p, ch in sorted(children.items()):
        if len(ch) > ref.MAX_SIBLINGS:
            return f"node {p} has {len(ch)} children, more than {ref.MAX_SIBLINGS}"
        if sorted(sib[i] for i in ch) != list(range(len(ch))):
            return f"node {p}'s children {ch} have sibling orders {[sib[i] for i in ch]}, not 0..{len(ch) - 1}"
        if not 0 <= q_slot[p] < R:
            return f"node {p} has children and q_slot {q_slot[p]}, outside [0, {R})"
    return "a rule below"


def _describe_structure(tree: TreeLayout, R: int) -> str:
    bad, _ = ref.structure_errors(tree.parent, tree.depth, tree.sib, tree.q_slot, R, tree.max_depth)
    rows = bad.nonzero().flatten().tolist()
    b = rows[0]
    what = _first_structure_problem(*(t[b].tolist() for t in (tree.parent, tree.depth, tree.sib, tree.q_slot)), R,
                                    tree.max_depth)
    return (f"malformed tree in request(s) {rows[:8]}: in request {b}, {what}. Need parent[0] = -1 and depth[0] = 0; "
            f"for every node i > 0 0 <= parent[i] < i with parent a node, depth[i] = depth[parent] + 1 <= "
            f"max_depth={tree.max_depth}; each node's children numbered 0..n-1 by sib (n <= {ref.MAX_SIBLINGS}); "
            f"q_slot in [0, {R}) at nodes with children")


def check_verify_kernel_args(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step, forced,
                             q_state, q_kind, status, max_depth, inputs_contiguous: bool = True) -> tuple[int, int, int]:
    """Shapes, dtypes, devices and contiguity of every tensor ``tree_verify`` hands to a kernel, and
    ``max_depth``; returns ``(B, N, V)``. The public op checks them (and the tree's structure), and so do
    the kernel wrappers, which ``torch.ops.sjd.tree_verify`` and direct calls reach without it. No
    value is read (no sync). ``inputs_contiguous=False``: the read-only tree, pos, seed, step and
    forced tensors may be strided (a wrapper that copies them)."""
    ic = inputs_contiguous
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, dim=3)
    B, N, V = logits.shape
    dev = logits.device
    if B < 1 or V < 1 or N < 1:
        raise SJDInputError(f"logits must be [B >= 1, N >= 1, V >= 1], got {list(logits.shape)}")
    if N > ref.MAX_NODES:
        raise SJDInputError(f"at most {ref.MAX_NODES} tree nodes per request, got N = {N}")
    check_sizes("logits", logits, B=(0, ROWS_MAX), V=(2, LANES_MAX))
    check_cfg(uncond, cfg_scale, logits)
    for name, t in (("tokens", tokens), ("parent", parent), ("depth", depth), ("sib", sib), ("q_slot", q_slot)):
        check_tensor(f"tree.{name}", t, dtypes=I64, shape=(B, N), dim=2, device=dev, contiguous=ic, last_contiguous=ic)
    md = as_int(max_depth)
    if md is None or not 0 <= md < N:
        raise SJDInputError(f"tree.max_depth must be an int in [0, N-1 = {N - 1}], got {max_depth!r}")
    for name, t in (("pos", pos), ("state.seed", seed), ("state.step", step)):
        check_tensor(name, t, dtypes=I64, shape=(B,), dim=1, device=dev, contiguous=ic, last_contiguous=ic)
    check_tensor("state.status", status, dtypes=(torch.int32,), shape=(4,), dim=1, device=dev, contiguous=True)
    if forced is not None:
        check_tensor("forced", forced, dtypes=I64, dim=2, shape=(B, None), device=dev, contiguous=ic, last_contiguous=ic)
    check_tensor("state.q_state", q_state, dtypes=(torch.float32,), shape=(B, None, V), dim=3, device=dev,
                 contiguous=True)
    check_tensor("state.q_kind", q_kind, dtypes=(torch.int32,), shape=(B, q_state.shape[1]), dim=2, device=dev,
                 contiguous=True)
    return B, N, V


def validate_verify(logits, tree: TreeLayout, pos, state: JacobiState, uncond, cfg_scale, forced,
                    temperature, top_k, top_p):
    check_state_type(state)
    if not isinstance(tree, TreeLayout):
        raise SJDInputError(f"tree must be a TreeLayout (build_tree), got {type(tree).__name__}")
    _dense_only(state)
    B, N, V = check_verify_kernel_args(logits, uncond, cfg_scale, tree.tokens, tree.parent, tree.depth, tree.sib,
                                       tree.q_slot, pos, state.seed, state.step, forced, state.q_state, state.q_kind,
                                       state.status, tree.max_depth)
    dev = logits.device
    R = state.q_state.shape[1]
    check_state_and_sampling(state, B, V, dev, forced, temperature, top_k, top_p)
    check_state_contents(state, V)
    if host_checks(tree.parent):
        bad, _ = ref.structure_errors(tree.parent, tree.depth, tree.sib, tree.q_slot, R, tree.max_depth)
        if bool(bad.any()):
            raise SJDInputError(_describe_structure(tree, R))


# ----------------------------------------------------------------------------- public ops

def tree_verify(logits: torch.Tensor, tree: TreeLayout, pos: torch.Tensor, state: JacobiState, *,
                uncond_logits: torch.Tensor | None = None, cfg_scale: torch.Tensor | None = None,
                forced: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                backend: str = "auto", advance: bool = True) -> TreeOutput:
    """Verify a ragged batch of draft trees by recursive rejection sampling (SPEC section 5).

    ``logits [B, N, V]`` bf16/fp16/fp32 (row i: the model's output at node i, the target of its
    children's position; may be an image-slice view), ``tree`` the :class:`TreeLayout` the drafts
    were drawn into, ``pos [B]`` the absolute position of the root's children (n, in ``[0, 2^62]``). The laws of the
    children of node i are ``state.q_state[b, tree.q_slot[b, i]]`` with ``state.q_kind``. Randomness:
    ``state.seed`` and ``state.step`` (advanced by one with ``advance``). No host synchronisation
    for CUDA tensors: device errors land in ``state.status`` (``check_status``); CPU tensors are
    checked on the host and raise ``SJDInputError``.
    """
    validate_verify(logits, tree, pos, state, uncond_logits, cfg_scale, forced, temperature, top_k, top_p)
    be = resolve_backend(backend, logits.device)
    # pos outside [0, 2^62]: an SJDInputError on the CPU; elsewhere (no host sync) the request runs at
    # pos 0, returns -1 and sets status bit 16
    pos, pos_bad = guard_pos(pos)
    host = host_checks(logits)
    # CPU: run into a scratch status so that an input error raises before anything is changed
    status = new_status(logits.device) if host else state.status
    out = torch.ops.sjd.tree_verify(
        logits, uncond_logits, cfg_scale, tree.tokens, tree.parent, tree.depth, tree.sib, tree.q_slot, pos,
        state.seed, state.step, forced, state.q_state, state.q_kind, status, float(temperature), int(top_k),
        float(top_p), int(tree.max_depth), BACKEND_CODE[be])
    if host:
        if int(status[0]):
            raise TreeRowError(_describe_inputs(logits, tree, pos, uncond_logits, cfg_scale, forced, int(status[0]),
                                                out[0], temperature))
        state.status[1:] += status[1:]
    out = mark_request_errors(state.status, out, (pos_bad, ERR_POS))
    if advance:
        state.step.add_(1)
    return TreeOutput(*out)


def _describe_inputs(logits, tree: TreeLayout, pos, uncond, cfg_scale, forced, err: int, num_accepted,
                     temperature: float = 1.0) -> str:
    """The message of a CPU input error found by the op (non-finite rows, token ids out of range)."""
    B, N, V = logits.shape
    msgs = []
    rows = (num_accepted < 0).nonzero().flatten().tolist()
    valid = tree.valid
    if err & ref.ERR_NONFINITE:
        x = ref.combine_logits(logits, uncond, cfg_scale)
        nonfinite = bad_rows(x, float(temperature))
        f = ref._forced_at(forced, pos.view(B, 1) + tree.depth.clamp(min=0))
        bad = (nonfinite & valid & (f < 0)).nonzero().tolist()
        msgs.append(f"non-finite logits (NaN, +inf, or no finite value, after CFG and scaling by 1 / temperature "
                    f"= 1 / {temperature:g}) at (request, node) {bad[:8]}; every node's row is the target of its "
                    f"children's position and must be finite unless that position is forced")
    if err & ref.ERR_DRAFT_RANGE:
        idx = torch.arange(N).view(1, N)
        f = ref._forced_at(forced, pos.view(B, 1) + tree.depth.clamp(min=0) - 1)
        bad = (valid & (idx > 0) & ((tree.tokens < 0) | (tree.tokens >= V)) & ((f < 0) | (tree.tokens != f))).nonzero().tolist()
        toks = [int(tree.tokens[b, i]) for b, i in bad[:8]]
        msgs.append(f"draft token ids outside [0, V={V}) at (request, node) {bad[:8]} (tokens {toks}); only the forced "
                    f"id of a forced position may lie outside")
    if err & ref.ERR_TREE_INDEX:
        msgs.append("malformed tree")
    return f"tree_verify: request(s) {rows[:8]}: " + "; ".join(msgs) + " (nothing was changed)"


def _check_kv_lists(keys, values) -> None:
    if len(keys) == 0 or len(keys) != len(values):
        raise SJDInputError(f"keys and values must be non-empty lists of equal length, got {len(keys)} and "
                            f"{len(values)}")


def check_kv_index(path: torch.Tensor, cache_len: torch.Tensor, status: torch.Tensor, dev, R: int) -> None:
    """``path [R, P]`` and ``cache_len [R]`` int64 and ``status [4]`` int32, contiguous on ``dev``: what the
    tree_kv_update kernels index with (their wrappers check it; no value is read)."""
    for name, t, dt in (("path", path, torch.int64), ("cache_len", cache_len, torch.int64),
                        ("status", status, torch.int32)):
        if not isinstance(t, torch.Tensor) or t.device != dev or t.dtype != dt or not t.is_contiguous():
            got = (f"{t.device} {str(t.dtype).replace('torch.', '')} strides {t.stride()}"
                   if isinstance(t, torch.Tensor) else type(t).__name__)
            raise SJDInputError(f"{name} must be a contiguous {str(dt).replace('torch.', '')} tensor on {dev}, got {got}")
    if path.dim() != 2 or path.shape[0] != R or tuple(cache_len.shape) != (R,) or tuple(status.shape) != (4,):
        raise SJDInputError(f"need path [R={R}, P], cache_len [R] and status [4], got {list(path.shape)}, "
                            f"{list(cache_len.shape)}, {list(status.shape)}")


def check_kv_stacked(kv: torch.Tensor) -> tuple[int, ...]:
    """A stacked cache the kernels take: ``[layers, 2, R, H_kv, S, D]`` fp32/fp16/bf16; returns its shape."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 6 or kv.shape[1] != 2 or kv.dtype not in FLOAT_DTYPES:
        got = f"{list(kv.shape)} {kv.dtype}" if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise SJDInputError(f"cache must be [layers, 2, R, H_kv, S, D] bf16/fp16/fp32, got {got}")
    return tuple(kv.shape)


def check_kv_list(keys, values) -> tuple[list, list]:
    """Per-layer caches the list kernels take: equal-length non-empty lists of ``[R, H_kv, S, D]``
    fp32/fp16/bf16 tensors with one shape, strides, dtype and device (the kernels index every layer
    with the first one's strides). Returns them as lists."""
    keys, values = list(keys), list(values)
    _check_kv_lists(keys, values)
    k0 = keys[0]
    if not isinstance(k0, torch.Tensor) or k0.dim() != 4 or k0.dtype not in FLOAT_DTYPES:
        got = f"{list(k0.shape)} {k0.dtype}" if isinstance(k0, torch.Tensor) else type(k0).__name__
        raise SJDInputError(f"keys[0] must be [R, H_kv, S, D] bf16/fp16/fp32, got {got}")
    for t in keys + values:
        if not isinstance(t, torch.Tensor) or t.shape != k0.shape or t.stride() != k0.stride() \
                or t.dtype != k0.dtype or t.device != k0.device:
            got = (f"{list(t.shape)}, strides {t.stride()}, {t.dtype}, {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise SJDInputError(f"every K/V tensor must match keys[0] ({list(k0.shape)}, strides {k0.stride()}, "
                                f"{k0.dtype}, {k0.device}), got {got}")
    return keys, values


def kv_pointer_table(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Device array ``[2 * layers]`` int64 of base addresses ``k0, v0, k1, v1, ...`` for the list layout.

    Build it once per cache allocation and pass it as ``ptr_table`` to keep ``tree_kv_update`` free of
    host-to-device copies (and CUDA-graph capturable). It is only valid while those tensors live.
    """
    for name, lst in (("keys", keys), ("values", values)):
        if isinstance(lst, (torch.Tensor, str, bytes)) or not hasattr(lst, "__iter__"):
            raise SJDInputError(f"{name} must be a list of per-layer tensors, got {type(lst).__name__}")
    keys, values = list(keys), list(values)
    _check_kv_lists(keys, values)
    for name, lst in (("keys", keys), ("values", values)):
        for i, t in enumerate(lst):
            if not isinstance(t, torch.Tensor):
                raise SJDInputError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    ptrs = [t.data_ptr() for kv in zip(keys, values) for t in kv]
    return torch.tensor(ptrs, dtype=torch.int64).to(keys[0].device, non_blocking=False)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` of the memory a tensor's elements occupy."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


_OVERLAP_LIST_MAX = 1 << 22                               # elements _self_overlap lists
_OVERLAP_SEARCH_BUDGET = 100_000


@functools.lru_cache(maxsize=4096)
def _same_layout_views_overlap(delta: int, shape: tuple, stride: tuple, esize: int):
    """Whether two tensors of one shape and strides (elements of ``esize`` bytes), the second starting
    ``delta`` bytes after the first, have a byte in common: whether some integers ``c_k`` with
    ``|c_k| <= shape_k - 1`` and ``e`` with ``|e| <= esize - 1`` give ``sum_k c_k stride_k esize + e = delta``.
    A depth-first search over the dimensions by decreasing stride, each bounded by what the smaller
    ones can still reach (a few nodes for the layouts caches use); None when it runs out of budget."""
    terms: dict = {1: esize - 1}
    for n, st in zip(shape, stride):
        if n > 1:
            w = st * esize
            terms[w] = terms.get(w, 0) + n - 1
    ws = sorted(terms, reverse=True)
    reach = [0] * (len(ws) + 1)
    for i in range(len(ws) - 1, -1, -1):
        reach[i] = reach[i + 1] + ws[i] * terms[ws[i]]
    nodes = 0

    def search(i: int, r: int):
        nonlocal nodes
        nodes += 1
        if nodes > _OVERLAP_SEARCH_BUDGET:
            return None
        if i == len(ws):
            return r == 0
        w, m, rest = ws[i], terms[ws[i]], reach[i + 1]
        lo = max(-m, -((rest - r) // w))          # ceil((r - rest) / w)
        hi = min(m, (r + rest) // w)
        for x in range(lo, hi + 1):
            got = search(i + 1, r - x * w)
            if got is not False:
                return got
        return False

    return search(0, abs(delta)) if abs(delta) <= reach[0] else False


def _self_overlap(t: torch.Tensor):
    """For a tensor ``torch._debug_has_internal_overlap`` cannot judge (2): whether two of its elements
    share memory. False when each stride, in increasing order, passes the furthest offset the smaller
    ones reach (no two index vectors meet); else decided by listing every offset when there are at most
    ``_OVERLAP_LIST_MAX`` elements; None when that is too many to list."""
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride()) if n > 1)
    reach = 0
    for st, n in dims:
        if st <= reach:
            break
        reach += st * (n - 1)
    else:
        return False
    if t.numel() > _OVERLAP_LIST_MAX:
        return None
    off = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        off = off.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return torch.unique(off.reshape(-1)).numel() < t.numel()


def _check_no_overlap(kv, keys, values) -> None:
    """An in-place move through two views of the same memory would be applied twice: refuse caches
    whose tensors overlap each other or themselves (a stride-0 dimension, e.g. ``expand``). The per-layer
    tensors share one shape and strides (``_validate_kv``), so whether two of them share a byte depends
    only on how far apart they start (``_same_layout_views_overlap``)."""
    tensors = [("cache", kv)] if kv is not None else \
        [(f"keys[{i}]", t) for i, t in enumerate(keys)] + [(f"values[{i}]", t) for i, t in enumerate(values)]
    for name, t in tensors:
        verdict = torch._debug_has_internal_overlap(t)         # 1: certainly overlapping, 0 no, 2 too hard to tell
        shared = True if verdict == 1 else (_self_overlap(t) if verdict == 2 else False)
        if shared is None:
            raise SJDInputError(f"{name} is a strided view laid out so that whether its elements share memory "
                                f"could not be decided (shape {list(t.shape)}, strides {t.stride()}); pass a "
                                f"cache with its own storage per element")
        if shared:
            raise SJDInputError(f"{name} has elements that share memory (a stride-0 or overlapping view, "
                                f"strides {t.stride()}); pass a cache with its own storage per element")
    if kv is None:
        # only tensors whose extents intersect can share memory; interleaved strided views of one buffer
        # (e.g. layers sliced from [R, layers, H, S, D]) intersect without sharing an element
        spans = sorted((_span(t), name, t) for name, t in tensors if t.numel() > 0)
        for i, ((a0, a1), na, ta) in enumerate(spans):
            for (b0, b1), nb, tb in spans[i + 1:]:
                if b0 >= a1:
                    break
                shared = True if a0 == b0 else _same_layout_views_overlap(
                    b0 - a0, tuple(ta.shape), tuple(ta.stride()), ta.element_size())
                if shared is None:
                    raise SJDInputError(f"{na} and {nb} are strided views of one buffer laid out so that whether "
                                        f"they share memory could not be decided (strides {ta.stride()}); pass "
                                        f"separate tensors per layer")
                if shared:
                    raise SJDInputError(f"{na} and {nb} share memory (the same tensor listed twice, or "
                                        f"overlapping views of one buffer); every layer's K and V must be "
                                        f"separate memory")


def _check_ptr_table(ptr_table, keys, values) -> None:
    """On the CPU (host checks): the table must hold the lists' own base addresses."""
    want = [t.data_ptr() for kv in zip(keys, values) for t in kv]
    got = ptr_table.tolist()
    if got != want:
        raise SJDInputError("ptr_table does not hold the addresses of these keys and values (kv_pointer_table "
                            "must be rebuilt when the cache tensors are reallocated)")


def _normalise_cache(cache):
    """``(stacked_tensor, None, None)`` or ``(None, keys, values)`` from any accepted cache form."""
    if isinstance(cache, torch.Tensor):
        return cache, None, None
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):          # transformers DynamicCache (older)
        return None, list(cache.key_cache), list(cache.value_cache)
    if hasattr(cache, "layers") and all(hasattr(l, "keys") for l in cache.layers):   # transformers >= 4.54
        return None, [l.keys for l in cache.layers], [l.values for l in cache.layers]
    # (keys, values) lists; with 2 layers a list of (k, v) pairs reads the same way, which is harmless:
    # every tensor gets the same moves. Unequal lengths are reported by _validate_kv.
    if isinstance(cache, (tuple, list)) and len(cache) == 2 and all(isinstance(c, (tuple, list)) for c in cache) \
            and all(isinstance(t, torch.Tensor) for c in cache for t in c):
        return None, list(cache[0]), list(cache[1])
    if isinstance(cache, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in cache):
        return None, [p[0] for p in cache], [p[1] for p in cache]
    raise SJDInputError("cache must be a stacked tensor [layers, 2, R, H_kv, S, D], a pair (keys, values) of "
                        "per-layer lists, a list of per-layer (k, v) pairs, or a transformers cache; got "
                        f"{type(cache).__name__}")


def _validate_kv(kv, keys, values, path, cache_len, status):
    if kv is not None:
        check_tensor("cache", kv, dtypes=ANY_FLOAT_DTYPES, dim=6)   # float64: torch backend only
        L, two, R, H, S, D = kv.shape
        if two != 2:
            raise SJDInputError(f"cache must be [layers, 2, R, H_kv, S, D] (dim 1 = K, V), got {list(kv.shape)}")
        dev, dt = kv.device, kv.dtype
    else:
        _check_kv_lists(keys, values)
        check_tensor("keys[0]", keys[0], dtypes=ANY_FLOAT_DTYPES, dim=4)
        R, H, S, D = keys[0].shape
        dev, dt, st = keys[0].device, keys[0].dtype, keys[0].stride()
        for name, lst in (("keys", keys), ("values", values)):
            for i, t in enumerate(lst):
                check_tensor(f"{name}[{i}]", t, dtypes=(dt,), shape=(R, H, S, D), dim=4, device=dev)
                if t.stride() != st:
                    raise SJDInputError(f"{name}[{i}] must have the strides of keys[0] {st}, got {t.stride()}")
    check_sizes("cache" if kv is not None else "keys[0]", kv if kv is not None else keys[0],
                H_kv=(-3, ROWS_MAX), D=(-1, LANES_MAX))           # the kernels' 32-bit sizes, one contract
    check_tensor("path", path, dtypes=I64, dim=2, shape=(R, None), device=dev, contiguous=True)
    check_tensor("cache_len", cache_len, dtypes=I64, shape=(R,), dim=1, device=dev, contiguous=True)
    if status is not None:
        check_tensor("status", status, dtypes=(torch.int32,), shape=(4,), dim=1, device=dev, contiguous=True)
    return S


def tree_kv_update(cache, path: torch.Tensor, cache_len: torch.Tensor, *, status: torch.Tensor | None = None,
                   ptr_table: torch.Tensor | None = None, backend: str = "auto") -> None:
    """Move the accepted path's K/V into place after each row's committed prefix (in place, one launch).

    ``cache``: a stacked tensor ``[layers, 2, R, H_kv, S, D]`` or per-layer K/V tensors ``[R, H_kv, S, D]``
    (``(keys, values)`` lists, a list of ``(k, v)`` pairs, or a transformers cache), bf16/fp16/fp32.
    ``path [R, P]`` i64 per model row (``tree_verify``'s path; repeat it for CFG rows), ``cache_len [R]``
    the committed prefix length before the step (node i sits at slot ``cache_len + i``). Slot
    ``cache_len + j`` receives node ``path[j]``; negative entries are padding. Every entry must have
    ``path[j] >= j`` and a source slot inside the cache; a row that breaks this is left untouched.
    Errors: with ``status`` given they set bit 4 of ``status[0]`` on the device (check it with
    ``check_status``; no backend synchronises, so the call can be captured in a CUDA graph); without
    it, and always for CPU tensors, the call checks on the host and raises ``SJDInputError`` (except
    under ``torch.compile`` or a CUDA graph capture, which cannot synchronise: pass ``status`` there,
    or bad rows are skipped without a report).
    """
    kv, keys, values = _normalise_cache(cache)
    S = _validate_kv(kv, keys, values, path, cache_len, status)
    dev = path.device
    sync_check = status is None or host_checks(path)
    if sync_check and may_sync(path):
        _, _, _, row_bad = ref.kv_moves(path, cache_len, S)
        if bool(row_bad.any()):
            rows = row_bad.nonzero().flatten().tolist()
            raise SJDInputError(f"tree_kv_update: bad path in row(s) {rows[:8]}: need path[j] >= j for every "
                                f"entry >= 0, cache_len >= 0 and source slots cache_len + path[j] < S = {S}; "
                                f"path = {path[rows[0]].tolist()}, cache_len = {int(cache_len[rows[0]])}")
    st = status if status is not None else new_status(dev)
    be = resolve_backend(backend, dev)
    if (kv if kv is not None else keys[0]).dtype == torch.float64 and be != "torch":
        raise SJDInputError(f"a float64 cache needs backend 'torch' (the {be} kernels take fp32/fp16/bf16)")
    if not compiling():
        _check_no_overlap(kv, keys, values)
    if be in ("cuda", "triton"):   # the kernels' launch limits, as an input error before anything runs:
        layers = kv.shape[0] if kv is not None else len(keys)   # both launch on grid (heads, 2 * layers, R),
        R, P = path.shape                                       # the CUDA one copies the path to shared memory
        grid_ok = R <= 65535 and 2 * layers <= 65535
        if not grid_ok or (be == "cuda" and P > 8192):
            what = ("65535 rows, 32767 layers and paths of 8192 entries" if be == "cuda"
                    else "65535 rows and 32767 layers")
            alt = "backend='triton' or 'torch'" if grid_ok else "backend='torch'"
            raise SJDInputError(f"the {'CUDA' if be == 'cuda' else 'Triton'} kernel of tree_kv_update takes at "
                                f"most {what}, got R = {R}, {layers} layers, P = {P}: use {alt}")
    if kv is not None:
        torch.ops.sjd.tree_kv_update(kv, path, cache_len, st, BACKEND_CODE[be])
    else:
        if ptr_table is not None:
            check_tensor("ptr_table", ptr_table, dtypes=I64, shape=(2 * len(keys),), dim=1, device=dev,
                         contiguous=True)
            if host_checks(ptr_table):
                _check_ptr_table(ptr_table, keys, values)
        torch.ops.sjd.tree_kv_update_list(list(keys), list(values), path, cache_len, ptr_table, st, BACKEND_CODE[be])


__all__ = ["TreeLayout", "TreeOutput", "build_tree", "tree_verify", "tree_kv_update", "kv_pointer_table",
           "SJDDeviceError", "check_status"]
