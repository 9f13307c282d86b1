"""Triton kernels of ``tree_verify`` (spec: ``sjd_kernels.reference.tree.tree_verify``).

Two launches, no host synchronisation, fixed output shapes (CUDA-graph capturable):

1. ``_tree_rowcheck_kernel``, grid ``(B, N)``: one program per node slot. The reference flags a
   request whose target row of ANY valid node (walked or not) is non-finite at a position that is
   not forced, so every such row is read once here (``row_nonfinite``, the shared definition of a
   bad row) and a per-node flag goes to scratch. This pass is what reads all ``N x V`` logits.
2. ``_tree_verify_kernel``, grid ``(B,)``: one program per request. It checks the tree structure
   (``reference.tree.structure_errors``: pairwise over node chunks) and the draft ids, combines
   the error flags, then walks from the root exactly as the reference: at a node it builds the
   target row with the shared pipeline (``sampling.target_row``), tries the children in sibling
   order with the sibling law ``q_k`` (``q`` with earlier siblings removed, renormalised), accepts
   iff ``u_k * q_k(x) < p_k(x)``, on rejection moves to ``norm(max(0, p_k - q_k))`` (a zero sum
   keeps ``p_k`` and is counted), descends into the accepted child, and at the node where every
   child fails draws from the last ``p`` by the exponential race with ``STREAM_TREE_RESID`` noise.
   Forced positions accept the child equal to the forced id, else commit the forced id.

Numerics follow the float32 reference op by op (``enable_fp_fusion=False``, ``div_rn``, libdevice
``exp``/``log``); only the order of the float sums (softmax, ``sum(q_k)``, ``sum(r)``) differs.

Tile: one row is one register tile ``BLOCK_V = next_power_of_2(V)`` as in ``jacobi_step``; the
vectors live during the sibling loop are ``q``, ``keep``, ``p`` and the current ``q_k``, which
spill registers for V >= 16384 (the CUDA kernel keeps ``p`` in shared memory and streams ``q``).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import rng as _rng
from ..ops._common import lane_contiguous
from ..reference import jacobi_step as _js
from ..reference import target as _ref_target
from ..reference import tree as _ref
from .jacobi_step import K_DENSE, K_MASK, K_UNIFORM, _num_warps, is_interpreted  # noqa: F401 (is_interpreted: public)
from .rng import counter_word, lane_words, seed_key
from .sampling import exponential, gather_lane, race, row_nonfinite, target_row, uniform24

S_TREE_ACCEPT: tl.constexpr = tl.constexpr(_rng.STREAM_TREE_ACCEPT)
S_TREE_RESID: tl.constexpr = tl.constexpr(_rng.STREAM_TREE_RESID)
E_NONFINITE: tl.constexpr = tl.constexpr(_js.ERR_NONFINITE)
E_DRAFT: tl.constexpr = tl.constexpr(_js.ERR_DRAFT_RANGE)
E_TREE: tl.constexpr = tl.constexpr(_js.ERR_TREE_INDEX)
MAX_SIB: tl.constexpr = tl.constexpr(_ref.MAX_SIBLINGS)
BIG: tl.constexpr = tl.constexpr(1 << 30)


@triton.jit
def _forced_at(forced_ptr, b, L, position, HAS_FORCED: tl.constexpr):
    """Forced id at absolute ``position`` (int64 scalar or tile), -1 where none."""
    if HAS_FORCED:
        f = tl.load(forced_ptr + b * L + position, mask=(position >= 0) & (position < L), other=-1)
    else:
        f = tl.zeros_like(position) - 1
    return f


@triton.jit
def _combined_row(logits_ptr, s_lb, s_ln, uncond_ptr, s_ub, s_un, cfg_ptr, b, i, lanes, valid,
                  HAS_UNCOND: tl.constexpr):
    """CFG-combined float32 logits ``u + s * (c - u)`` of node row i of request b."""
    x = tl.load(logits_ptr + b * s_lb + i * s_ln + lanes, mask=valid, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(uncond_ptr + b * s_ub + i * s_un + lanes, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(cfg_ptr + b)
        x = tl.where((x == -float("inf")) & (u == -float("inf")), x, u + s * (x - u))
    return x


@triton.jit
def _tree_rowcheck_kernel(
        logits_ptr, s_lb, s_ln, uncond_ptr, s_ub, s_un, cfg_ptr,
        parent_ptr, depth_ptr, pos_ptr, forced_ptr, L, rowflag_ptr,
        N, V, inv_t,
        HAS_UNCOND: tl.constexpr, HAS_FORCED: tl.constexpr, GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)     # requests on grid x: grid y stops at 65535
    i = tl.program_id(1).to(tl.int64)
    par = tl.load(parent_ptr + b * N + i)
    dep = tl.load(depth_ptr + b * N + i)
    node = (i == 0) | (par >= 0)
    f = _forced_at(forced_ptr, b, L, tl.load(pos_ptr + b) + tl.maximum(dep, 0), HAS_FORCED)
    flag = tl.zeros([], dtype=tl.int32)
    if node & (f < 0):
        lanes = tl.arange(0, BLOCK_V)
        valid = lanes < V
        x = _combined_row(logits_ptr, s_lb, s_ln, uncond_ptr, s_ub, s_un, cfg_ptr, b, i, lanes, valid, HAS_UNCOND)
        flag = row_nonfinite(x, valid, inv_t, GREEDY).to(tl.int32)
    tl.store(rowflag_ptr + b * N + i, flag)


@triton.jit
def _is_child(parent_ptr, b, N, idx, par, inb):
    """Slot ``idx`` is a non-root node whose parent is an earlier node (``child`` of structure_errors)."""
    pc = tl.minimum(tl.maximum(par, 0), N - 1)
    pp = tl.load(parent_ptr + b * N + pc, mask=inb, other=-1)
    par_valid = (pc == 0) | (pp >= 0)
    return inb & (idx > 0) & (par >= 0) & (par < idx) & par_valid


@triton.jit
def _tree_verify_kernel(
        logits_ptr, s_lb, s_ln, uncond_ptr, s_ub, s_un, cfg_ptr,
        tokens_ptr, parent_ptr, depth_ptr, sib_ptr, qslot_ptr, pos_ptr, seed_ptr, step_ptr, forced_ptr, L,
        q_state_ptr, q_kind_ptr, rowflag_ptr, status_ptr, num_acc_ptr, path_ptr, out_ptr,
        N, V, R, max_depth, inv_t, top_k, top_p, q_unif,
        HAS_UNCOND: tl.constexpr, HAS_FORCED: tl.constexpr, GREEDY: tl.constexpr, DO_TOPK: tl.constexpr,
        DO_TOPP: tl.constexpr, INTERP: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    L1 = max_depth + 1

    # ---- the tree of this request, one tile of node slots
    idx = tl.arange(0, BLOCK_N).to(tl.int64)
    inb = idx < N
    base = b * N
    par = tl.load(parent_ptr + base + idx, mask=inb, other=-1)
    dep = tl.load(depth_ptr + base + idx, mask=inb, other=-1)
    sb = tl.load(sib_ptr + base + idx, mask=inb, other=-1)
    qs = tl.load(qslot_ptr + base + idx, mask=inb, other=-1)
    tok = tl.load(tokens_ptr + base + idx, mask=inb, other=-1)
    valid = inb & ((idx == 0) | (par >= 0))
    nonroot = valid & (idx > 0)
    pc = tl.minimum(tl.maximum(par, 0), N - 1)
    par_par = tl.load(parent_ptr + base + pc, mask=inb, other=-1)
    par_dep = tl.load(depth_ptr + base + pc, mask=inb, other=-1)
    par_ok = (par < idx) & ((pc == 0) | (par_par >= 0))
    dep_ok = dep == par_dep + 1
    node_bad = nonroot & ~(par_ok & dep_ok)
    node_bad = node_bad | (valid & ((dep > max_depth) | (dep < 0)))
    child = nonroot & par_ok

    # ---- structure: sibling orders 0..n-1 without duplicates, children counts (pairwise by chunks)
    n_sib = tl.zeros([BLOCK_N], dtype=tl.int32)     # children of my parent (me included)
    n_dup = tl.zeros([BLOCK_N], dtype=tl.int32)     # siblings with my order
    n_ch = tl.zeros([BLOCK_N], dtype=tl.int32)      # my children
    j0 = tl.zeros([], dtype=tl.int64)
    while j0 < N:                      # (a while loop: the interpreter cannot range() over a runtime int)
        jdx = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        jin = jdx < N
        par_j = tl.load(parent_ptr + base + jdx, mask=jin, other=-1)
        sb_j = tl.load(sib_ptr + base + jdx, mask=jin, other=-1)
        ch_j = _is_child(parent_ptr, b, N, jdx, par_j, jin)
        same = child[:, None] & ch_j[None, :] & (par[:, None] == par_j[None, :])
        n_sib += tl.sum(same.to(tl.int32), 1)
        n_dup += tl.sum((same & (sb[:, None] == sb_j[None, :]) & (idx[:, None] != jdx[None, :])).to(tl.int32), 1)
        n_ch += tl.sum((ch_j[None, :] & (par_j[None, :] == idx[:, None])).to(tl.int32), 1)
        j0 += BLOCK_J
    sib_bad = child & ((sb < 0) | (sb >= n_sib) | (n_dup > 0))
    many = n_ch > MAX_SIB
    slot_bad = valid & (n_ch > 0) & ((qs < 0) | (qs >= R))
    root_bad = (tl.load(parent_ptr + base) != -1) | (tl.load(depth_ptr + base) != 0)
    tree_bad = root_bad | (tl.max((node_bad | sib_bad | many | slot_bad).to(tl.int32), 0) > 0)

    # ---- draft ids: a child's token outside [0, V) that is not its parent's forced id
    pos = tl.load(pos_ptr + b)
    f_par = _forced_at(forced_ptr, b, L, pos + tl.maximum(par_dep, 0), HAS_FORCED)
    ok_child = nonroot & (par < idx) & (sb >= 0) & (sb < MAX_SIB) & ((pc == 0) | (par_par >= 0))
    d_bad = ok_child & ((tok < 0) | (tok >= V)) & ~((f_par >= 0) & (tok == f_par))
    draft_bad = tl.max(d_bad.to(tl.int32), 0) > 0
    rflag = tl.load(rowflag_ptr + base + idx, mask=valid, other=0)
    row_bad = tl.max(rflag, 0) > 0
    req_bad = tree_bad | draft_bad | row_bad
    err = tl.where(row_bad, E_NONFINITE, 0) | tl.where(draft_bad, E_DRAFT, 0) | tl.where(tree_bad, E_TREE, 0)
    if err != 0:
        tl.atomic_or(status_ptr, err)

    # ---- the walk
    lidx = tl.arange(0, BLOCK_L).to(tl.int64)
    path_t = tl.where(lidx == 0, 0, tl.full([BLOCK_L], -1, tl.int64))
    out_t = tl.full([BLOCK_L], -1, tl.int64)
    m = tl.zeros([], dtype=tl.int64)
    n_zero = tl.zeros([], dtype=tl.int32)
    if not req_bad:
        lanes = tl.arange(0, BLOCK_V)
        vlane = lanes < V
        k0, k1 = seed_key(tl.load(seed_ptr + b))
        c_step = counter_word(tl.load(step_ptr + b))
        l16 = tl.arange(0, MAX_SIB)
        cur = tl.zeros([], dtype=tl.int64)
        go = tl.full([], 1, tl.int32)
        while go != 0:
            cpos = pos + m                          # depth of cur is m: the children's position
            f = _forced_at(forced_ptr, b, L, cpos, HAS_FORCED)
            mine = child & (par == cur)
            n_kids = tl.sum(mine.to(tl.int32), 0)
            acc = tl.full([], -1, tl.int64)
            final = tl.full([], -1, tl.int64)
            if f >= 0:
                # the child equal to the forced id (first in sibling order) is accepted, none else
                hit = mine & (tok == f)
                ks = tl.min(tl.where(hit, sb, BIG), 0)
                acc = tl.min(tl.where(hit & (sb == ks), idx, BIG), 0)
                acc = tl.where(acc < BIG, acc, -1)
                final = f
            else:
                x = _combined_row(logits_ptr, s_lb, s_ln, uncond_ptr, s_ub, s_un, cfg_ptr, b, cur, lanes, vlane,
                                  HAS_UNCOND)
                p, _bad = target_row(x, lanes, vlane, V, inv_t, top_k, top_p, GREEDY, DO_TOPK, DO_TOPP, INTERP)
                if n_kids > 0:
                    slot = tl.minimum(tl.maximum(tl.sum(tl.where(idx == cur, qs, 0), 0), 0), R - 1)
                    kind = tl.load(q_kind_ptr + b * R + slot) & K_MASK
                    first = tl.sum(tl.where(mine & (sb == 0), tok, 0), 0) \
                        - tl.where(tl.sum((mine & (sb == 0)).to(tl.int32), 0) > 0, 0, 1)   # -1 if no sibling 0
                    q = tl.load(q_state_ptr + (b * R + slot) * V + lanes, mask=vlane & (kind == K_DENSE), other=0.0)
                    q = tl.where(kind == K_UNIFORM, q_unif, q)
                    q = tl.where((kind != K_DENSE) & (kind != K_UNIFORM), tl.where(lanes == first, 1.0, 0.0), q)
                    q = tl.where(vlane, q, 0.0)
                    keep = tl.where(vlane, 1.0, 0.0)
                    wacc = lane_words(k0, k1, counter_word(cpos), c_step, S_TREE_ACCEPT, MAX_SIB)
                    k = tl.zeros([], dtype=tl.int32)
                    while (k < n_kids) & (acc < 0):
                        ck = tl.min(tl.where(mine & (sb == k), idx, BIG), 0)
                        xk = tl.sum(tl.where(idx == ck, tok, 0), 0)
                        inr = (xk >= 0) & (xk < V)
                        qm = q * keep
                        z = tl.sum(qm, 0)
                        qk = tl.where(z > 0.0, tl.math.div_rn(qm, tl.zeros_like(qm) + tl.where(z > 0.0, z, 1.0)),
                                      0.0)
                        qx = tl.where(inr, gather_lane(qk, lanes, xk), 0.0)
                        px = tl.where(inr, gather_lane(p, lanes, xk), 0.0)
                        u = uniform24(tl.max(tl.where(l16 == k, wacc, 0), 0))
                        if qx > 0.0:
                            if u * qx < px:
                                acc = ck
                            else:
                                r = tl.maximum(p - qk, 0.0)
                                zr = tl.sum(r, 0)
                                if zr > 0.0:
                                    p = tl.math.div_rn(r, tl.zeros_like(r) + zr)
                                else:
                                    n_zero += 1
                        keep = tl.where((lanes == xk) & inr, 0.0, keep)
                        k += 1
                if acc < 0:
                    E = exponential(lane_words(k0, k1, counter_word(cpos), c_step, S_TREE_RESID, BLOCK_V))
                    final = race(p, E, lanes, vlane).to(tl.int64)
            if acc >= 0:
                out_t = tl.where(lidx == m, tl.sum(tl.where(idx == acc, tok, 0), 0), out_t)
                m += 1
                path_t = tl.where(lidx == m, acc, path_t)
                cur = acc
            else:
                out_t = tl.where(lidx == m, final, out_t)
                go = tl.zeros([], dtype=tl.int32)
        if n_zero > 0:
            tl.atomic_add(status_ptr + 1, n_zero)
    else:
        path_t = tl.full([BLOCK_L], -1, tl.int64)
        m = m - 1
    tl.store(num_acc_ptr + b, m)
    tl.store(path_ptr + b * L1 + lidx, path_t, mask=lidx < L1)
    tl.store(out_ptr + b * L1 + lidx, out_t, mask=lidx < L1)


def kernel_config(V: int, N: int, max_depth: int) -> dict:
    """Block sizes and warps of both kernels (also used by the codegen test)."""
    block_v = max(16, triton.next_power_of_2(V))
    block_n = max(2, triton.next_power_of_2(N))
    return {"BLOCK_V": block_v, "num_warps": _num_warps(block_v), "BLOCK_N": block_n,
            "BLOCK_J": min(block_n, 16), "BLOCK_L": max(2, triton.next_power_of_2(max_depth + 1))}


def tree_verify_triton(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step, forced,
                       q_state, q_kind, status, temperature, top_k, top_p, max_depth):
    """Fused Triton ``tree_verify``: same arguments, outputs and status updates as the reference.

    ``logits``/``uncond`` ``[B, N, V]`` bf16/fp16/fp32 with a contiguous last dim; tree tensors
    ``[B, N]`` int64, state tensors contiguous. Returns ``(num_accepted [B], path [B, max_depth+1],
    tokens [B, max_depth+1])`` int64.
    """
    from ..ops._common import check_sampling
    from ..ops.tree import check_verify_kernel_args
    B, N, V = check_verify_kernel_args(logits, uncond, cfg_scale, tokens, parent, depth, sib, q_slot, pos, seed, step,
                                       forced, q_state, q_kind, status, max_depth, inputs_contiguous=False)
    check_sampling(temperature, top_k, top_p, V)
    R = q_state.shape[1]
    L1 = int(max_depth) + 1
    dev = logits.device
    temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
    greedy = temperature == 0.0
    inv_t = float(np.float32(1.0) / np.float32(temperature)) if not greedy else 1.0
    has_forced = forced is not None and forced.numel() > 0
    logits, uncond = lane_contiguous(logits), lane_contiguous(uncond)
    tokens, parent, depth, sib, q_slot, pos, seed, step = (
        t.contiguous() for t in (tokens, parent, depth, sib, q_slot, pos, seed, step))
    forced_t = forced.contiguous() if has_forced else pos
    L = forced.shape[1] if has_forced else 0
    unc = uncond if uncond is not None else logits
    cfg_t = cfg_scale if uncond is not None else q_state
    cfg = kernel_config(V, N, max_depth)
    interp = is_interpreted()

    rowflag = torch.empty(B, N, dtype=torch.int32, device=dev)
    num_accepted = torch.empty(B, dtype=torch.int64, device=dev)
    path = torch.empty(B, L1, dtype=torch.int64, device=dev)
    out = torch.empty(B, L1, dtype=torch.int64, device=dev)
    _tree_rowcheck_kernel[(B, N)](
        logits, logits.stride(0), logits.stride(1), unc, unc.stride(0), unc.stride(1), cfg_t,
        parent, depth, pos, forced_t, L, rowflag, N, V, inv_t,
        HAS_UNCOND=uncond is not None, HAS_FORCED=has_forced, GREEDY=greedy, BLOCK_V=cfg["BLOCK_V"],
        num_warps=cfg["num_warps"], enable_fp_fusion=False)
    _tree_verify_kernel[(B,)](
        logits, logits.stride(0), logits.stride(1), unc, unc.stride(0), unc.stride(1), cfg_t,
        tokens, parent, depth, sib, q_slot, pos, seed, step, forced_t, L,
        q_state, q_kind, rowflag, status, num_accepted, path, out,
        N, V, R, int(max_depth), inv_t, top_k, top_p, 1.0 / V,
        HAS_UNCOND=uncond is not None, HAS_FORCED=has_forced, GREEDY=greedy,
        DO_TOPK=(not greedy) and 0 < top_k < V, DO_TOPP=(not greedy) and _ref_target.topp_on(top_p), INTERP=interp,
        BLOCK_V=cfg["BLOCK_V"], BLOCK_N=cfg["BLOCK_N"], BLOCK_J=cfg["BLOCK_J"], BLOCK_L=cfg["BLOCK_L"],
        num_warps=cfg["num_warps"], enable_fp_fusion=False)
    return num_accepted, path, out


_LOGIT_ARGS = dict(logits_ptr=None, s_lb="i64", s_ln="i64", uncond_ptr=None, s_ub="i64", s_un="i64", cfg_ptr="*fp32")
_CHECK_TYPES = dict(_LOGIT_ARGS, parent_ptr="*i64", depth_ptr="*i64", pos_ptr="*i64", forced_ptr="*i64", L="i32",
                    rowflag_ptr="*i32", N="i32", V="i32", inv_t="fp32")
_VERIFY_TYPES = dict(_LOGIT_ARGS, tokens_ptr="*i64", parent_ptr="*i64", depth_ptr="*i64", sib_ptr="*i64",
                     qslot_ptr="*i64", pos_ptr="*i64", seed_ptr="*i64", step_ptr="*i64", forced_ptr="*i64", L="i32",
                     q_state_ptr="*fp32", q_kind_ptr="*i32", rowflag_ptr="*i32", status_ptr="*i32",
                     num_acc_ptr="*i64", path_ptr="*i64", out_ptr="*i64", N="i32", V="i32", R="i32",
                     max_depth="i32", inv_t="fp32", top_k="i32", top_p="fp32", q_unif="fp32")


def codegen_cases(V: int = 16384, N: int = 85 + 8, max_depth: int = 11) -> list[dict]:
    """Representative compilations of this module's kernels (for the ahead-of-time codegen test):
    the walk kernel for bf16 (CFG, forced, top-k + top-p) and fp32 (greedy; plain sampling), the
    row check for both."""
    cfg = kernel_config(V, N, max_depth)
    cases = []
    walks = [("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, GREEDY=False, DO_TOPK=True, DO_TOPP=True)),
             ("fp32", dict(HAS_UNCOND=False, HAS_FORCED=False, GREEDY=False, DO_TOPK=False, DO_TOPP=False)),
             ("fp32", dict(HAS_UNCOND=False, HAS_FORCED=True, GREEDY=True, DO_TOPK=False, DO_TOPP=False))]
    for dt, ce in walks:
        ce = dict(ce, INTERP=False, BLOCK_V=cfg["BLOCK_V"], BLOCK_N=cfg["BLOCK_N"], BLOCK_J=cfg["BLOCK_J"],
                  BLOCK_L=cfg["BLOCK_L"])
        sig = dict(_VERIFY_TYPES, logits_ptr=f"*{dt}", uncond_ptr=f"*{dt}", **{k: "constexpr" for k in ce})
        name = f"walk-{dt}{'-greedy' if ce['GREEDY'] else ''}{'-cfg' if ce['HAS_UNCOND'] else ''}"
        cases.append(dict(name=name, kernel="_tree_verify_kernel", signature=sig, constexprs=ce,
                          options=dict(num_warps=cfg["num_warps"], enable_fp_fusion=False)))
    for dt, ce in (("bf16", dict(HAS_UNCOND=True, HAS_FORCED=True, GREEDY=False)),
                   ("fp32", dict(HAS_UNCOND=False, HAS_FORCED=False, GREEDY=True))):
        ce = dict(ce, BLOCK_V=cfg["BLOCK_V"])
        sig = dict(_CHECK_TYPES, logits_ptr=f"*{dt}", uncond_ptr=f"*{dt}", **{k: "constexpr" for k in ce})
        cases.append(dict(name=f"rowcheck-{dt}", kernel="_tree_rowcheck_kernel", signature=sig, constexprs=ce,
                          options=dict(num_warps=cfg["num_warps"], enable_fp_fusion=False)))
    return cases
