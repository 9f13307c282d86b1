"""The MNIST demo's real-image Frechet distance alone (seeds 10-12, as sjd_kernels.demo computes its
real row), for the kernel-setting probes of README.md point 4. Run from the repository root:
    PYTHONPATH=. OMP_NUM_THREADS=1 [VARIABLES] python benchmarks/results/cpu_reproduce_2026-12-02_isa/probes/real_fd.py
It prints the distance and torch's CPU kernels."""
import numpy as np, torch
torch.set_num_threads(1)
from sjd_kernels import demo
from sjd_kernels.models import bundled
b = bundled.load("mnist")
labels = np.repeat(np.arange(b.num_classes), 2)
reference = demo._reference("mnist")
pool=None; fds=[]
for s in range(3):
    real, pool = demo._balanced_real("mnist", labels, 10 + s, pool)
    fds.append(b.quality.evaluate(real, labels, reference)["fd"])
print(repr(float(np.mean(fds))), torch.backends.cpu.get_cpu_capability())
