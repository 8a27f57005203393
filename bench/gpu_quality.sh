#!/usr/bin/env bash
# Issue 9's quality sweep on one GPU: the bundled SmolLM2 (Llama family) and Gemma-3-270M (a second
# architecture, from a local folder made by bench/second_model.py), two calibration seeds each; every
# row on the built-in held-out text and three held-out texts of other domains, with the greedy answers
# to the Compare tab's example prompts.
#
# Settings: the scale-free recipe (λ1 0.01 and lr $LR, default 0.005 as in the presets, relative to each
# layer's rms(W0), cosine,
# 300 steps, self-distillation on half built-in, half self-written text) with N calibration samples
# × 128 tokens (150: each seen twice). The baselines get the same calibration tokens. ProxSparse's mask
# is also recovered: OBS update + 300 fine-tuning steps ("both"; on the bundled model, seed 0, also
# 1,000 steps, for the answers). Other recoveries: RECOVER="both:300,finetune:300".
#
# The jobs run as parallel processes (at most $MAXJOBS at once, in order of importance: seed 0 first),
# spread round-robin over the machine's GPUs; rows go to $RES/*.jsonl as they finish.
# GEMMA is a folder made by `python bench/second_model.py --gguf FILE --out DIR` (with transformers 5.17, add
# `--tokenizer FOLDER` holding tokenizer*.json of a conversion made with transformers 5.24: see bench/RESULTS.md).
#   RES=/tmp/q GEMMA=/tmp/gemma-3-270m bash bench/gpu_quality.sh          # everything
#   SMOKE=1 RES=/tmp/qs GEMMA=... bash bench/gpu_quality.sh                # a few steps of each, CPU
#   ONLY=gemma GEMMA=... bash bench/gpu_quality.sh                         # Gemma's rows alone
#   VARIANTS="lr=0.005 lambda1=0.02" GEMMA=... bash bench/gpu_quality.sh    # seed 0, ProxSparse only, one
#                                     process per variant and model (baselines: the full sweep's rows)
set -u
RES=${RES:-/tmp/q}
GEMMA=${GEMMA:-}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEV=cuda; STEPS=300; REC=300; LONG=1000; WIN=40; N=${N:-150}; LR=${LR:-0.005}; ANS=48; MAXJOBS=${MAXJOBS:-4}
if [ -n "${SMOKE:-}" ]; then DEV=cpu; STEPS=3; REC=2; LONG=3; WIN=2; N=12; ANS=4; MAXJOBS=1; fi
RECOVER=${RECOVER:-both:$REC}
H="--heldout bench/texts/legal.txt bench/texts/mldocs.txt bench/texts/manual.txt --heldout-windows $WIN"
Q="python3 bench/quality.py --device $DEV --answers $ANS"
BASE="steps=$STEPS ctx=128 lambda1=0.01 lr=$LR lambda_scale=layer lr_schedule=cosine warmup=0.1 dtype=float32 data=mix loss=distill"
[ -n "${SMOKE:-}" ] && BASE="$BASE eval_windows=2" || BASE="$BASE eval_windows=0"

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true); [ "${NGPU:-0}" -gt 0 ] || NGPU=1
K=0
job() {   # job NAME quality.py-arguments…: one process on the next GPU, log and rows under $RES/NAME.*
  local name=$1; shift
  while [ "$(jobs -rp | wc -l)" -ge "$MAXJOBS" ]; do sleep 2; done
  CUDA_VISIBLE_DEVICES=$((K % NGPU)) $Q "$@" --out "$RES/$name.jsonl" > "$RES/$name.log" 2>&1 &
  K=$((K + 1))
}
SMOL=bundled:smollm2-135m
[ "${ONLY:-}" = gemma ] && SMOL=""            # ONLY=gemma: the second model alone
models="$SMOL $GEMMA"
# 0. the bundled model's safetensors copy, made once before any parallel load
[ -n "$SMOL" ] && python3 -c "from proxsparse_core.models import bundled_folder; print(bundled_folder())"
# 1. the model's own calibration text for every (model, seed, size), made once so that every process
#    of a seed calibrates on the same tokens (selfgen caches it)
SEEDS="0 1"; [ -n "${VARIANTS:-}" ] && SEEDS=0
for m in $models; do for s in $SEEDS; do n=$N
  CUDA_VISIBLE_DEVICES=$((K % NGPU)) python3 -c "
from proxsparse_core.config import RunConfig; from proxsparse_core.workspace import Workspace
Workspace().load(RunConfig(model='$m', device='$DEV', dtype='float32', data='mix', samples=$n, ctx=128, seed=$s))" \
    > "$RES/pregen_$(basename $m)_s${s}_$n.log" 2>&1 &
  K=$((K + 1))
done; done
wait
echo "pregen done $(date +%T)"
# 2. the sweep (or the variants)
if [ -n "${VARIANTS:-}" ]; then
  MAXJOBS=${MAXJOBS_VARIANTS:-6}
  for v in $VARIANTS; do for m in $models; do
    job "variant_$(basename $m)_${v//=/}" --set "$BASE model=$m seed=0 samples=$N $v" --baselines "" $H
  done; done
  SEEDS=""
fi
for s in $SEEDS; do
  if [ -n "$SMOL" ]; then
    M="model=$SMOL seed=$s samples=$N"
    job smol_prox_s$s --set "$BASE $M" --baselines "" $H --recover "$RECOVER$( [ $s = 0 ] && echo ,both:$LONG )"
    job smol_base_s$s --set "$BASE $M" --baselines wanda,sparsegpt --no-proxsparse $H
  fi
  if [ -n "$GEMMA" ]; then
    M="model=$GEMMA seed=$s samples=$N"
    job gemma_prox_s$s --set "$BASE $M" --baselines "" $H --recover "$RECOVER"
    job gemma_base_s$s --set "$BASE $M" --baselines magnitude,wanda,sparsegpt --no-proxsparse $H
  fi
done
wait
echo "sweep done $(date +%T)"
