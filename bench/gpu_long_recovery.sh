#!/usr/bin/env bash
# Long recoveries of the bundled model's ProxSparse mask on one GPU, side by side (issue 9's answers
# target): one process per recovery item, each learning the `bundled-quality` mask (seed 0) and
# recovering it with its item (bench/quality.py --recover syntax), then scoring every row on the
# built-in held-out text and three held-out texts of other domains, with greedy answers to the
# example prompts and MORE_PROMPTS. A recovery still running at START + BUDGET seconds is stopped
# there and scored with its last good weights (the row's recovery_status says so), so that every
# process leaves a row inside a machine's time limit. An item "sparsegpt/ITEM" recovers SparseGPT's
# result (its mask and updated weights, same calibration tokens) instead of learning a mask. The
# recoveries start together (--recover-barrier: a process that is ready first, e.g. SparseGPT's, which
# needs no learning, waits for the others), so that a deadline cuts them at about the same step.
#   RES=/tmp/r BUDGET=480 bash bench/gpu_long_recovery.sh "both:1000:samples=4000:batch=4" "sparsegpt/both:1000:samples=8000:batch=8" …
#   SMOKE=1 RES=/tmp/rs bash bench/gpu_long_recovery.sh "both:4:samples=16:batch=2"   # CPU
set -u
RES=${RES:-/tmp/r}; BUDGET=${BUDGET:-480}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SET="dtype=float32 eval_windows=0 seed=0"; DEV=cuda; ANS="--answers 48 --more-prompts"; WIN=40
[ -n "${SMOKE:-}" ] && { SET="$SET steps=3 samples=12"; DEV=cpu; ANS="--answers 4"; WIN=2; }
python3 -c "from proxsparse_core.models.loading import bundled_folder; print(bundled_folder())"
UNTIL=$(python3 -c "import time; print(time.time() + $BUDGET)")
rm -rf "$RES/ready"
i=0
for item in "$@"; do
  METHOD=(--baselines "")
  case "$item" in sparsegpt/*) METHOD=(--baselines sparsegpt --no-proxsparse); item=${item#sparsegpt/} ;; esac
  python3 bench/quality.py --device $DEV --preset bundled-quality --set "$SET" "${METHOD[@]}" \
    --heldout bench/texts/legal.txt bench/texts/mldocs.txt bench/texts/manual.txt --heldout-windows $WIN \
    $ANS --recover "$item" --recover-until "$UNTIL" --recover-barrier "$RES/ready" $# \
    --out "$RES/r$i.jsonl" > "$RES/r$i.log" 2>&1 &
  i=$((i + 1))
done
wait
echo "done $(date +%T)"
