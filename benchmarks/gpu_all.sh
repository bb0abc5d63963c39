#!/usr/bin/env bash
# Everything psa_vlm checks and times on a GPU box (H100/H200), in one command, from the repository root.
# Install first: pip install -e ".[eval,test,fa4]"  (fa4: FlashAttention-4 for the fa4 backend; without it the
# runs use the Triton backend and the FlashAttention-4 baselines are skipped).
#
# Usage: bash benchmarks/gpu_all.sh [PART ...]      (default: tests fa4 estimator pooled lengths attention prefill)
#   tests      GPU test tier (kernels, every backend, the model patch of every family) at realistic shapes
#   fa4        benchmarks/devcheck_fa4.py: the FlashAttention-4 attend stage level by level, hybrid variants,
#              import and first-compile cost
#   stages     benchmarks/devcheck_stages.py: pool / estimate / assign against their references, timed
#   estimator  benchmarks/devcheck_gluon_estimate.py: the estimator's Gluon kernel (Hopper) against the Triton
#              GEMM form, both checked, timed in the same run
#   pooled     benchmarks/devcheck_gluon_pooled.py: the attend stage's pooled launch as a Gluon kernel (Hopper)
#              against the Triton kernel, checked, timed alone and inside the fa4 attend stage
#   streams    benchmarks/devcheck_streams.py: interleaved A/B of the fa4 attend stage's side stream (layer and
#              28-layer prefill, outputs equal), the pattern for effects of 1-2% on a power-limited card
#   lengths    benchmarks/devcheck_lengths.py: a new prompt length does not recompile the kernels
#              (BACKEND=auto|triton|fa4, default auto)
#   attention  psa-vlm bench-attention (every dense baseline, every stage, checked in the same run)
#   prefill    psa-vlm bench-prefill, Qwen2.5-VL-7B-shaped (TTFT)
#   prefill3   psa-vlm bench-prefill --arch qwen3_vl, Qwen3-VL-8B-shaped (TTFT)
#   sweep      offline lmms-eval accuracy sweep of the shipped tiny model (needs the eval extra)
#   dp         data-parallel lmms-eval (accelerate, one process per GPU) against a single process on one GPU, for
#              qwen2_5_vl_psa (Qwen2.5-VL-7B-shaped random checkpoint) and qwen3_vl_psa (Qwen3-VL-8B-shaped)
#   tests2     the two-GPU tests alone (tests/patches/test_multi_gpu.py: layers split over two GPUs with
#              device_map, PSA on every layer, each backend, against the same model on one GPU)
# Two GPUs: bash benchmarks/gpu_all.sh tests2 dp   (eval/results/MULTI_GPU.md)
# Env: SEQ_LENS (attention), PREFILL_LENS, PREFILL3_LENS, ATTN_ARGS, PREFILL_ARGS, SWEEP_ARGS,
#      DP_LIMIT (documents, default 16), DP_LAYERS (decoder layers, default 4), DP_PRESET (default quota-0.2),
#      DP_BACKEND (default auto), OUT (a folder that receives copies of the result tables and logs).
# Results are appended to eval/results/*.csv (+ .md/.png) with the GPU name, versions and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PSA_VLM_TEST_GPU=1
parts="${*:-tests fa4 estimator pooled lengths attention prefill}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -c "from psa_vlm.kernels.attention.fa4 import fa4_import_error as e; print('flash-attn-4:', e() or 'ok')"
python3 - <<'PY'
from importlib.metadata import PackageNotFoundError, version
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"
print(" ".join(f"{n} {v(n)}" for n in ("accelerate", "lmms_eval", "flash-attn-4", "psa-vlm")))
PY
# PSA_VLM_COMMIT names the commit where the tree is a copy without .git (as psa_vlm.bench records it)
echo "commit ${PSA_VLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}$(git status --porcelain \
  --untracked-files=no 2>/dev/null | grep -q . && echo ' (+ local changes)')"
rc=0
for part in $parts; do
  case "$part" in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::DeprecationWarning tests 2>&1 | tail -25 || rc=1 ;;
    pooled)
      python3 benchmarks/devcheck_gluon_pooled.py ${OUT:+--out "$OUT"} 2>&1 | grep -v "Warning\|exe_args" || rc=1 ;;
    fa4)
      python3 benchmarks/devcheck_fa4.py ${OUT:+--out "$OUT"} 2>&1 | grep -v "Warning" || rc=1 ;;
    streams)
      python3 benchmarks/devcheck_streams.py ${OUT:+--out "$OUT"} 2>&1 | grep -v "Warning\|generate_mlir" || rc=1 ;;
    lengths)
      python3 benchmarks/devcheck_lengths.py --backend "${BACKEND:-auto}" ${OUT:+--out "$OUT"} 2>&1 \
        | grep -v "Warning" || rc=1 ;;
    stages)
      python3 benchmarks/devcheck_stages.py ${OUT:+--out "$OUT"} 2>&1 | tail -30 || rc=1 ;;
    estimator)
      python3 benchmarks/devcheck_gluon_estimate.py ${OUT:+--out "$OUT"} 2>&1 | grep -v "Warning" || rc=1 ;;
    attention)
      python3 -m psa_vlm.cli bench-attention --seq-lens "${SEQ_LENS:-16384,32768,65536,131072}" ${ATTN_ARGS:-} 2>&1 \
        | grep -v "^INFO\|Warning" || rc=1 ;;
    prefill)
      python3 -m psa_vlm.cli bench-prefill --seq-lens "${PREFILL_LENS:-16384,32768,65536,131072}" ${PREFILL_ARGS:-} \
        2>&1 | grep -v "^INFO\|Warning" || rc=1 ;;
    prefill3)
      python3 -m psa_vlm.cli bench-prefill --arch qwen3_vl --seq-lens "${PREFILL3_LENS:-32768,65536,131072,262144}" \
        ${PREFILL_ARGS:-} 2>&1 | grep -v "^INFO\|Warning" || rc=1 ;;
    sweep)
      # accuracy against sparsity of the shipped trained tiny model on the offline lmms-eval tasks;
      # SWEEP_ARGS=--redo re-runs pairs already in eval/results (a sweep resumes only runs of the same weights)
      export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="${HF_HOME:-$(mktemp -d)}"
      python3 eval/tasks/psa_synth/utils.py || rc=1
      margs="device_map=cuda,max_num_frames=128,min_pixels=3136,max_pixels=37632,min_seq_len=256,block_size=64"
      python3 -m psa_vlm.cli eval-sweep --model psa_vlm/data/tiny_trained --tasks psa_synth_long ${SWEEP_ARGS:-} \
        --presets "${SWEEP_PRESETS:-dense,paper,quota-0.1,quota-0.2,quota-0.3,binary-0.1,binary-0.2,binary-0.3}" \
        --model-args "$margs" --out eval/results/sweep-tiny-synth 2>&1 | grep -v "^INFO\|it/s\]" || rc=1
      if [ -n "${OUT:-}" ]; then tar -czf "$OUT/sweep.tar.gz" eval/results/sweep-tiny-synth; fi ;;
    dp)
      # data-parallel lmms-eval (accelerate, one process per GPU) with each PSA model: a random checkpoint with
      # Qwen2.5-VL-7B-shaped (qwen2_5_vl_psa) and one with Qwen3-VL-8B-shaped (qwen3_vl_psa) layers on the offline
      # task, run once in one process on GPU 0 and once data-parallel over all GPUs; compare_dp.py checks every
      # document came back once, the answers are identical, PSA engaged and the densities agree
      export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="${HF_HOME:-$(mktemp -d)}"
      ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
      if [ "${ngpu:-0}" -lt 2 ]; then echo "dp: needs at least 2 GPUs, found $ngpu"; rc=1; continue; fi
      python3 eval/tasks/psa_synth/utils.py psa_synth_long || rc=1
      for spec in "qwen2_5_vl_psa qwen2_5_vl /tmp/qwen7b_shaped" "qwen3_vl_psa qwen3_vl /tmp/qwen3_8b_shaped"; do
        read -r model arch ckpt <<< "$spec"
        python3 benchmarks/make_7b_shaped.py "$ckpt" --arch "$arch" --layers "${DP_LAYERS:-4}" 2>&1 \
          | grep -v "it/s\]" || { rc=1; continue; }
        dargs="pretrained=$ckpt,attn_implementation=sdpa,max_num_frames=128,min_pixels=3136,max_pixels=37632"
        dargs="$dargs,preset=${DP_PRESET:-quota-0.2},min_seq_len=1024,backend=${DP_BACKEND:-auto}"
        for np_ in 1 "$ngpu"; do
          out="/tmp/dp_${model}_$np_"
          rm -rf "$out"
          echo "== dp $model, $np_ process(es): --model_args $dargs"
          # the single process sees GPU 0 only (lmms-eval's default device_map=auto would split it over all GPUs)
          ( if [ "$np_" -eq 1 ]; then export CUDA_VISIBLE_DEVICES=0; fi
            python3 -m accelerate.commands.launch --num_processes "$np_" $([ "$np_" -gt 1 ] && echo --multi_gpu) \
              --main_process_port 29517 -m lmms_eval --model "$model" --model_args "$dargs" --tasks psa_synth_long \
              --include_path eval/tasks --batch_size 1 --limit "${DP_LIMIT:-16}" --log_samples --output_path "$out" ) \
            2>&1 | grep -v "^INFO\|it/s\]" | tail -15 || rc=1
        done
        python3 benchmarks/compare_dp.py "/tmp/dp_${model}_1" "/tmp/dp_${model}_$ngpu" --expect "${DP_LIMIT:-16}" \
          || rc=1
      done ;;
    tests2)
      python3 -m pytest -q -m gpu -p no:cacheprovider -rA --tb=short tests/patches/test_multi_gpu.py -k two_gpus 2>&1 \
        | tail -60 || rc=1 ;;
    *) echo "unknown part $part"; rc=2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then cp eval/results/*.csv eval/results/*.md eval/results/*.png "$OUT"/ 2>/dev/null; fi
exit $rc
