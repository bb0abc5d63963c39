#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): GPU test tier, attention benchmark, prefill benchmark.
# Usage: bash benchmarks/gpu_all.sh [tests] [attention] [prefill] [stages]   (default: all of them)
# Env: SEQ_LENS (attention, default 16k-128k), PREFILL_LENS (default 16k-128k), OUT (results copy, e.g. $OUT).
# Results are appended to eval/results/{attention,prefill}.csv (+ .md/.png) and copied to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PSA_VLM_TEST_GPU=1
parts="${*:-tests attention prefill}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
rc=0
for part in $parts; do
  case "$part" in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/patches 2>&1 | tail -25 || rc=1 ;;
    stages)
      python3 -m psa_vlm.kernels.devcheck_stages 2>&1 | tail -30 || rc=1 ;;
    attention)
      python3 -m psa_vlm.cli bench-attention --seq-lens "${SEQ_LENS:-16384,32768,65536,131072}" ${ATTN_ARGS:-} 2>&1 | grep -v "^INFO" || rc=1 ;;
    prefill)
      python3 -m psa_vlm.cli bench-prefill --seq-lens "${PREFILL_LENS:-16384,32768,65536,131072}" ${PREFILL_ARGS:-} 2>&1 | grep -v "^INFO" || rc=1 ;;
    *) echo "unknown part $part"; rc=2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then cp eval/results/*.csv eval/results/*.md eval/results/*.png "$OUT"/ 2>/dev/null; fi
exit $rc
