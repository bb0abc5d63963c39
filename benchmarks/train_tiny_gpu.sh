#!/usr/bin/env bash
# Train several tiny Qwen2.5-VL variants side by side on one GPU (the model is tiny: each run is bound by
# its own Python loop, so four share an H100/H200 at nearly full speed each), then print a short table.
#
# Usage: bash benchmarks/train_tiny_gpu.sh BUDGET_S NAME="ARGS" [NAME="ARGS" ...]
#   e.g. bash benchmarks/train_tiny_gpu.sh 400 a="" b="--kinds needle_color needle_shape count"
# Each run writes OUT_DIR/NAME.tar.gz (checkpoint + training.json) and OUT_DIR/NAME.log (OUT_DIR: $OUT or
# /tmp/train_tiny). Recorded runs: psa_vlm/data/tiny_trained/TRAINING.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget="$1"; shift
dest="${OUT:-/tmp/train_tiny}"
mkdir -p "$dest"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "commit ${PSA_VLM_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
pids=()
names=()
for spec in "$@"; do
  name="${spec%%=*}"; extra="${spec#*=}"
  work="/tmp/train_tiny_runs/$name"
  rm -rf "$work"; mkdir -p "$work"
  # shellcheck disable=SC2086
  python3 -m psa_vlm.models.train_tiny --out "$work/ckpt" --steps 1000000 --time-budget "$budget" $extra \
    > "$dest/$name.log" 2>&1 &
  pids+=($!); names+=("$name")
done
rc=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "run ${names[$i]} failed"; tail -5 "$dest/${names[$i]}.log"; rc=1; }
done
for name in "${names[@]}"; do
  ck="/tmp/train_tiny_runs/$name/ckpt"
  [ -f "$ck/training.json" ] && tar -czf "$dest/$name.tar.gz" -C "$ck" .
done
python3 - "${names[@]}" <<'EOF'
import json, sys
print(f"{'run':<6} {'steps':>6} {'loss':>7} " + " ".join(f"{s[:14]:>14}" for s in
      ("bundled_32f_112x112", "short_16f_224x168", "2k_64f_224x224", "long_128f_224x168", "long_128f_sampled64")))
for name in sys.argv[1:]:
    try:
        m = json.load(open(f"/tmp/train_tiny_runs/{name}/ckpt/training.json"))
    except OSError:
        print(f"{name:<6} (no result)"); continue
    h = m["held_out"]
    cells = []
    for s in ("bundled_32f_112x112", "short_16f_224x168", "2k_64f_224x224", "long_128f_224x168", "long_128f_sampled64"):
        r = h.get(s)
        cells.append("-" if r is None else f"{r['overall']:.2f}/" + "".join(f"{int(round(9 * v))}" for v in r["per_kind"].values()))
    print(f"{name:<6} {m['steps']:>6} {str(m['final_loss']):>7} " + " ".join(f"{c:>14}" for c in cells))
print("cells: overall / per kind (needle_color, needle_shape, order, count) in ninths")
EOF
exit $rc
