"""Rerun one case of benchmarks/fuzz_parity.py and print, for each request that differs from the
reference, each row's margin: the smallest distance between top_p and a float64 cumulative sum of
the row's sorted float32 law (before top-p). A tiny margin is a top-p boundary the kernels' float32
sums can round across.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/results/cpu_fuzz_2026-11-30/topp_margin.py SEED CASE {triton,cuda}
"""
import sys, torch
sys.path.insert(0, "benchmarks")
import fuzz_parity as fp
from sjd_kernels.reference import target as tg
seed, i, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c, how = fp.draw(i, seed)
last = {}
orig_call = fp._call
def _call(fn, logits, unc, cfg_scale, *a):
    if fn is fp.ref.jacobi_step:
        last.update(logits=logits, unc=unc, cfg=cfg_scale)
    return orig_call(fn, logits, unc, cfg_scale, *a)
fp._call = _call
orig_cmp = fp.compare
def compare(out_r, st_r, out_x, st_x, B):
    d = orig_cmp(out_r, st_r, out_x, st_x, B)
    for b in d:
        x = tg.combine_logits(last["logits"][b:b+1], None if last["unc"] is None else last["unc"][b:b+1],
                              None if last["cfg"] is None else last["cfg"][b:b+1])
        p = tg.target_probs(x, c["temperature"], c["top_k"], 1.0)[0]
        srt, _ = torch.sort(p, -1, descending=True)
        cum = torch.cumsum(srt.double(), -1)
        marg = (cum - c["top_p"]).abs().min(-1).values
        print("request", b, "num_r", out_r[0][b].item(), "num_x", out_x[0][b].item(),
              "min |cum - top_p| per row:", ["%.2e" % m for m in marg.tolist()])
    return d
fp.compare = compare
if backend == "triton":
    from sjd_kernels.triton.jacobi_step import jacobi_step_triton as fn
    print(fp.run_case(c, 1000 * seed + i, fn))
else:
    print(fp.run_cuda_case(c, 1000 * seed + i, how))
print(c)
