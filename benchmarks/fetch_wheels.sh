#!/usr/bin/env bash
# Download FlashInfer (the verify_only peer of bench ops) and what its import and JIT need, as
# wheels for the GPU machine (Python 3.12, x86_64, no package registry there), into .whl/ (ignored
# by git), with curand's headers in .whl/include. gpu_run.sh installs $WHEELS/*.whl first; name
# ".whl" in the device call's carry.
#
#     bash benchmarks/fetch_wheels.sh [DIR]        # default .whl; needs a package registry
#
# 0.5.3 because 0.7.4's wheel (101 MB) is over the 64 MiB a device call carries; all of this comes
# to about 25 MB. requests, ninja and the small packages are there in case the GPU machine lacks
# them: gpu_run.sh installs with --no-deps into a folder of its own, so its site-packages stay as
# they are. What was checked without a GPU is in benchmarks/NOTES.md (2026-12-01).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PY:-python3}
mkdir -p "$DIR/include"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$DIR" \
  flashinfer-python==0.5.3 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0 \
  click einops nvidia-ml-py tabulate requests urllib3 idna certifi charset-normalizer ninja
# FlashInfer's sampling kernels include curand.h, which a minimal CUDA toolkit lacks. The CUDA 13
# nvidia-curand wheel (59 MB) is too large to carry: keep only its headers (2.1 MB). gpu_run.sh
# adds $WHEELS/include to CPATH when neither the toolkit nor a pip package next to torch has them.
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_27_x86_64 -d "$TMP" nvidia-curand==10.4.0.35
"$PY" -c '
import glob, os, sys, zipfile
src, dst = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0], sys.argv[2]
with zipfile.ZipFile(src) as z:
    for n in z.namelist():
        if "/include/curand" in n and n.endswith(".h"):
            with open(os.path.join(dst, os.path.basename(n)), "wb") as fh:
                fh.write(z.read(n))
' "$TMP" "$DIR/include"
ls -l "$DIR" "$DIR/include"
du -sh "$DIR"
