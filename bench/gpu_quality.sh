#!/usr/bin/env bash
# Issue 9's quality sweep on one GPU: the bundled SmolLM2 (Llama family) and Gemma-3-270M (a second
# architecture, from a local folder made by bench/second_model.py), two calibration seeds each; every
# row on the built-in held-out text and three held-out texts of other domains, with the greedy answers
# to the Compare tab's example prompts.
#
# Settings: the scale-free recipe (λ1 0.01 and lr $LR, default 0.005 as in the presets, relative to each
# layer's rms(W0), cosine, 300 steps, self-distillation on half built-in, half self-written text) with N
# calibration samples × 128 tokens (150: each seen twice). The baselines get the same calibration tokens.
# ProxSparse's mask is also recovered with every item of RECOVER (default "both:300": OBS update + 300
# fine-tuning steps; items as in `bench/quality.py --recover`, e.g. "both:300,both:300:samples=300:lr=0.002").
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
# More knobs: SWEEP=1 runs the sweep after the VARIANTS too; BASELINES=0 leaves out the one-shot baselines
# on N samples (they are deterministic: an earlier sweep's rows serve); TUNING=K adds SparseGPT on K
# samples (the sample count of a recovery item with samples=K, so that both read the same tokens);
# LONGREC adds, on seed 0 of the bundled model, a process that learns the mask and recovers it with LONGREC
# and one that recovers SparseGPT's with LONGREC (e.g. LONGREC=both:1000:samples=1000; the best models, for
# the answers); GEMMA_RECOVER replaces RECOVER for Gemma. EXTRA adds settings to every ProxSparse job (e.g.
# "score=activation"), GEMMA_EXTRA to Gemma's (e.g. "lambda2=0.0001": the scale-free preset); a variant
# "gemma:lr=0.003" or "smol:lr=0.003" runs for that model only. MORE_PROMPTS=1: every row also answers
# bench/quality.py's MORE_PROMPTS (prompts no calibration text contains).
set -u
RES=${RES:-/tmp/q}
GEMMA=${GEMMA:-}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DEV=cuda; STEPS=300; REC=300; WIN=40; N=${N:-150}; LR=${LR:-0.005}; ANS=48; MAXJOBS=${MAXJOBS:-4}
TUNING=${TUNING:-}; LONGREC=${LONGREC:-}
RECOVER=${RECOVER:-both:$REC}
small() {   # a recovery spec shrunk for SMOKE: each item 2 steps on 16 samples, its other settings kept
  echo "$1" | tr ',' '\n' | grep . | sed -E 's/^(both|finetune|obs)(:[0-9]+)?/\1:2/; s/:samples=[0-9]+//; s/$/:samples=16/' \
    | paste -sd, -
}
if [ -n "${SMOKE:-}" ]; then   # a few steps of everything on the CPU
  DEV=cpu; STEPS=3; WIN=2; N=12; ANS=4; MAXJOBS=1
  GEMMA_RECOVER=$(small "${GEMMA_RECOVER:-$RECOVER}"); RECOVER=$(small "$RECOVER"); LONGREC=$(small "$LONGREC")
  [ -n "$TUNING" ] && TUNING=16
fi
H="--heldout bench/texts/legal.txt bench/texts/mldocs.txt bench/texts/manual.txt --heldout-windows $WIN"
Q="python3 bench/quality.py --device $DEV --answers $ANS${MORE_PROMPTS:+ --more-prompts}"
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
extra() { [ "$1" = "$SMOL" ] && echo "${EXTRA:-}" || echo "${EXTRA:-} ${GEMMA_EXTRA:-}"; }
[ "${ONLY:-}" = gemma ] && SMOL=""            # ONLY=gemma: the second model alone
models="$SMOL $GEMMA"
# 0. the bundled model's safetensors copy, made once before any parallel load
[ -n "$SMOL" ] && python3 -c "from proxsparse_core.models.loading import bundled_folder; print(bundled_folder())"
# 1. the model's own calibration text for every (model, seed), made once so that every process of a
#    seed calibrates on the same tokens: selfgen keeps one growing stream per model and seed, of which
#    every smaller size is a prefix, so only the largest size any process of that model reads is made
GEMMA_RECOVER=${GEMMA_RECOVER:-$RECOVER}
SEEDS="0 1"; [ -n "${VARIANTS:-}" ] && [ -z "${SWEEP:-}" ] && SEEDS=0
largest() {   # largest N TUNING SPEC: the most calibration samples a process reads
  echo "$1 $2 $(echo "$3" | grep -oE 'samples=[0-9]+' | cut -d= -f2)" | tr ' ' '\n' | grep . | sort -n | tail -1
}
for m in $models; do for s in $SEEDS; do
  n=$( [ "$m" = "$SMOL" ] && largest "$N" "$TUNING" "$RECOVER,$LONGREC" || largest "$N" "$TUNING" "$GEMMA_RECOVER" )
  CUDA_VISIBLE_DEVICES=$((K % NGPU)) python3 -c "
from proxsparse_core.config import RunConfig; from proxsparse_core.workspace import Workspace
Workspace().load(RunConfig(model='$m', device='$DEV', dtype='float32', data='mix', samples=$n, ctx=128, seed=$s))" \
    > "$RES/pregen_$(basename $m)_s${s}_$n.log" 2>&1 &
  K=$((K + 1))
done; done
wait
echo "pregen done $(date +%T)"
# 2. the sweep, then the variants (seed 0, ProxSparse mask only)
[ -n "${VARIANTS:-}" ] && [ -z "${SWEEP:-}" ] && SEEDS=""
for s in $SEEDS; do
  for m in $models; do
    tag=$( [ "$m" = "$SMOL" ] && echo smol || echo gemma )
    M="model=$m seed=$s samples=$N"
    job ${tag}_prox_s$s --set "$BASE $(extra $m) $M" --baselines "" $H --recover "$( [ $tag = smol ] && echo $RECOVER || echo $GEMMA_RECOVER )"
    [ "${BASELINES:-1}" = 0 ] || job ${tag}_base_s$s --set "$BASE $M" --baselines magnitude,wanda,sparsegpt --no-proxsparse $H
    [ -n "$TUNING" ] && job ${tag}_sgpt${TUNING}_s$s --set "$BASE model=$m seed=$s samples=$TUNING" \
        --baselines sparsegpt --no-proxsparse $H
    if [ -n "$LONGREC" ] && [ "$m" = "$SMOL" ] && [ $s = 0 ]; then
      job smol_long_s0 --set "$BASE $(extra $m) $M" --baselines "" $H --recover "$LONGREC"
      job smol_sgptlong_s0 --set "$BASE $M" --baselines sparsegpt --no-proxsparse $H --recover "$LONGREC"
    fi
  done
done
for v in ${VARIANTS:-}; do for m in $models; do
  tag=$( [ "$m" = "$SMOL" ] && echo smol || echo gemma ); set_=$v
  case "$v" in *:*) [ "${v%%:*}" = "$tag" ] || continue; set_=${v#*:} ;; esac
  job "variant_${tag}_${set_//=/}" --set "$BASE $(extra $m) model=$m seed=0 samples=$N $set_" --baselines "" $H
done; done
wait
echo "sweep done $(date +%T)"
