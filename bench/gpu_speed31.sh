#!/usr/bin/env bash
# Issue 31 on one GPU, in one command: the packed 2:4 generation kernel (bench/decode24.py), the
# multi-pass prox against the one-launch kernel (bench/prox_speed.py --device cuda), the CUDA tests,
# optionally a learning step against AdamW (bench/gpu_step.py). Each step has its own time limit;
# logs and JSON go to $OUT (default ./gpu_out).
#
#     OUT=/some/dir STEPS="decode prox tests" bash bench/gpu_speed31.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
STEPS=${STEPS:-"decode prox tests"}
LAYERS=${LAYERS:-32}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/gpu.txt"
for step in $STEPS; do
    case $step in
        decode) timeout ${T_DECODE:-260} $PY bench/decode24.py --layers "$LAYERS" ${DECODE_ARGS:-} --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.txt" ;;
        prox) timeout ${T_PROX:-170} $PY bench/prox_speed.py --device cuda --layers "$LAYERS" --json "$OUT/prox.json" 2>&1 | tee "$OUT/prox.txt" ;;
        tests) timeout ${T_TESTS:-150} $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py ${TEST_ARGS:-} 2>&1 | tee "$OUT/pytest.txt" ;;
        step) timeout ${T_STEP:-200} $PY bench/gpu_step.py --layers "${STEP_LAYERS:-16}" --steps 5 --variants adamw,prox --json "$OUT/step.json" 2>&1 | tee "$OUT/step.txt" ;;
    esac
    echo "== $step: exit $?"
done
