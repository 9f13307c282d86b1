#!/usr/bin/env bash
# One time-boxed run on the GPU machine: versions, CUDA build, tests, compute-sanitizer, op and
# end-to-end benchmarks. Run from the repository root:
#
#     bash benchmarks/gpu_run.sh "$OUT"
#
# Every stage has its own `timeout`, runs even when an earlier one failed (its status is
# recorded), and the whole script stops starting stages once TOTAL_S (default 480 s) is near,
# so it ends well inside a 10-minute command limit. What comes back (at most 8 files, no
# folders): summary.md (stage table, machine, versions, benchmark summaries), logs.tar.gz
# (every log and junit xml), ops.csv, e2e.csv and up to 3 PNG plots.
#
# Knobs (environment):
#   STAGES="info build tests sanitize bench tree e2e"   stages to run, in this order
#   TOTAL_S=480                                   overall deadline in seconds
#   BUILD_S=170 TESTS_GPU_S=45 TESTS_S=100 SAN_S=35 (each of 3 tools) BENCH_S=110 TREE_S=60 E2E_S=90
#   OPS_ARGS="--grid full"  extra arguments of `bench ops` (e.g. "--quick", "--op jacobi_step")
#   E2E_ARGS=""             extra arguments of `bench e2e` (e.g. "--model llamagen-xl")
#   SAN_K="test_cuda_jacobi_step or (tree and cuda) or (...sparse...)"   pytest -k expression (sanitizer runs)
#   SAN_KERNELS=""          compute-sanitizer --kernel-name filter (e.g. "regex:jacobi|tree")
#   SJD_CUDA_ARCHS="90a;90" PY=python3
set -u
OUT=${1:-${OUT:-}}
if [ -z "$OUT" ]; then echo "usage: bash benchmarks/gpu_run.sh OUT_DIR" >&2; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
STAGES=${STAGES:-"info build tests sanitize bench tree e2e"}
TOTAL_S=${TOTAL_S:-480}
BUILD_S=${BUILD_S:-170}; TESTS_GPU_S=${TESTS_GPU_S:-45}; TESTS_S=${TESTS_S:-100}; SAN_S=${SAN_S:-35}
BENCH_S=${BENCH_S:-110}; E2E_S=${E2E_S:-90}; TREE_S=${TREE_S:-60}
OPS_ARGS=${OPS_ARGS:-"--grid full"}
E2E_ARGS=${E2E_ARGS:-""}
SAN_K=${SAN_K:-"test_cuda_jacobi_step or (tree and cuda) or (test_sparse_cuda_matches_reference_larger and sjd)"}
SAN_KERNELS=${SAN_KERNELS:-""}
export SJD_CUDA_ARCHS=${SJD_CUDA_ARCHS:-"90a;90"}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg
unset TRITON_INTERPRET
WORK=$(mktemp -d /tmp/sjd_gpu_run.XXXXXX)
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

package() {   # called after every stage, so a run stopped from outside still returns its logs
  {
    echo "# sjd_kernels GPU run"
    echo
    echo "- started: $(date -u -d @"$T0" +%Y-%m-%dT%H:%M:%SZ), elapsed $(elapsed) s of $TOTAL_S s"
    echo "- command: \`STAGES=\"$STAGES\" TOTAL_S=$TOTAL_S OPS_ARGS=\"$OPS_ARGS\" E2E_ARGS=\"$E2E_ARGS\" bash benchmarks/gpu_run.sh \$OUT\`"
    echo "- commit: $(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo +dirty)"
    echo
    echo "| stage | status | rc | seconds | box s | log |"
    echo "|---|---|---|---|---|---|"
    cat "$STATUS"
    for f in "$LOGS/info.txt"; do [ -f "$f" ] && { echo; echo '## Machine and versions'; echo '```'; cat "$f"; echo '```'; }; done
    for f in "$RES/ops.md" "$RES/e2e.md"; do [ -f "$f" ] && { echo; sed 's/^# /## /' "$f"; }; done
    if [ -f "$LOGS/tests.log" ]; then echo; echo '## Test summary (tail)'; echo '```'; grep -E "passed|failed|error|skipped|FAILED|ERROR" "$LOGS/tests.log" | tail -40; echo '```'; fi
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
  cp -r "$RES"/tree_kv_update "$RES"/tree_verify.csv "$LOGS/" 2>/dev/null
  tar -C "$WORK" -czf "$WORK/logs.tar.gz" logs 2>/dev/null && cp "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

# stage NAME MAX LOG -- command...: run with `timeout`, record status, never stop the script
stage() {
  local name=$1 max=$2 log=$3; shift 4
  local b; b=$(box "$name" "$max")
  if [ "$b" -eq 0 ]; then
    printf '| %s | skipped (deadline) | - | 0 | 0 | - |\n' "$name" >> "$STATUS"
    echo "=== $name: skipped, deadline near ($(elapsed) s elapsed)"
    package; return 0
  fi
  echo "=== $name (time box ${b} s, $(elapsed) s elapsed)"
  local s; s=$(date +%s)
  timeout -k 10 "$b" "$@" > "$log" 2>&1
  local rc=$?
  local d=$(( $(date +%s) - s ))
  local st=ok
  [ $rc -ne 0 ] && st=FAILED
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && st="TIMED OUT"
  [ "$name" = "tests-gpu" ] && [ $rc -eq 5 ] && st="no tests selected"
  printf '| %s | %s | %s | %s | %s | %s |\n' "$name" "$st" "$rc" "$d" "$b" "$(basename "$log")" >> "$STATUS"
  echo "    -> $st (rc $rc, ${d} s); last lines of $(basename "$log"):"
  tail -n 6 "$log" | sed 's/^/       /'
  package
  return 0
}

# ------------------------------------------------------------------ info
if want info; then
  stage info 30 "$LOGS/info.txt" -- bash -c '
    nvidia-smi || echo "nvidia-smi failed"
    echo; uname -a; echo "nproc: $(nproc)"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc: not on PATH (setup.py also looks in /usr/local/cuda*)"
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -n 2 || echo "compute-sanitizer: not on PATH"
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
for m in ("flashinfer", "pybind11", "cmake", "ninja", "scipy", "matplotlib", "pytest"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "not importable")
EOF'
fi

# ------------------------------------------------------------------ build
if want build; then
  stage build "$BUILD_S" "$LOGS/build.log" -- bash -c '
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
fi

# ------------------------------------------------------------------ tests
if want tests; then
  stage tests-gpu "$TESTS_GPU_S" "$LOGS/tests-gpu.log" -- \
    "$PY" -m pytest tests -m gpu -q -ra --durations=30 --junitxml="$LOGS/junit-gpu.xml" -p no:cacheprovider
  stage tests "$TESTS_S" "$LOGS/tests.log" -- \
    "$PY" -m pytest tests -q -ra --durations=30 --junitxml="$LOGS/junit.xml" -p no:cacheprovider
fi

# ------------------------------------------------------------------ compute-sanitizer
if want sanitize; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  for tool in memcheck racecheck initcheck; do
    if [ -z "$SAN" ]; then
      printf '| sanitize-%s | skipped (compute-sanitizer not found) | - | 0 | 0 | - |\n' "$tool" >> "$STATUS"; continue
    fi
    extra=()
    [ "$tool" = "initcheck" ] && extra+=(--track-unused-memory no)
    [ -n "$SAN_KERNELS" ] && extra+=(--kernel-name "$SAN_KERNELS")
    stage "sanitize-$tool" "$SAN_S" "$LOGS/sanitize-$tool.log" -- \
      "$SAN" --tool "$tool" --error-exitcode 3 "${extra[@]}" \
      "$PY" -m pytest tests -q -x -k "$SAN_K" -p no:cacheprovider
  done
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
  stage tree-verify "$TREE_S" "$LOGS/bench_tree_verify.log" -- \
    "$PY" benchmarks/bench_tree_verify.py --quick --csv "$RES/tree_verify.csv"
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
