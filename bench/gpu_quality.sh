#!/usr/bin/env bash
# Issue 9's quality sweep on one GPU: the bundled model (and Gemma-3-270M when its folder exists),
# every row on the built-in held-out text and three held-out texts of other domains.
# Runs the jobs as parallel processes sharing the GPU; rows go to $RES/*.jsonl as they finish.
#   RES=/tmp/q bash bench/gpu_quality.sh [bundled|gemma]
set -u
RES=${RES:-/tmp/q}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
H="--heldout bench/texts/legal.txt bench/texts/mldocs.txt bench/texts/manual.txt --heldout-windows 40"
Q="python3 bench/quality.py --device cuda"
# the bundled-quality settings (300 steps, per-layer scaled, cosine); what varies is data and loss
BASE="steps=300 samples=150 ctx=128 lambda1=0.01 lr=0.01 lambda_scale=layer lr_schedule=cosine dtype=float32 eval_windows=0"
what=${1:-bundled}
if [ "$what" = bundled ]; then
  MODEL="model=bundled:smollm2-135m"
  # the model's own text for seeds 0 and 1, made once so every process calibrates on the same tokens
  for s in 0 1; do
    python3 -c "
from proxsparse_core.config import RunConfig; from proxsparse_core.workspace import Workspace
Workspace().load(RunConfig(device='cuda', dtype='float32', data='mix', samples=150, ctx=128, seed=$s))" \
      > "$RES/pregen$s.log" 2>&1
  done
  for s in 0 1; do   # the proposed setting, every baseline, recovery of each
    $Q --set "$BASE $MODEL data=mix loss=distill seed=$s" --baselines magnitude,wanda,sparsegpt \
       $H --recover both --recover-steps 100 --workers 3 --out "$RES/mix_distill_s$s.jsonl" \
       > "$RES/mix_distill_s$s.log" 2>&1 &
  done
  # ablations on seed 0: the old preset (built-in text, LM loss) with its baselines, and each change alone
  $Q --set "$BASE $MODEL data=builtin loss=lm seed=0" --baselines wanda,sparsegpt $H --workers 2 \
     --out "$RES/builtin_lm_s0.jsonl" > "$RES/builtin_lm_s0.log" 2>&1 &
  $Q --set "$BASE $MODEL data=builtin loss=distill seed=0" --baselines "" $H \
     --out "$RES/builtin_distill_s0.jsonl" > "$RES/builtin_distill_s0.log" 2>&1 &
  $Q --set "$BASE $MODEL data=mix loss=lm seed=0" --baselines "" $H \
     --out "$RES/mix_lm_s0.jsonl" > "$RES/mix_lm_s0.log" 2>&1 &
  # the one-minute demo length with the new setting
  $Q --set "$BASE $MODEL data=mix loss=distill seed=0 steps=60 lr_schedule=constant" --baselines "" $H \
     --out "$RES/mix_distill_60.jsonl" > "$RES/mix_distill_60.log" 2>&1 &
else
  MODEL="model=${GEMMA:-/tmp/gemma-3-270m}"
  python3 -c "
from proxsparse_core.config import RunConfig; from proxsparse_core.workspace import Workspace
Workspace().load(RunConfig(model='${GEMMA:-/tmp/gemma-3-270m}', device='cuda', dtype='float32', data='mix', samples=150, ctx=128, seed=0))" \
    > "$RES/gemma_pregen.log" 2>&1
  $Q --set "$BASE $MODEL data=mix loss=distill seed=0" --baselines wanda,sparsegpt $H \
     --recover both --recover-steps 100 --workers 3 --out "$RES/gemma_mix_distill.jsonl" > "$RES/gemma_mix_distill.log" 2>&1 &
  $Q --set "$BASE $MODEL data=builtin loss=lm seed=0" --baselines "" $H \
     --out "$RES/gemma_builtin_lm.jsonl" > "$RES/gemma_builtin_lm.log" 2>&1 &
fi
wait
echo "done $what"
