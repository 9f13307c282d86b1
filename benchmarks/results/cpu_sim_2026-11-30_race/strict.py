import sys
sys.path.insert(0, "tests")
import torch
import test_cuda_jacobi_step as tcj
tcj.DEV = "cpu"
from sjd_kernels.cuda import sim
from sjd_kernels.cuda.jacobi_step import kernel_features
mod = sim.load(sys.argv[1], race=True)
for feats, name in [((), "sjd-bf16-cfg-topk-topp"), ((), "coupling+vp"), (("bracket_topk", "list_races"), "topk-ties"),
                    (("hist_topk", "list_races"), "coupling+vp"), (("hist_topk",), "topk-band"), (("hist_topk",), "topk-low-outlier")]:
    cfg = dict(tcj.CONFIGS[name]); cfg.pop("reps", None)
    try:
        with sim.simulate("reverse", module=mod), kernel_features(*feats):
            tcj.check_config(reps=1, **cfg)
        print(feats, name, "clean", flush=True)
    except RuntimeError as e:
        print(feats, name, str(e)[:1500], flush=True)
