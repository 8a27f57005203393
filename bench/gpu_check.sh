#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine (written for one H200; ~4–5 min there):
#   1. the CUDA tests and the prox/2:4 path tests (pytest),
#   2. bench/sparse_infer.py: 2:4 vs dense per product and for a 7B-shaped prefill,
#   3. bench/prox_speed.py --device cuda: fast prox vs the reference schedule,
# then a short summary. Logs and JSON go to $OUT (default ./gpu_out). Each step has its own time
# limit, so the summary is printed even if one step hangs.
#
#     OUT=/some/dir bash bench/gpu_check.sh        # or STEPS="sparse" bash bench/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
STEPS=${STEPS:-"tests sparse prox"}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| cuSPARSELt', torch.backends.cusparselt.is_available(), torch.backends.cusparselt.version(),
'| torch._cslt_sparse_mm', hasattr(torch, '_cslt_sparse_mm'))" 2>&1 | tee -a "$OUT/gpu.txt"

declare -A RC
t0=$SECONDS
if [[ " $STEPS " == *" tests "* ]]; then
    echo "== pytest (limit 150 s)"
    timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_prox_speed_paths.py \
        tests/test_sparse_infer.py 2>&1 | tee "$OUT/pytest.txt"
    RC[tests]=$?
fi
if [[ " $STEPS " == *" sparse "* ]]; then
    echo "== bench/sparse_infer.py (limit 220 s)"
    timeout 220 $PY bench/sparse_infer.py --json "$OUT/sparse.json" 2>&1 | tee "$OUT/sparse.txt"
    RC[sparse]=$?
fi
if [[ " $STEPS " == *" prox "* ]]; then
    echo "== bench/prox_speed.py --device cuda (limit 120 s)"
    timeout 120 $PY bench/prox_speed.py --device cuda --json "$OUT/prox.json" 2>&1 | tee "$OUT/prox.txt"
    RC[prox]=$?
fi

echo
echo "################################ SUMMARY ($((SECONDS - t0)) s) ################################"
head -2 "$OUT/gpu.txt"
for step in tests sparse prox; do
    [[ -n "${RC[$step]+x}" ]] && echo "$step: exit ${RC[$step]}$([[ ${RC[$step]} == 124 ]] && echo ' (TIMED OUT)')"
done
if [[ -f "$OUT/pytest.txt" ]]; then
    echo "-- pytest:"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | head -20; tail -1 "$OUT/pytest.txt"
fi
if [[ -f "$OUT/sparse.txt" ]]; then
    echo "-- 2:4 inference:"; sed -n '/^=====/,$p' "$OUT/sparse.txt"
fi
if [[ -f "$OUT/prox.txt" ]]; then
    echo "-- prox:"; grep -E "groups worse|all 224|fast prox worse" "$OUT/prox.txt"
fi
