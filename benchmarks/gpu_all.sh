#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): GPU test tier, attention benchmark, prefill benchmark, and on request
# the offline lmms-eval sweep of the trained tiny model (sweep) and the data-parallel harness check (dp).
# Usage: bash benchmarks/gpu_all.sh [tests] [tests2] [attention] [prefill] [stages] [sweep] [dp]
#   (tests2: the two-GPU device_map test alone)
#   (default: tests attention prefill)
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
    sweep)
      # accuracy against sparsity of the shipped trained tiny model on the offline lmms-eval tasks (needs
      # lmms-eval, qwen-vl-utils, decord and av: carry them as wheels, see benchmarks/device_wheels/README.md);
      # SWEEP_ARGS=--redo re-runs pairs already in eval/results (a sweep resumes only runs of the same weights)
      export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="${HF_HOME:-$(mktemp -d)}"
      python3 eval/tasks/psa_synth/utils.py || rc=1
      margs="device_map=cuda,max_num_frames=128,min_pixels=3136,max_pixels=37632,min_seq_len=256,block_size=64"
      python3 -m psa_vlm.cli eval-sweep --model psa_vlm/data/tiny_trained --tasks psa_synth_long ${SWEEP_ARGS:-} \
        --presets "${SWEEP_PRESETS:-dense,paper,quota-0.1,quota-0.2,quota-0.3,binary-0.1,binary-0.2,binary-0.3}" \
        --model-args "$margs" --out eval/results/sweep-tiny-synth 2>&1 | grep -v "^INFO\|it/s\]" || rc=1
      python3 -m psa_vlm.cli eval-sweep --model psa_vlm/data/tiny_trained --tasks psa_synth_short ${SWEEP_ARGS:-} \
        --presets dense,paper,quota-0.2,binary-0.2 --model-args "$margs" --out eval/results/sweep-tiny-synth-short \
        2>&1 | grep -v "^INFO\|it/s\]" || rc=1
      if [ -n "${OUT:-}" ]; then tar -czf "$OUT/sweep.tar.gz" eval/results/sweep-tiny-synth eval/results/sweep-tiny-synth-short; fi ;;
    dp)
      # data-parallel lmms-eval (accelerate, one process per GPU) with the PSA model: a random model with
      # Qwen2.5-VL-7B-shaped layers on the offline task, run once in one process and once over all GPUs;
      # compare_dp.py checks every document came back once, PSA engaged and the densities agree
      export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="${HF_HOME:-$(mktemp -d)}"
      ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
      python3 benchmarks/make_7b_shaped.py /tmp/qwen7b_shaped --layers "${DP_LAYERS:-4}" || rc=1
      python3 eval/tasks/psa_synth/utils.py psa_synth_long || rc=1
      dargs="pretrained=/tmp/qwen7b_shaped,attn_implementation=sdpa,max_num_frames=128,min_pixels=3136,max_pixels=37632,preset=paper,min_seq_len=1024"
      for np_ in 1 "$ngpu"; do
        python3 -m accelerate.commands.launch --num_processes "$np_" $([ "$np_" -gt 1 ] && echo --multi_gpu) --main_process_port 29517 \
          -m lmms_eval --model qwen2_5_vl_psa --model_args "$dargs" --tasks psa_synth_long --include_path eval/tasks \
          --batch_size 1 --limit "${DP_LIMIT:-16}" --log_samples --output_path "/tmp/dp_$np_" 2>&1 \
          | grep -v "^INFO\|it/s\]" | tail -15 || rc=1
      done
      python3 benchmarks/compare_dp.py /tmp/dp_1 "/tmp/dp_$ngpu" || rc=1 ;;
    tests2)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/patches/test_qwen2_5_vl_gpu.py -k two_gpus 2>&1 | tail -5 || rc=1 ;;
    *) echo "unknown part $part"; rc=2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then cp eval/results/*.csv eval/results/*.md eval/results/*.png "$OUT"/ 2>/dev/null; fi
exit $rc
