#!/usr/bin/env bash
# Issue 30: does the learned mask keep its edge after recovery? Recovery against recovery, on one GPU.
#
# For each model and seed, two processes of bench/quality.py (float32, the same calibration tokens, every
# row scored on the built-in held-out text and three held-out texts of other domains):
#   <model>_prox_s<seed>  ProxSparse (the model's preset), then from its mask (W0 · mask, as published):
#                         `standard` recovery: OBS update, then 300 fine-tuning steps on 300 samples,
#                         the fine-tuning alone (no OBS update);
#   <model>_sgpt_s<seed>  dense, SparseGPT (and its mask on W0), then
#                         `standard` recovery: OBS update + 300 fine-tuning steps on 300 samples,
#                         the same with 600 steps on 600 samples (as many as a 300-step, one-sample
#                         ProxSparse run and its recovery read together: `scale-free`'s budget);
#                         SparseGPT is calibrated on the preset's samples, the same as ProxSparse's.
# Models: the bundled SmolLM2-135M (llama; preset bundled-quality: 600 steps × 8 samples from 2,400 since
# bench/RESULTS.md 1i, 300 × 1 from 150 before) and, with QWEN=FOLDER, a second
# architecture from a local folder (qwen2; preset scale-free), e.g. the GPU demo's model (bench/demo_model.py).
#   RES=/tmp/r30 QWEN=/tmp/demo-model bash bench/gpu_recovery.sh
#   SMOKE=1 RES=/tmp/r30s bash bench/gpu_recovery.sh          # a few steps of each, on the CPU
# Recovery from the learned weights instead of W0 · mask (worse on every text: bench/RESULTS.md section 1a)
# was measured with commit b5e9d51 of this script.
# PROX_REC / SGPT_REC replace the two processes' recovery items (e.g. "both:300,both:300:obs_damp=0.1"; with
# them PREGEN=300 writes no more of the model's own text than they read). PROX_SET / SGPT_SET add settings to
# the two processes (e.g. PROX_SET="steps=300 batch=1 samples=150" SGPT_SET="samples=150": the smaller budget of
# 1g, SparseGPT calibrated on the same 150 samples); TAG is added to their file names. METHODS=prox (or sgpt)
# runs one half of each pair.
# Rows go to $RES/*.jsonl, logs to $RES/*.log; `python bench/quality.py --table $RES/*.jsonl` prints them.
set -u
RES=${RES:-/tmp/r30}; QWEN=${QWEN:-}; SEEDS=${SEEDS:-"0 1"}; MAXJOBS=${MAXJOBS:-8}
PROX_SET=${PROX_SET:-}; SGPT_SET=${SGPT_SET:-}; TAG=${TAG:-}; METHODS=${METHODS:-"prox sgpt"}
mkdir -p "$RES"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
DEV=cuda; WIN=40; REC=300; STEPS=""; N=""
if [ -n "${SMOKE:-}" ]; then DEV=cpu; WIN=2; REC=3; STEPS="steps=3 eval_windows=2"; N=12; MAXJOBS=1; SEEDS=0; fi
H="--heldout bench/texts/legal.txt bench/texts/mldocs.txt bench/texts/manual.txt --heldout-windows $WIN"
SMALL=""; [ -n "${SMOKE:-}" ] && SMALL=":samples=8"
PROX_REC=${PROX_REC:-"both:$REC$SMALL,finetune:$REC$SMALL"}
MATCHED=$((2 * REC)); [ -n "${SMOKE:-}" ] && MATCHED_SAMPLES=16 || MATCHED_SAMPLES=$MATCHED
SGPT_REC=${SGPT_REC:-"both:$REC$SMALL,both:$MATCHED:samples=$MATCHED_SAMPLES"}
# samples of the model's own text written before the processes start: the most any process reads (the
# bundled model's preset calibrates on 2,400)
PREGEN=${PREGEN:-$( [ -n "${SMOKE:-}" ] || [ "${SMOL:-1}" = 0 ] && echo $MATCHED_SAMPLES || echo 2400 )}
models="bundled:smollm2-135m=bundled-quality"; [ "${SMOL:-1}" = 0 ] && models=""   # SMOL=0: the second model alone
[ -n "$QWEN" ] && models="$models $QWEN=scale-free"
settings() {   # settings MODEL SEED: the base settings of every process of that model and seed
  echo "model=$1 seed=$2 dtype=float32 eval_windows=0 $STEPS ${N:+samples=$N}"
}
# 0. the model's own calibration text (data mix) for every model and seed, made once before the processes
#    that share it start: the largest amount any of them reads (matched recovery: 600 samples)
for ms in $models; do m=${ms%=*}; for s in $SEEDS; do
  python3 -c "
from proxsparse_core.config import RunConfig; from proxsparse_core.workspace import Workspace
Workspace().load(RunConfig(model='$m', device='$DEV', dtype='float32', data='mix', samples=$PREGEN, ctx=128, seed=$s))" \
    > "$RES/pregen_$(basename "$m")_s$s.log" 2>&1 &
done; done
wait
echo "pregen done $(date +%T)"
for s in $SEEDS; do for ms in $models; do
  m=${ms%=*}; preset=${ms#*=}; tag=$( [ "$preset" = bundled-quality ] && echo smol || echo second )
  case " $METHODS " in *" prox "*)
  while [ "$(jobs -rp | wc -l)" -ge "$MAXJOBS" ]; do sleep 2; done
  python3 bench/quality.py --device $DEV --preset $preset --set "$(settings "$m" "$s") $PROX_SET" --baselines "" $H \
    --recover "$PROX_REC" --out "$RES/${tag}_prox${TAG}_s$s.jsonl" > "$RES/${tag}_prox${TAG}_s$s.log" 2>&1 & ;; esac
  case " $METHODS " in *" sgpt "*)
  while [ "$(jobs -rp | wc -l)" -ge "$MAXJOBS" ]; do sleep 2; done
  python3 bench/quality.py --device $DEV --preset $preset --set "$(settings "$m" "$s") $SGPT_SET" --baselines sparsegpt \
    --no-proxsparse $H --recover "$SGPT_REC" --out "$RES/${tag}_sgpt${TAG}_s$s.jsonl" > "$RES/${tag}_sgpt${TAG}_s$s.log" 2>&1 & ;; esac
done; done
wait
echo "all done $(date +%T)"
