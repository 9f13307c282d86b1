"""tree_kv_update: check every backend against the reference, then time it on the GPU.

    python benchmarks/bench_tree_kv_update.py [--out benchmarks/results/tree_kv_update] [--quick]
        [--dtypes bf16,fp16,fp32] [--batches 1,2,8] [--path 8] [--S 2048] [--reps 200]
        [--backends torch,cuda,triton]

Caches: LlamaGen-XL-like (36 layers, 20 KV heads, head dim 64) and 7B-like (32 layers, 32 KV heads,
head dim 128), ``S`` slots, rows ``R`` in ``--batches`` (1: one request, the latency case; 2: one
request with its CFG row), a path of ``--path`` entries in which every entry after the root moves
(nodes 0, 2, 5, 9, ...: the overlapping in-place case), stacked ``[layers, 2, R, H, S, D]`` and
per-layer lists with a pointer table. Backends: ``cuda`` (the extension), ``triton`` (compiled),
``torch`` (the reference). Every backend's result is compared bit for bit with the reference's
before it is timed.

Timing: CUDA events, warm-up, median / p20 / p80 of ``--reps`` calls, eager launches, with a cold L2
(a buffer several times the L2 is written before every call, outside the events) and warm. Each row
reports the bytes the move reads and writes (``2 x R x moved entries x layers x 2 x H x D x
element size``), the achieved bandwidth, its fraction of this GPU's device-to-device copy bandwidth
(``torch`` ``copy_`` of 1 GiB, measured now), and the time of one ``copy_`` of the same number of
bytes (the floor for a contiguous copy of that size, launch included). Writes
``tree_kv_update.csv`` and ``tree_kv_update.md`` to ``--out``.

Without a GPU it runs a correctness check of the reference on the CPU (stacked and list layouts
against an independent sequential copy), says that it will not time, and exits 0 (1 if the check
fails). On a GPU it exits 1 when a backend differs from the reference or none of ``--backends`` is
usable there (nothing written then).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout, when not installed

import torch  # noqa: E402

from sjd_kernels.demo import at_least, check_flags, check_output_dir  # noqa: E402
from sjd_kernels.reference import tree as ref  # noqa: E402

MODELS = {"llamagen-xl": dict(L=36, H=20, D=64), "7b": dict(L=32, H=32, D=128)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def make_path(R: int, P: int) -> torch.Tensor:
    """Nodes 0, 2, 5, 9, ... (gaps growing by one): every entry after the root moves and sources overlap
    destinations of later entries (node 2 -> slot 1 while node 5 -> slot 2 ...)."""
    nodes, n = [0], 0
    for j in range(1, P):
        n += j + 1
        nodes.append(n)
    return torch.tensor(nodes, dtype=torch.int64).repeat(R, 1)


def moved_bytes(path: torch.Tensor, L: int, H: int, D: int, elem: int) -> int:
    j = torch.arange(path.shape[1]).view(1, -1)
    moves = int(((path >= 0) & (path != j)).sum())
    return 2 * moves * L * 2 * H * D * elem


def sequential_copy(kv, path, cache_len):
    """An independent oracle: copy in increasing j, one entry at a time (safe because path[j] >= j)."""
    out = kv.clone()
    for r in range(path.shape[0]):
        for j in range(path.shape[1]):
            p = int(path[r, j])
            if p >= 0 and p != j:
                c = int(cache_len[r])
                out[:, :, r, :, c + j] = out[:, :, r, :, c + p]
    return out


def cpu_check(stacked=None, listed=None) -> list:
    """The reference (``stacked``/``listed``: stand-ins, for tests) against ``sequential_copy`` on CPU
    tensors, every dtype, both layouts. Returns the failures (empty: ok); prints one line. Plain
    comparisons, not asserts: the check also holds under ``python -O``."""
    stacked = stacked or ref.tree_kv_update
    listed = listed or ref.tree_kv_update_list
    g = torch.Generator().manual_seed(0)
    bad = []
    for name, dt in DTYPES.items():
        kv = torch.randn(3, 2, 2, 4, 64, 16, generator=g).to(dt)
        path = make_path(2, 6)
        cl = torch.tensor([3, 7])
        want = sequential_copy(kv, path, cl)
        got = kv.clone()
        st = torch.zeros(4, dtype=torch.int32)
        stacked(got, path, cl, st)
        if not torch.equal(got.view(_BITS[dt]), want.view(_BITS[dt])) or int(st[0]) != 0:
            bad.append(f"stacked {name}")
        keys, values = [kv[l, 0].clone() for l in range(3)], [kv[l, 1].clone() for l in range(3)]
        st.zero_()
        listed(keys, values, path, cl, st)
        if not all(torch.equal(keys[l].view(_BITS[dt]), want[l, 0].view(_BITS[dt])) and
                   torch.equal(values[l].view(_BITS[dt]), want[l, 1].view(_BITS[dt])) for l in range(3)) \
                or int(st[0]) != 0:
            bad.append(f"list {name}")
    if bad:
        print(f"reference check on CPU: MISMATCH against a sequential copy: {', '.join(bad)}")
    else:
        print("reference check on CPU: stacked and list layouts equal a sequential copy (bf16, fp16, fp32): ok")
    return bad


def backends_available() -> dict:
    out = {"torch": None}
    try:
        from sjd_kernels._ext import cuda_status
        ok, why = cuda_status()
        if ok:
            from sjd_kernels.cuda.tree_kv_update import tree_kv_update_cuda, tree_kv_update_list_cuda
            out["cuda"] = (tree_kv_update_cuda, tree_kv_update_list_cuda)
        else:
            print(f"skipping cuda: {why}")
    except Exception as e:  # pragma: no cover
        print(f"skipping cuda: {type(e).__name__}: {e}")
    try:
        import os
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError("TRITON_INTERPRET=1 (unset it to time compiled Triton)")
        from sjd_kernels.triton.tree_kv_update import tree_kv_update_list_triton, tree_kv_update_triton
        out["triton"] = (tree_kv_update_triton, tree_kv_update_list_triton)
    except Exception as e:
        print(f"skipping triton: {type(e).__name__}: {e}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tree_kv_update"))
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--batches", default=None, help="comma list of rows R (default 1,2,8)")
    ap.add_argument("--path", type=int, default=8, help="path entries, >= 2 (default 8)")
    ap.add_argument("--S", type=int, default=2048, help="cache slots (default 2048)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls (default 200)")
    ap.add_argument("--quick", action="store_true", help="batch 1 only, 50 reps")
    ap.add_argument("--backends", default="torch,cuda,triton",
                    help="backends to time (the check always compares with the reference)")
    args = ap.parse_args(argv)
    # every check before the CPU check and the GPU work: a mistake exits 2 naming its flag
    wanted = {b.strip() for b in args.backends.split(",") if b.strip()}
    if not wanted <= {"torch", "cuda", "triton"}:
        ap.error(f"argument --backends: unknown names {sorted(wanted - {'torch', 'cuda', 'triton'})}")
    if not wanted:
        ap.error("argument --backends: nothing to time; give some of torch, cuda, triton")
    if args.quick and (args.batches is not None or args.reps is not None):
        ap.error("argument --quick: it times batch 1 with 50 reps; drop it or --batches/--reps")
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        ap.error(f"argument --dtypes: unknown {unknown}; choose from {', '.join(DTYPES)} (comma list)")
    try:
        batches = [int(b) for b in (args.batches or "1,2,8").split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        ap.error(f"argument --batches: must be a comma list of ints >= 1, got {args.batches!r}")
    # a path of 1 entry is the root alone: nothing moves (0 bytes, 0 GB/s rows)
    check_flags(ap.error, at_least(2, ("--path", args.path)) + at_least(1, ("--S", args.S), ("--reps", args.reps)))
    last = int(make_path(1, args.path).max())
    if last + args.S // 2 >= args.S:
        ap.error(f"argument --S: must exceed S // 2 + {last} (the caches are half full and a path of {args.path} "
                 f"entries reads node {last}), got {args.S}")
    check_output_dir(ap.error, "--out", args.out)

    if cpu_check():
        return 1
    if not torch.cuda.is_available():
        print("no CUDA device visible: refusing to time tree_kv_update (nothing written); run on a GPU for numbers")
        return 0

    from sjd_kernels.bench.timing import L2Flusher, copy_bandwidth, machine_info, time_cuda
    from sjd_kernels.ops.tree import kv_pointer_table

    bes = {k: v for k, v in backends_available().items() if k in wanted}
    if not bes:
        print(f"none of the backends {', '.join(sorted(wanted))} is usable here: nothing timed, nothing written")
        return 1
    info = machine_info()
    bw = copy_bandwidth()
    print(f"{info['gpu']}: device-to-device copy {bw['copy_Bps'] / 1e9:.0f} GB/s (read + write, 1 GiB)")
    flush = L2Flusher()
    batches = [1] if args.quick else batches
    reps = 50 if args.quick else args.reps or 200
    P = args.path
    rows = []
    for model, m in MODELS.items():
        L, H, D = m["L"], m["H"], m["D"]
        for dname in args.dtypes.split(","):
            dt = DTYPES[dname]
            es = torch.tensor([], dtype=dt).element_size()
            for R in batches:
                path = make_path(R, P).cuda()
                S = args.S
                cl = torch.full((R,), S // 2, dtype=torch.int64, device="cuda")
                assert int(path.max()) + S // 2 < S, "--S too small for the path"
                kv = torch.randn(L, 2, R, H, S, D, device="cuda", dtype=dt)
                keys = [torch.randn(R, H, S, D, device="cuda", dtype=dt) for _ in range(L)]
                values = [torch.randn(R, H, S, D, device="cuda", dtype=dt) for _ in range(L)]
                table = kv_pointer_table(keys, values)
                st = torch.zeros(4, dtype=torch.int32, device="cuda")
                nbytes = moved_bytes(path.cpu(), L, H, D, es)
                # copy floor: one contiguous copy_ of the same number of bytes (half read, half written)
                n_el = max(1, nbytes // 2 // es)
                a = torch.randn(n_el, device="cuda").to(dt)
                b = torch.empty_like(a)
                floor = time_cuda(lambda: b.copy_(a), reps=reps, warmup=10, flush=flush).median
                kv0, keys0, values0 = kv.clone(), [k.clone() for k in keys], [v.clone() for v in values]
                want = kv.clone()
                ref.tree_kv_update(want, path, cl, None)
                want_k = [k.clone() for k in keys]
                want_v = [v.clone() for v in values]
                ref.tree_kv_update_list(want_k, want_v, path, cl, None)
                for be, fns in bes.items():
                    for layout in ("stacked", "list"):
                        if be == "torch":
                            fn = (lambda: ref.tree_kv_update(kv, path, cl, st)) if layout == "stacked" else \
                                 (lambda: ref.tree_kv_update_list(keys, values, path, cl, st))
                            chk_fn = (lambda x: ref.tree_kv_update(x, path, cl, st)) if layout == "stacked" else None
                        else:
                            fs, fl = fns
                            fn = (lambda fs=fs: fs(kv, path, cl, st)) if layout == "stacked" else \
                                 (lambda fl=fl: fl(keys, values, path, cl, table, st))
                            chk_fn = (lambda x, fs=fs: fs(x, path, cl, st)) if layout == "stacked" else None
                        # correctness first, on copies of the untouched inputs (the timed calls of the
                        # backends before this one moved entries of kv/keys/values in place: the update
                        # is not idempotent when a path reads a slot that an earlier copy wrote)
                        st.zero_()
                        if layout == "stacked":
                            x = kv0.clone()
                            chk_fn(x)
                            ok = torch.equal(x.view(_BITS[dt]), want.view(_BITS[dt]))
                        else:
                            kk, vv = [k.clone() for k in keys0], [v.clone() for v in values0]
                            if be == "torch":
                                ref.tree_kv_update_list(kk, vv, path, cl, st)
                            else:
                                fns[1](kk, vv, path, cl, kv_pointer_table(kk, vv), st)
                            ok = all(torch.equal(kk[i].view(_BITS[dt]), want_k[i].view(_BITS[dt])) and
                                     torch.equal(vv[i].view(_BITS[dt]), want_v[i].view(_BITS[dt])) for i in range(L))
                        torch.cuda.synchronize()
                        if not ok or int(st[0]) != 0:
                            print(f"MISMATCH {be} {layout} {model} R={R} {dname}: not timed")
                            rows.append(dict(op="tree_kv_update", backend=be, layout=layout, model=model, R=R, P=P,
                                             dtype=dname, l2="-", check="MISMATCH"))
                            continue
                        for l2 in ("cold", "warm"):
                            t = time_cuda(fn, reps=reps, warmup=10, flush=flush if l2 == "cold" else None)
                            gbps = nbytes / (t.median * 1e-6) / 1e9
                            row = dict(op="tree_kv_update", backend=be, layout=layout, model=model, L=L, H=H, D=D,
                                       S=S, R=R, P=P, dtype=dname, l2=l2, check="ok", bytes=nbytes,
                                       median_us=round(t.median, 2), p20_us=round(t.p20, 2), p80_us=round(t.p80, 2),
                                       GBps=round(gbps, 1), frac_copy_bw=round(gbps * 1e9 / bw["copy_Bps"], 3),
                                       copy_same_bytes_us=round(floor, 2), gpu=info["gpu"], torch=info["torch"],
                                       triton=info["triton"], cuda=info["cuda"], commit=info["commit"])
                            rows.append(row)
                            print(f"{be:6s} {layout:7s} {model:11s} R={R:<3d} {dname} L2 {l2}: {t.median:8.2f} us "
                                  f"(p20 {t.p20:.2f}, p80 {t.p80:.2f}), {nbytes / 1e6:.2f} MB, {gbps:7.1f} GB/s = "
                                  f"{row['frac_copy_bw']:.1%} of copy bw; copy_ of the same bytes {floor:.2f} us")
                kv = keys = values = want = want_k = want_v = kv0 = keys0 = values0 = None   # free before the next shape
                torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "tree_kv_update.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cols = ["backend", "layout", "model", "R", "dtype", "l2", "median_us", "p20_us", "p80_us", "bytes", "GBps",
            "frac_copy_bw", "copy_same_bytes_us", "check"]
    with open(out / "tree_kv_update.md", "w") as f:
        f.write(f"# tree_kv_update on {info['gpu']}\n\n")
        f.write(f"Path of {P} entries ({P - 1} moves per row), S = {args.S}; device-to-device copy bandwidth "
                f"{bw['copy_Bps'] / 1e9:.0f} GB/s (torch copy_, 1 GiB, read + write). torch {info['torch']}, "
                f"triton {info['triton']}, CUDA {info['cuda']}, commit {info['commit']}.\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n")
    print(f"wrote {out / 'tree_kv_update.csv'} and {out / 'tree_kv_update.md'}")
    return 0 if all(r.get("check") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
