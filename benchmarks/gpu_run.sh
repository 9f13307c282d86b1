#!/usr/bin/env bash
# One time-boxed run on the GPU machine: versions, CUDA build, tests, compute-sanitizer, op and
# end-to-end benchmarks. Run from the repository root:
#
#     bash benchmarks/gpu_run.sh "$OUT"
#
# Every stage has its own `timeout`, runs even when an earlier one failed (its status is
# recorded), and the whole script stops starting stages once TOTAL_S (default 480 s) is near,
# so it ends well inside a 10-minute command limit. Correctness stages overlap to save device
# time: the compiled-Triton GPU tests run while the extension builds; the CUDA GPU tests, the
# law tests on the kernels, compute-sanitizer and the fuzz stage run side by side after it. The timed
# benchmarks run alone, one after another. What comes back (at most 8 files, no
# folders): summary.md (stage table, machine, versions, benchmark summaries), logs.tar.gz
# (every log and junit xml), ops.csv, e2e.csv and up to 3 PNG plots.
#
# Knobs (environment):
#   STAGES="info build tests law sanitize fuzz bench tree e2e"   stages to run (add "suite" for the
#                           whole test suite on the GPU machine, after the overlapped stages, and
#                           "profile" for Nsight Compute on PROFILE_CASES, before e2e)
#   TOTAL_S=480                                   overall deadline in seconds
#   BUILD_S=170 TESTS_GPU_S=200 LAW_S=150 TESTS_S=150 SAN_S=90 (each tool) BENCH_S=110 TREE_S=45 E2E_S=70
#   FI_S=240                the FlashInfer JIT warm-up beside the tests (only when its wheels are installed)
#   FUZZ_S=90 FUZZ_SEED=5   the fuzz stage: drawn jacobi_step, tree_verify and verify_chain configurations on
#                           the CUDA kernels against the reference on the GPU, beside the sanitizer (fuzz.log)
#   XDIST=4                 pytest-xdist workers per test stage (tests spread one by one), when installed
#   SAN_TOOLS="memcheck racecheck"   compute-sanitizer tools (add initcheck)
#   OPS_ARGS="--grid full"  extra arguments of `bench ops` (e.g. "--quick", "--op jacobi_step")
#   E2E_ARGS=""             extra arguments of `bench e2e` (e.g. "--model llamagen-xl")
#   TREE_KV_LARGE_ARGS="--batches 32 --S 256 --reps 50 --backends cuda,triton"
#                           the second tree-KV benchmark (batch 32 of the 7B-like cache moves 235 MB:
#                           the issue's over-100-MB bandwidth case; S 256 keeps the caches and their
#                           check copies near 40 GB)
#   Each compute-sanitizer tool runs `bench ops --check --grid cpu --backend cuda --backend cuda_lists
#   --backend cuda_hist --backend chain_cuda --ref-device cpu` (every CUDA kernel and path on small shapes
#   (chain_cuda: verify_chain's kernel), the default rows
#   kernel and the ones with the optional paths, checked against the reference computed on the CPU,
#   so the sanitizer watches little besides this package's kernels: dense and sparse state, every
#   draft mode, ragged windows, tree verify, tree KV moves); memcheck also runs SAN_NODES (V larger
#   than shared memory; the sparse compaction over several chunks).
#   SAN_REQUESTS=6          requests per check under the sanitizer
#   SAN_KERNELS=""          compute-sanitizer --kernel-name filter; when empty and the sanitizer
#                           accepts `--kernel-name-exclude kns=native`, PyTorch's at::native kernels
#                           (the reference in the checks) run uninstrumented (the info stage prints
#                           the installed syntax)
#   PROFILE_CASES="B32_W32_V16384_cfg_bf16_sjd_k1000"   cases for the `profile` stage (Nsight Compute,
#                           one launch of the rows kernel per backend of PROFILE_BACKENDS, with PC
#                           sampling split by source function and kernel section: logs/ncu/*/split.md
#                           and summary.md; add "profile" to STAGES)
#   PROFILE_BACKENDS="cuda cuda_hist triton"   (any of bench ops' jacobi_step backends)
#   SJD_CUDA_ARCHS="90" PY=python3   (no kernel uses sm_90a-only instructions)
#   WHEELS=.whl             folder of wheels to install first (FlashInfer: bash benchmarks/fetch_wheels.sh)
set -u
OUT=${1:-${OUT:-}}
if [ -z "$OUT" ]; then echo "usage: bash benchmarks/gpu_run.sh OUT_DIR" >&2; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PY:-python3}
STAGES=${STAGES:-"info build tests law sanitize fuzz bench tree e2e"}
TOTAL_S=${TOTAL_S:-480}
BUILD_S=${BUILD_S:-170}; TESTS_GPU_S=${TESTS_GPU_S:-200}; LAW_S=${LAW_S:-150}; TESTS_S=${TESTS_S:-150}
SAN_S=${SAN_S:-90}; BENCH_S=${BENCH_S:-110}; E2E_S=${E2E_S:-70}; TREE_S=${TREE_S:-45}; FI_S=${FI_S:-240}
FUZZ_S=${FUZZ_S:-90}; FUZZ_SEED=${FUZZ_SEED:-5}
XDIST=${XDIST:-4}; SAN_TOOLS=${SAN_TOOLS:-"memcheck racecheck"}
OPS_ARGS=${OPS_ARGS:-"--grid full"}
E2E_ARGS=${E2E_ARGS:-""}
TREE_KV_LARGE_ARGS=${TREE_KV_LARGE_ARGS:-"--batches 32 --S 256 --reps 50 --backends cuda,triton"}
SAN_NODES=("tests/test_cuda_jacobi_step.py::test_vocabulary_larger_than_shared_memory"
           "tests/test_sparse_state_kernels.py::test_sparse_cuda_matches_reference_larger[sjd]")
SAN_REQUESTS=${SAN_REQUESTS:-6}
PROFILE_CASES=${PROFILE_CASES:-"B32_W32_V16384_cfg_bf16_sjd_k1000"}
PROFILE_S=${PROFILE_S:-60}
PROFILE_BACKENDS=${PROFILE_BACKENDS:-"cuda cuda_hist triton"}
SAN_KERNELS=${SAN_KERNELS:-""}
export SJD_CUDA_ARCHS=${SJD_CUDA_ARCHS:-"90"}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
# Optional Python packages carried as wheels (the machine has no registry), e.g. FlashInfer for the
# verify_only peer: put them in $WHEELS (ignored by git, named in the device call's carry).
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sjd_site \
    "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/sjd_site" PATH="$PATH:/tmp/sjd_site/bin" && \
    echo "wheels from $WHEELS installed"
fi
# 0, not unset: several test modules set TRITON_INTERPRET=1 when it is absent (for CPU runs)
export TRITON_INTERPRET=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sjd_gpu_run.XXXXXX")
LOGS=$WORK/logs; RES=$WORK/results
mkdir -p "$LOGS" "$RES"
T0=$(date +%s)
SUMMARY=$OUT/summary.md
STATUS=$WORK/status.tsv
: > "$STATUS"

elapsed() { echo $(( $(date +%s) - T0 )); }

# box NAME MAX: seconds this stage may take (MAX, cut to what the deadline leaves; 0 = skip)
box() {
  local left=$(( TOTAL_S - $(elapsed) - 15 ))
  local b=$2
  [ "$left" -lt "$b" ] && b=$left
  [ "$b" -lt 10 ] && b=0
  echo "$b"
}

want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

knobs() {     # every knob's value as VAR="value" words: the command that reproduces this run
  local v out=""
  for v in STAGES TOTAL_S BUILD_S TESTS_GPU_S LAW_S TESTS_S SAN_S BENCH_S TREE_S E2E_S FI_S FUZZ_S FUZZ_SEED \
           XDIST SAN_TOOLS SAN_REQUESTS SAN_KERNELS OPS_ARGS E2E_ARGS TREE_KV_LARGE_ARGS PROFILE_CASES PROFILE_S \
           PROFILE_BACKENDS SJD_CUDA_ARCHS WHEELS; do
    out="$out$v=\"${!v}\" "
  done
  echo "${out% }"
}

package() {   # called after every stage, so a run stopped from outside still returns its logs
  {
    echo "# sjd_kernels GPU run"
    echo
    echo "- started: $(date -u -d @"$T0" +%Y-%m-%dT%H:%M:%SZ), elapsed $(elapsed) s of $TOTAL_S s"
    echo "- command (every knob, defaults included): \`$(knobs) bash benchmarks/gpu_run.sh \$OUT\`"
    echo "- commit: $(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    echo
    echo "| stage | status | rc | seconds | box s | log |"
    echo "|---|---|---|---|---|---|"
    cat "$STATUS"
    f=$LOGS/info.txt
    [ -f "$f" ] && { echo; echo '## Machine and versions'; echo '```'; cat "$f"; echo '```'; }
    for f in "$RES/ops.md" "$RES/e2e.md"; do [ -f "$f" ] && { echo; sed 's/^# /## /' "$f"; }; done
    for t in tests-triton tests-cuda law tests; do
      f=$LOGS/$t.log
      [ -f "$f" ] && { echo; echo "## pytest $t (tail)"; echo '```'; grep -E "passed|failed|error|skipped|FAILED|ERROR" "$f" | tail -30; echo '```'; }
    done
    f=$LOGS/flashinfer-jit.log
    [ -f "$f" ] && { echo; echo "## FlashInfer JIT warm-up (tail)"; echo '```'; tail -n 8 "$f"; echo '```'; }
    f=$LOGS/fuzz.log
    [ -f "$f" ] && { echo; echo "## fuzz: drawn cases on the CUDA kernels (summary lines and failures)"; echo '```'
                     grep -E "^# |FAIL|exit codes" "$f" | cut -c1-400 | tail -20; echo '```'; }
    for f in "$LOGS"/ncu/*/split.md; do
      [ -f "$f" ] && { echo; echo "## Nsight Compute PC samples by source ($(basename "$(dirname "$f")"))"; echo; sed '/^## /d' "$f" | cat -s | sed -n '1,60p'; }
    done
    for t in memcheck racecheck initcheck; do
      f=$LOGS/sanitize-$t.log
      [ -f "$f" ] && { echo; echo "## compute-sanitizer $t (tail)"; echo '```'; grep -E "ERROR SUMMARY|========= (Invalid|Race|Uninitialized|Error)|passed|failed" "$f" | tail -15; echo '```'; }
    done
    true
  } > "$WORK/summary.md" 2>/dev/null
  cp "$WORK/summary.md" "$SUMMARY"
  for f in ops.csv e2e.csv ops_latency.png e2e_speedup.png e2e_beta.png; do
    [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/$f"
  done
  cp "$RES"/*.json "$RES"/*.md "$LOGS/" 2>/dev/null
  cp -r "$RES"/tree_kv_update "$RES"/tree_kv_update_large "$RES"/tree_verify.csv "$LOGS/" 2>/dev/null
  tar -C "$WORK" -czf "$WORK/logs.tar.gz" logs 2>/dev/null && cp "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

# run_stage NAME MAX LOG -- command...: run with `timeout`, record status, never stop the script
run_stage() {
  local name=$1 max=$2 log=$3; shift 4
  local b; b=$(box "$name" "$max")
  if [ "$b" -eq 0 ]; then
    printf '| %s | skipped (deadline) | - | 0 | 0 | - |\n' "$name" >> "$STATUS"
    echo "=== $name: skipped, deadline near ($(elapsed) s elapsed)"
    return 0
  fi
  echo "=== $name (time box ${b} s, $(elapsed) s elapsed)"
  local s; s=$(date +%s)
  # SIGINT first: pytest then stops and still prints its failures and summary
  timeout -s INT -k 20 "$b" "$@" > "$log" 2>&1
  local rc=$?
  local d=$(( $(date +%s) - s ))
  local st=ok
  [ $rc -ne 0 ] && st=FAILED
  { [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ $rc -eq 130 ] || { [ $rc -eq 2 ] && [ $d -ge "$b" ]; }; } && st="TIMED OUT"
  [ $rc -eq 5 ] && case "$name" in tests*|law*) st="no tests selected" ;; esac
  printf '| %s | %s | %s | %s | %s | %s |\n' "$name" "$st" "$rc" "$d" "$b" "$(basename "$log")" >> "$STATUS"
  echo "    -> $name: $st (rc $rc, ${d} s, $(elapsed) s elapsed); last lines of $(basename "$log"):"
  tail -n 6 "$log" | sed 's/^/       /'
  return 0
}

# stage ...: one stage in the foreground, then package
stage() { run_stage "$@"; package; }

# stage_bg ...: one stage in the background (join with `join_stages`)
BG_PIDS=()
stage_bg() { run_stage "$@" & BG_PIDS+=($!); }
join_stages() { local p; for p in "${BG_PIDS[@]}"; do wait "$p"; done; BG_PIDS=(); package; }

# pytest: one line per test (a stopped run still shows which failed), short tracebacks, tests spread
# one by one over the xdist workers when pytest-xdist is there (the parity grid's whole-grid total
# then skips: it needs the whole file in one process)
PYTEST=("$PY" -m pytest -v --tb=short -ra --durations=30 -p no:cacheprovider -p no:benchmark)
if [ "$XDIST" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  PYTEST+=(-n "$XDIST" --dist load)
fi

# ------------------------------------------------------------------ info
if want info; then
  stage info 30 "$LOGS/info.txt" -- bash -c '
    nvidia-smi || echo "nvidia-smi failed"
    echo; uname -a; echo "nproc: $(nproc)"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH (setup.py also looks in /usr/local/cuda*)"
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not on PATH"
    # the kernel filter syntax of the installed version (for SAN_KERNELS)
    command -v compute-sanitizer >/dev/null && compute-sanitizer --help 2>&1 | grep -A6 -- "--kernel-name" | head -n 16
    '"$PY"' - <<EOF
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", p.multi_processor_count, "L2 MiB", getattr(p, "L2_cache_size", 0) >> 20,
          "mem GiB", round(p.total_memory / 2**30, 1), "cc", f"{p.major}.{p.minor}")
for m in ("flashinfer", "pybind11", "cmake", "ninja", "numpy", "scipy", "matplotlib", "pytest", "xdist",
          "safetensors", "tqdm", "sklearn", "skimage", "mlxtend", "transformers"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "not importable")
EOF'
fi

# ------------------------------------------------------------------ build (Triton GPU tests beside it)
# the compiled-Triton GPU tests need no extension (the realistic tree-KV shapes do: they run after
# the build): they run while it builds
if want tests; then
  stage_bg tests-triton "$TESTS_GPU_S" "$LOGS/tests-triton.log" -- \
    "${PYTEST[@]}" tests -m gpu -k "not cuda and not realistic" --junitxml="$LOGS/junit-triton.xml"
fi
if want build; then
  run_stage build "$BUILD_S" "$LOGS/build.log" -- bash -c '
    set -o pipefail
    export SJD_BUILD_CUDA=1 SJD_BUILD_JOBS=${SJD_BUILD_JOBS:-8}
    [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDACXX=/usr/local/cuda/bin/nvcc
    echo "SJD_CUDA_ARCHS=$SJD_CUDA_ARCHS"
    '"$PY"' -m pip install --no-build-isolation --no-deps -v . || exit 1
    # the tests and benchmarks run from this checkout: put the built module beside the sources
    so=$(cd / && '"$PY"' -c "import sjd_kernels._C as c; print(c.__file__)") || { echo "built module does not import"; exit 1; }
    echo "built: $so"
    cp -f "$so" sjd_kernels/ && echo "copied into sjd_kernels/"
    info=$(dirname "$so")/_build_info.json; [ -f "$info" ] && cp -f "$info" sjd_kernels/ && cat "$info"
    '"$PY"' -c "import sjd_kernels as s; print(s.backends())"
    '
  package
fi

# ------------------------------------------------------------------ CUDA tests, law tests, sanitizer side by side
# SJD_REQUIRE_EXT=1: a missing extension fails these tests instead of skipping them
if want tests; then
  SJD_REQUIRE_EXT=1 stage_bg tests-cuda "$TESTS_GPU_S" "$LOGS/tests-cuda.log" -- \
    "${PYTEST[@]}" tests -m gpu -k "cuda or realistic" --junitxml="$LOGS/junit-cuda.xml"
fi
if want law; then
  # the chi-square law tests (alpha 1e-6 each) and the bad-input tests on both GPU backends,
  # spread test by test over the workers
  LAW_PYTEST=("$PY" -m pytest -q -ra --durations=15 -p no:cacheprovider)
  "$PY" -c "import xdist" 2>/dev/null && LAW_PYTEST+=(-n "$(( XDIST + 2 ))" --dist load)
  SJD_LAW_BACKENDS=triton,cuda SJD_LAW_DEVICE=cuda SJD_REQUIRE_EXT=1 stage_bg law "$LAW_S" "$LOGS/law.log" -- \
    "${LAW_PYTEST[@]}" tests/test_jacobi_step_law.py tests/test_jacobi_step_inputs.py tests/test_sparse_state.py \
    -k "not test_sparse_equals_dense and not truncation" --junitxml="$LOGS/junit-law.xml"
fi
# FlashInfer (carried as wheels) JIT-compiles its sampling kernels on first use: compile them now,
# beside the tests, so the timed benchmark does not pay it (its cache is ~/.cache/flashinfer)
if want bench && "$PY" -c "import flashinfer.sampling" > /dev/null 2>&1; then
  # Its JIT compiles with $CUDA_HOME/bin/nvcc (else `which nvcc`, which may be a wrapper) and
  # includes curand.h, which a minimal toolkit lacks: take it from the toolkit, else from an NVIDIA
  # pip package next to torch, else from the headers fetch_wheels.sh puts in $WHEELS/include.
  if [ -z "${CUDA_HOME:-}" ]; then     # the toolkit the extension's build uses (setup.find_nvcc)
    CUDA_HOME=$("$PY" -c "import os, sys; sys.path.insert(0, sys.argv[1]); import setup; n = setup.find_nvcc()[0]
print(os.path.dirname(os.path.dirname(n)) if n else '')" "$ROOT" 2>/dev/null)
    [ -n "$CUDA_HOME" ] && export CUDA_HOME || unset CUDA_HOME
  fi
  if [ ! -f "${CUDA_HOME:-/nonexistent}/include/curand.h" ]; then
    CURAND_INC=$("$PY" -c "import glob, os, site; print(next(iter(sorted(os.path.dirname(f) for p in site.getsitepackages() for f in glob.glob(p + '/nvidia/*/include/curand.h'))), ''))" 2>/dev/null)
    [ -z "$CURAND_INC" ] && [ -f "$WHEELS/include/curand.h" ] && CURAND_INC=$(cd "$WHEELS/include" && pwd)
    [ -n "$CURAND_INC" ] && export CPATH="$CURAND_INC${CPATH:+:$CPATH}"
  fi
  # it links with -lcuda: without the toolkit's stub, point the linker at the driver's library
  if [ ! -f "${CUDA_HOME:-/nonexistent}/lib64/stubs/libcuda.so" ] && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
    LIBCUDA=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
    [ -n "$LIBCUDA" ] && mkdir -p "$WORK/libcuda" && ln -sf "$LIBCUDA" "$WORK/libcuda/libcuda.so" && \
      export LIBRARY_PATH="$WORK/libcuda${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
  echo "flashinfer JIT: CUDA_HOME=${CUDA_HOME:-unset}, curand.h from ${CURAND_INC:-the toolkit}, libcuda.so from ${LIBCUDA:-the toolkit or the default linker path}" \
    | tee "$LOGS/flashinfer-env.txt"
  stage_bg flashinfer-jit "$FI_S" "$LOGS/flashinfer-jit.log" -- "$PY" -c '
import time, torch, flashinfer
from flashinfer.sampling import chain_speculative_sampling
t = time.time()
d = torch.softmax(torch.randn(2, 4, 64, device="cuda"), -1)
p = torch.softmax(torch.randn(2, 5, 64, device="cuda"), -1)
ids = torch.multinomial(d.view(8, 64), 1).view(2, 4).int()
out = chain_speculative_sampling(d, ids, p)
torch.cuda.synchronize()
print("flashinfer", flashinfer.__version__, "chain_speculative_sampling ready in", round(time.time() - t, 1), "s")
print(out[0] if isinstance(out, (tuple, list)) else out)'
fi
if want sanitize; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  # Leave PyTorch's own kernels (the reference in the checks) uninstrumented when this sanitizer
  # takes an exclusion filter: probed on a program without GPU code, so a wrong syntax costs nothing.
  SAN_FILTER=""
  if [ -z "$SAN_KERNELS" ] && [ -n "$SAN" ] && \
     "$SAN" --kernel-name-exclude kns=native /bin/true > "$LOGS/sanitize-filter-probe.log" 2>&1; then
    SAN_FILTER="--kernel-name-exclude kns=native"
  fi
  echo "compute-sanitizer kernel filter: ${SAN_KERNELS:+--kernel-name $SAN_KERNELS}${SAN_FILTER:-none}" \
    >> "$LOGS/sanitize-filter-probe.log"
  for tool in $SAN_TOOLS; do
    if [ -z "$SAN" ]; then
      printf '| sanitize-%s | skipped (compute-sanitizer not found) | - | 0 | 0 | - |\n' "$tool" >> "$STATUS"; continue
    fi
    extra="--tool $tool --error-exitcode 3"
    [ "$tool" = "initcheck" ] && extra="$extra --track-unused-memory no"
    [ -n "$SAN_KERNELS" ] && extra="$extra --kernel-name $SAN_KERNELS"
    [ -n "$SAN_FILTER" ] && extra="$extra $SAN_FILTER"
    nodes=""
    [ "$tool" = "memcheck" ] && nodes="${SAN_NODES[*]}"
    SJD_REQUIRE_EXT=1 stage_bg "sanitize-$tool" "$SAN_S" "$LOGS/sanitize-$tool.log" -- bash -c '
      "$0" '"$extra"' "$1" -m sjd_kernels.bench ops --check --grid cpu --backend cuda --backend cuda_lists \
        --backend cuda_hist --backend chain_cuda --ref-device cpu \
        --min-requests "$2" --no-plots --out "$3"; r1=$?
      r2=0
      if [ -n "$4" ]; then "$0" '"$extra"' "$1" -m pytest -q -p no:cacheprovider -p no:benchmark $4; r2=$?; fi
      echo "sanitizer exit codes: bench check $r1, pytest $r2"
      [ $r1 -eq 0 ] && [ $r2 -eq 0 ]' "$SAN" "$PY" "$SAN_REQUESTS" "$WORK/san-$tool" "$nodes"
  done
fi
if want fuzz; then
  # random configurations on the CUDA kernels (benchmarks/fuzz_parity.py --device cuda): as many
  # jacobi_step cases as 55 % of the box allows, then tree_verify cases for 20 % and verify_chain
  # cases for 10 % of it
  b=$(box fuzz "$FUZZ_S")
  SJD_REQUIRE_EXT=1 stage_bg fuzz "$FUZZ_S" "$LOGS/fuzz.log" -- bash -c '
    "$0" benchmarks/fuzz_parity.py --device cuda --backends cuda --seed "$3" --cases 100000 --budget-s "$1"; r1=$?
    "$0" benchmarks/fuzz_parity.py --op tree_verify --device cuda --backends cuda --seed "$3" --cases 100000 \
      --budget-s "$2"; r2=$?
    "$0" benchmarks/fuzz_parity.py --op verify_chain --device cuda --backends cuda --seed "$3" --cases 100000 \
      --budget-s "$4"; r3=$?
    echo "fuzz exit codes: jacobi_step $r1, tree_verify $r2, verify_chain $r3"
    [ $r1 -eq 0 ] && [ $r2 -eq 0 ] && [ $r3 -eq 0 ]' "$PY" $(( b * 55 / 100 )) $(( b / 5 )) "$FUZZ_SEED" \
    $(( b / 10 ))
fi
join_stages

if want suite; then
  stage suite "$TESTS_S" "$LOGS/tests.log" -- "${PYTEST[@]}" tests --junitxml="$LOGS/junit.xml"
fi

# ------------------------------------------------------------------ benchmarks
if want bench; then
  b=$(box bench "$BENCH_S")
  # the benchmark stops starting new cases 25 s before its box ends, so it writes its files
  stage bench "$BENCH_S" "$LOGS/ops.log" -- \
    "$PY" -m sjd_kernels.bench ops $OPS_ARGS --out "$RES" --json "$RES/ops.json" --budget-s $(( b > 40 ? b - 25 : 15 ))
fi
if want tree; then
  stage tree-kv "$TREE_S" "$LOGS/bench_tree_kv_update.log" -- \
    "$PY" benchmarks/bench_tree_kv_update.py --quick --out "$RES/tree_kv_update"
  stage tree-kv-large "$TREE_S" "$LOGS/bench_tree_kv_update_large.log" -- \
    "$PY" benchmarks/bench_tree_kv_update.py $TREE_KV_LARGE_ARGS --out "$RES/tree_kv_update_large"
  stage tree-verify "$TREE_S" "$LOGS/bench_tree_verify.log" -- \
    "$PY" benchmarks/bench_tree_verify.py --quick --csv "$RES/tree_verify.csv"
fi
if want profile; then
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  for c in $PROFILE_CASES; do
    for be in $PROFILE_BACKENDS; do
      if [ -z "$NCU" ]; then printf '| profile-%s | skipped (ncu not found) | - | 0 | 0 | - |\n' "$be" >> "$STATUS"; continue; fi
      # one launch of the rows kernel with PC sampling (SourceCounters): the report's sections go to
      # the log, its per-instruction page to sass.csv, and ncu_source splits the samples by source
      # function and kernel section (split.md, also in summary.md)
      D="$LOGS/ncu/$be-$c"; mkdir -p "$D"
      PY="$PY" NCU="$NCU" D="$D" C="$c" BE="$be" REP="$WORK/ncu-$be-$c" stage "profile-$be-$c" "$PROFILE_S" "$LOGS/ncu-$be-$c.log" -- bash -c '
        "$NCU" --clock-control none -f -o "$REP" -k regex:jacobi_rows --launch-skip 2 --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
          --section MemoryWorkloadAnalysis --section SourceCounters --import-source no \
          "$PY" benchmarks/profile_step.py --case "$C" --backend "$BE" --listing "$D/listing.txt"; r=$?
        # a report is worth exporting even when the listing step failed (rc 3): the page comes back
        [ -f "$REP.ncu-rep" ] || exit $r
        "$NCU" --import "$REP.ncu-rep" --page details
        "$NCU" --import "$REP.ncu-rep" --page source --csv --print-source sass > "$D/sass.csv" || exit $?
        [ -f "$D/listing.txt" ] && "$PY" -m sjd_kernels.bench.ncu_source --csv "$D/sass.csv" \
          --listing "$D/listing.txt" --kernel jacobi_rows --title "$BE, $C" --out "$D/split.md" > /dev/null || r=1
        exit $r'
    done
  done
fi
if want e2e; then
  b=$(box e2e "$E2E_S")
  stage e2e "$E2E_S" "$LOGS/e2e.log" -- \
    "$PY" -m sjd_kernels.bench e2e $E2E_ARGS --out "$RES" --json "$RES/e2e.json" --budget-s $(( b > 40 ? b - 25 : 15 ))
fi

package
echo
echo "=== done in $(elapsed) s; files in $OUT:"
ls -la "$OUT"
echo
cat "$STATUS"
[ -f "$RES/ops.md" ] && grep -E "^\| jacobi_step" "$RES/ops.md" | head -n 30
exit 0
