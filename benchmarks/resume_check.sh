#!/usr/bin/env bash
# Stop the training scripts with SIGTERM and resume them; the weights must equal an uninterrupted
# run's, byte for byte (the hand check behind README's "Training can be stopped and continued").
#
#     bash benchmarks/resume_check.sh OUT        # about 6 minutes on 2 CPU cores; PY=python by default
#
# train_toy.py: a 60-step MNIST GPT (--stages gpt, step-based), stopped at the step-25 log line,
# resumed, stopped again during its final evaluation (the process must die, not finish), resumed
# again. finetune_sjd2.py: 120 steps of batch 8, stopped at the step-25 line, resumed. Each run
# writes into OUT (weights copies, logs); the states go to OUT/cache. OUT/summary.md lists the
# exit statuses and the SHA-256 of each pair; exit status 1 when a pair differs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:?usage: resume_check.sh OUT}")
mkdir -p "$OUT"
export PYTHONPATH=. SJD_TRAIN_CACHE="$OUT/cache" OMP_NUM_THREADS=1
W=sjd_kernels/models/weights
sum() { sha256sum "$1" | cut -c1-64; }
wait_for() { for _ in $(seq 1 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.5; done; return 1; }
fresh() { rm -rf "$1"; mkdir -p "$1"; cp $W/mnist.json "$1/"; [ "${2:-}" = gpt ] && cp $W/mnist_vq.safetensors $W/mnist_quality.safetensors "$1/"; true; }
T="${PY:-python} python/train_toy.py --model mnist --stages gpt --budget-minutes 0 --steps 60 --threads 1"
F="${PY:-python} python/finetune_sjd2.py --model mnist --steps 120 --batch 8 --threads 1"
{
echo "# Resume check ($(git rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "Command: \`bash benchmarks/resume_check.sh OUT\`"
echo
fresh "$OUT/toy_a" gpt; $T --out "$OUT/toy_a" --log "$OUT/toy_a/log" > "$OUT/toy_a/out" 2>&1; echo "- train_toy uninterrupted: exit $?"
fresh "$OUT/toy_b" gpt
$T --out "$OUT/toy_b" --log "$OUT/toy_b/log" > "$OUT/toy_b/out1" 2>&1 & p=$!
wait_for "$OUT/toy_b/log" "step    25"; kill -TERM $p; wait $p; echo "- train_toy, SIGTERM after the step-25 line: exit $? (130: stopped, state saved)"
$T --out "$OUT/toy_b" --log "$OUT/toy_b/log" --resume > "$OUT/toy_b/out2" 2>&1 & p=$!
wait_for "$OUT/toy_b/log" "stopped (steps done)"; sleep 1; kill -TERM $p; wait $p; echo "- train_toy resumed, SIGTERM during the final evaluation: exit $? (143: killed by SIGTERM)"
$T --out "$OUT/toy_b" --log "$OUT/toy_b/log" --resume > "$OUT/toy_b/out3" 2>&1; echo "- train_toy resumed again: exit $?"
fresh "$OUT/ft_a"; $F --out "$OUT/ft_a" --log "$OUT/ft_a/log" > "$OUT/ft_a/out" 2>&1; echo "- finetune_sjd2 uninterrupted: exit $?"
fresh "$OUT/ft_b"
$F --out "$OUT/ft_b" --log "$OUT/ft_b/log" > "$OUT/ft_b/out1" 2>&1 & p=$!
wait_for "$OUT/ft_b/log" "step    25/"; kill -TERM $p; wait $p; echo "- finetune_sjd2, SIGTERM after the step-25 line: exit $?"
$F --out "$OUT/ft_b" --log "$OUT/ft_b/log" --resume > "$OUT/ft_b/out2" 2>&1; echo "- finetune_sjd2 resumed: exit $?"
echo
echo "| run | uninterrupted | stopped and resumed | equal |"
echo "|---|---|---|---|"
rc=0
for pair in "toy mnist_gpt" "ft mnist_sjd2"; do
  set -- $pair
  a=$(sum "$OUT/${1}_a/$2.safetensors"); b=$(sum "$OUT/${1}_b/$2.safetensors")
  [ "$a" = "$b" ] && eq=yes || { eq=NO; rc=1; }
  echo "| $2.safetensors | \`$a\` | \`$b\` | $eq |"
done
echo
echo "Resume lines: $(grep -h 'resumed from\|interrupted before' "$OUT"/toy_b/log "$OUT"/ft_b/log | sed 's/^\[[^]]*\] //' | tr '\n' ';')"
echo "States left in OUT/cache: $(ls -A "$OUT/cache" 2>/dev/null | tr '\n' ' ')(none expected)"
exit $rc
} > "$OUT/summary.md"
