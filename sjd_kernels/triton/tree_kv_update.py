"""Triton kernels of ``tree_kv_update`` (spec: ``sjd_kernels.reference.tree.tree_kv_update``).

Moves the accepted path's K/V in place: for every model row r and entry j with ``path[r, j] >= 0``,
slot ``cache_len[r] + j`` takes the old contents of slot ``cache_len[r] + path[r, j]``, in every
layer, for K and V, in every KV head. One launch, grid ``(H_kv, 2 * layers, R)``: one program per
(head, layer/K-V, row), which owns that row's ``[S, D]`` plane, so programs never touch the same
memory and need no ordering between them.

Overlap (path ``[0, 2, 3]`` into slots ``[0, 1, 2]``: slot 2 is read by entry 1 and written by
entry 2). A program walks the path in chunks of ``BLOCK_P`` entries, in increasing j; per chunk it
loads every source row of the chunk into registers, passes a CTA barrier (``tl.debug_barrier``:
bar.sync orders the loads of every thread before any store), then stores. With ``path[j] >= j``
(``kv_moves`` rejects the row otherwise) this is the reference's parallel copy: a slot X is only
read by entries ``j < X`` (X = path[j] > j for a moved entry) and only written by entry ``X``, so
its readers sit in the same chunk as its writer (ordered by the barrier) or in an earlier chunk
(whose barrier the writer has passed); a load never sees a slot that an earlier chunk wrote, since
earlier chunks write slots ``< j <= path[j]``. (The interpreter runs a tile as one numpy operation,
so it checks the results but not this ordering; the compiled ordering is checked by the ``gpu`` tests.)

Guards: entries ``< 0`` are padding; a row with an entry ``path[j] < j``, a source slot ``>= S``, or
``cache_len < 0`` is left untouched and sets bit 4 of ``status[0]`` (one atomic, from the program
of head 0 / layer 0 / K of that row), so nothing synchronises with the host.

Accesses: the copy moves bits, so the cache is read as int16 (bf16, fp16) or int32 (fp32) and one
compiled kernel serves every dtype of a size. ``VEC`` elements (16 bytes when the host finds the
base address, every stride and D divisible accordingly, else the widest width that divides them)
are promised contiguous and aligned with ``tl.multiple_of`` / ``tl.max_contiguous``, so the loads
and stores become ``ld.global.v4`` / ``st.global.v4``. D is a compile-time constant (one head dim
per model), which keeps the D mask constant over each vector.

Layouts: ``_tree_kv_update_kernel`` takes the stacked cache ``[layers, 2, R, H_kv, S, D]`` and its
strides; ``_tree_kv_update_list_kernel`` takes a device table ``[2 * layers]`` int64 of base
addresses ``k0, v0, k1, v1, ...`` (``ops.tree.kv_pointer_table``) of per-layer ``[R, H_kv, S, D]``
tensors with common strides. The interpreter (``TRITON_INTERPRET=1``) dereferences host addresses,
so the table layout runs there too, on CPU tensors; no fallback is needed. Caches must not alias
(two table entries, or a stacked cache with a zero stride, naming the same memory would race).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.jacobi_step import ERR_TREE_INDEX

__all__ = ["tree_kv_update_triton", "tree_kv_update_list_triton", "pointer_table", "kernel_config",
           "codegen_cases"]

E_TREE: tl.constexpr = tl.constexpr(ERR_TREE_INDEX)
TILE_ELEMS = 4096          # elements of one chunk's register tile (BLOCK_P * BLOCK_D)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@triton.jit
def _row_is_bad(path_row, cl, P, S, BLOCK_P: tl.constexpr, N_P: tl.constexpr):
    """``kv_moves``'s row_bad for one row: an entry ``0 <= path[j] < j``, a source ``>= S``, or ``cache_len < 0``."""
    nbad = (cl < 0).to(tl.int32)
    for c in tl.static_range(N_P):
        j = c * BLOCK_P + tl.arange(0, BLOCK_P)
        pth = tl.load(path_row + j, mask=j < P, other=-1)
        b = (pth >= 0) & ((pth < j) | (pth >= S - tl.maximum(cl, 0)))   # not cl + pth: it can wrap
        nbad += tl.sum(b.to(tl.int32), 0)
    return nbad > 0


@triton.jit
def _move_plane(base, path_row, cl, P, stride_s, D: tl.constexpr, VEC: tl.constexpr, BLOCK_P: tl.constexpr,
                N_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Move the path's slots of one ``[S, D]`` plane at ``base`` (chunks of BLOCK_P entries, increasing j)."""
    for d0 in tl.static_range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        if VEC > 1:
            d = tl.max_contiguous(tl.multiple_of(d, VEC), VEC)
        dmask = d < D
        for c in tl.static_range(N_P):
            j = c * BLOCK_P + tl.arange(0, BLOCK_P)
            pth = tl.load(path_row + j, mask=j < P, other=-1)
            mv = (pth >= 0) & (pth != j)
            src = (cl + pth) * stride_s
            dst = (cl + j) * stride_s
            if VEC > 1:
                src = tl.multiple_of(src, VEC)
                dst = tl.multiple_of(dst, VEC)
            m = mv[:, None] & dmask[None, :]
            x = tl.load(base + src[:, None] + d[None, :], mask=m)
            # every source of this chunk is in registers before any of its destinations is written
            tl.debug_barrier()
            tl.store(base + dst[:, None] + d[None, :], x, mask=m)


@triton.jit
def _program_row(path_ptr, cl_ptr, status_ptr, P, S, BLOCK_PB: tl.constexpr, N_PB: tl.constexpr):
    """This program's (head, layer/K-V, row), the row's path and cache length, and whether the row is
    bad (then bit 4 of ``status[0]`` is set once, by the program of head 0 / layer 0 / K)."""
    h = tl.program_id(0).to(tl.int64)
    lk = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    path_row = path_ptr + r * P
    cl = tl.load(cl_ptr + r)
    bad = _row_is_bad(path_row, cl, P, S, BLOCK_PB, N_PB)
    if bad:
        tl.atomic_or(status_ptr + 0, E_TREE, mask=(h == 0) & (lk == 0))
    return h, lk, r, path_row, cl, bad


@triton.jit
def _tree_kv_update_kernel(kv_ptr, path_ptr, cl_ptr, status_ptr, P, S,
                           s_l, s_kv, s_r, s_h, s_s,
                           D: tl.constexpr, VEC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                           N_P: tl.constexpr, BLOCK_PB: tl.constexpr, N_PB: tl.constexpr):
    h, lk, r, path_row, cl, bad = _program_row(path_ptr, cl_ptr, status_ptr, P, S, BLOCK_PB, N_PB)
    if not bad:
        base = kv_ptr + ((lk // 2) * s_l + (lk % 2) * s_kv + r * s_r + h * s_h)
        if VEC > 1:
            base = tl.multiple_of(base, 16)      # bytes: the host checked the address and every stride
        _move_plane(base, path_row, cl, P, s_s, D, VEC, BLOCK_P, N_P, BLOCK_D)


@triton.jit
def _tree_kv_update_list_kernel(table_ptr, path_ptr, cl_ptr, status_ptr, P, S,
                                s_r, s_h, s_s,
                                ELEM: tl.constexpr, D: tl.constexpr, VEC: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_D: tl.constexpr, N_P: tl.constexpr, BLOCK_PB: tl.constexpr,
                                N_PB: tl.constexpr):
    h, lk, r, path_row, cl, bad = _program_row(path_ptr, cl_ptr, status_ptr, P, S, BLOCK_PB, N_PB)
    if not bad:
        if ELEM == 32:
            base = tl.load(table_ptr + lk).to(tl.pointer_type(tl.int32))
        else:
            base = tl.load(table_ptr + lk).to(tl.pointer_type(tl.int16))
        if VEC > 1:
            base = tl.multiple_of(base, 16)
        off = r * s_r + h * s_h
        if VEC > 1:
            off = tl.multiple_of(off, VEC)
        _move_plane(base + off, path_row, cl, P, s_s, D, VEC, BLOCK_P, N_P, BLOCK_D)


# ----------------------------------------------------------------------------- host side

def kernel_config(P: int, D: int, elem_size: int, vec: int) -> dict:
    """Compile-time tiling: all of D (up to 1024 per pass) by as many path entries as fit ``TILE_ELEMS``
    (``N_P`` chunks; 1 for every path up to 64 entries at D 64), the validity scan in chunks of up to
    1024 entries, and warps for about one vector per thread per chunk (1 to 4).

    Chunk counts are constexprs (unrolled loops): the interpreter cannot loop over a runtime bound
    here, and a path length changes only with the tree shape, so recompilations are rare.
    """
    block_d = min(triton.next_power_of_2(max(D, 1)), 1024)
    block_p = max(1, min(triton.next_power_of_2(max(P, 1)), TILE_ELEMS // block_d))
    block_pb = min(triton.next_power_of_2(max(P, 1)), 1024)
    lanes = max(1, block_p * block_d // max(vec, 1))
    warps = 1
    while warps < 4 and warps * 32 < lanes:
        warps *= 2
    return dict(constexprs=dict(BLOCK_P=block_p, N_P=triton.cdiv(max(P, 1), block_p), BLOCK_D=block_d,
                                BLOCK_PB=block_pb, N_PB=triton.cdiv(max(P, 1), block_pb)),
                num_warps=warps)


def _vec_width(elem_size: int, D: int, strides, ptrs) -> int:
    """Widest element count (16 bytes down to 1) that divides D, every stride and every base address."""
    vec = 16 // elem_size
    while vec > 1:
        if D % vec == 0 and all(s % vec == 0 for s in strides) and all(p % (vec * elem_size) == 0 for p in ptrs):
            return vec
        vec //= 2
    return 1


def tree_kv_update_triton(kv: torch.Tensor, path: torch.Tensor, cache_len: torch.Tensor,
                          status: torch.Tensor) -> None:
    """``reference.tree.tree_kv_update`` on a stacked cache ``kv [layers, 2, R, H_kv, S, D]`` (last dim contiguous)."""
    from ..ops.tree import check_kv_index, check_kv_stacked
    L, two, R, H, S, D = check_kv_stacked(kv)
    check_kv_index(path, cache_len, status, kv.device, R)
    if kv.numel() == 0 or R == 0:
        from ..reference.tree import tree_kv_update
        return tree_kv_update(kv, path, cache_len, status)
    if D > 1 and kv.stride(5) != 1:
        raise ValueError(f"tree_kv_update (triton): the cache's last dimension must be contiguous, got strides "
                         f"{kv.stride()}")
    bits = kv.view(_BITS[kv.dtype])
    es = kv.element_size()
    vec = _vec_width(es, D, kv.stride()[:5], [kv.data_ptr()])
    P = path.shape[1]
    cfg = kernel_config(P, D, es, vec)
    _tree_kv_update_kernel[(H, 2 * L, R)](
        bits, path, cache_len, status, P, S, *kv.stride()[:5],
        D=D, VEC=vec, **cfg["constexprs"], num_warps=cfg["num_warps"])


def pointer_table(keys, values, device) -> torch.Tensor:
    """``[2 * layers]`` int64 base addresses ``k0, v0, k1, v1, ...`` (an H2D copy: pass a cached table)."""
    ptrs = [t.data_ptr() for kv in zip(keys, values) for t in kv]
    return torch.tensor(ptrs, dtype=torch.int64).to(device)


def tree_kv_update_list_triton(keys, values, path: torch.Tensor, cache_len: torch.Tensor, ptr_table,
                               status: torch.Tensor) -> None:
    """``reference.tree.tree_kv_update_list`` for per-layer ``keys[l], values[l] [R, H_kv, S, D]`` (common
    strides and dtype). ``ptr_table``: ``ops.tree.kv_pointer_table(keys, values)``, or None to build one
    here (a host-to-device copy per call)."""
    from ..ops.tree import check_kv_index, check_kv_list
    keys, values = check_kv_list(keys, values)
    k0 = keys[0]
    R, H, S, D = k0.shape
    check_kv_index(path, cache_len, status, k0.device, R)
    if k0.numel() == 0 or R == 0:
        from ..reference.tree import tree_kv_update_list
        return tree_kv_update_list(keys, values, path, cache_len, status)
    if D > 1 and k0.stride(3) != 1:
        raise ValueError(f"tree_kv_update (triton): the caches' last dimension must be contiguous, got strides "
                         f"{k0.stride()}")
    L = len(keys)
    if ptr_table is None:
        ptr_table = pointer_table(keys, values, k0.device)
    if ptr_table.dtype != torch.int64 or ptr_table.numel() != 2 * L or ptr_table.device != k0.device:
        raise ValueError(f"tree_kv_update (triton): ptr_table must be [2 * layers = {2 * L}] int64 on {k0.device}, "
                         f"got {list(ptr_table.shape)} {ptr_table.dtype} on {ptr_table.device}")
    es = k0.element_size()
    vec = _vec_width(es, D, k0.stride()[:3], [t.data_ptr() for t in list(keys) + list(values)])
    P = path.shape[1]
    cfg = kernel_config(P, D, es, vec)
    _tree_kv_update_list_kernel[(H, 2 * L, R)](
        ptr_table.contiguous(), path, cache_len, status, P, S, *k0.stride()[:3],
        ELEM=8 * es, D=D, VEC=vec, **cfg["constexprs"], num_warps=cfg["num_warps"])


_TYPES = dict(path_ptr="*i64", cl_ptr="*i64", status_ptr="*i32", P="i32", S="i64")


def codegen_cases(V: int = 0, P: int = 8) -> list[dict]:
    """Representative compilations for the ahead-of-time codegen test (``V`` is unused: no vocabulary here).

    Stacked and table kernels for 2- and 4-byte elements with 16-byte vectors (LlamaGen-like D 64,
    7B-like D 128, and D 80: a masked tile), and the element-wide fallback (VEC 1). Each case also
    carries ``vec`` so a test can check that 16-byte cases compile to ``ld/st.global.v4``.
    """
    cases = []
    for layout, bits, D, vec in (("stacked", 16, 64, 8), ("stacked", 16, 128, 8), ("stacked", 32, 128, 4),
                                 ("stacked", 16, 80, 1), ("stacked", 16, 80, 8), ("list", 16, 64, 8),
                                 ("list", 32, 128, 4), ("list", 16, 80, 1)):
        cfg = kernel_config(P, D, bits // 8, vec)
        ce = dict(D=D, VEC=vec, **cfg["constexprs"])
        if layout == "stacked":
            sig = dict(kv_ptr=f"*i{bits}", **_TYPES, s_l="i64", s_kv="i64", s_r="i64", s_h="i64", s_s="i64")
            kernel = "_tree_kv_update_kernel"
        else:
            sig = dict(table_ptr="*i64", **_TYPES, s_r="i64", s_h="i64", s_s="i64")
            ce = dict(ELEM=bits, **ce)
            kernel = "_tree_kv_update_list_kernel"
        sig.update({k: "constexpr" for k in ce})
        cases.append(dict(name=f"{layout}-i{bits}-d{D}-vec{vec}", kernel=kernel, signature=sig, constexprs=ce,
                          options=dict(num_warps=cfg["num_warps"]), vec=vec))
    return cases
