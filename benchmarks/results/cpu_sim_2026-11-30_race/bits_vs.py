"""Bitwise comparison of the CUDA kernels (in the simulator) built from two csrc trees."""
import sys, time
sys.path.insert(0, "tests")
import torch
import test_cuda_jacobi_step as tcj
tcj.DEV = "cpu"
from sjd_kernels.cuda import sim
from sjd_kernels.cuda.jacobi_step import jacobi_step_cuda, kernel_features
import sjd_kernels.cuda.jacobi_step as cj
old = sim.load(sys.argv[1]); new = sim.load()
names = ["sjd-bf16-cfg-topk-topp", "coupling+vp", "temp-0.7-topk", "topk-1", "forced-sjd", "topk-ties", "topk-masked",
         "topk-outlier-cfg", "topk-band", "topk-low-outlier", "topk-flat", "topk-wide", "topk-V", "vp_log-topk", "gumbel"]
feats_list = [(), ("bracket_topk",), ("bracket_topk", "list_races"), ("hist_topk",), ("hist_topk", "list_races")]
bad = 0; n = 0
for name in names:
    cfg = dict(tcj.CONFIGS[name]); cfg.pop("reps", None)
    for rep in range(2):
        case = tcj.build_case(seed=1000 + rep, **cfg)
        if rep == 1:
            case["logits"][0, 0, 1] = float("nan")
        for feats in feats_list:
            for glob in (False, True):
                runs = []
                for mod in (old, new):
                    st = tcj._fresh_state(case)
                    cj.FORCE_GLOBAL_ROWS = glob
                    with sim.simulate("reverse", module=mod), kernel_features(*feats):
                        out = jacobi_step_cuda(*tcj._args(case, st))
                    cj.FORCE_GLOBAL_ROWS = False
                    runs.append((out, st))
                (o0, s0), (o1, s1) = runs
                same = all(torch.equal(a, b) for a, b in zip(o0, o1)) and all(
                    torch.equal(s0[k], s1[k]) for k in tcj.STATE)
                n += 1
                if not same:
                    bad += 1
                    print("DIFF", name, rep, feats, glob, flush=True)
print(f"{n} runs, {bad} differ")
