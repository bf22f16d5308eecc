#!/usr/bin/env bash
# The one prepared GPU run, most important first, so that a run cut short still returns
# what matters: the GPU-only tests, train.py on the GPU (plain and model.cuda_graph),
# every benchmark's CUDA rows, then the whole test suite on that machine's torch with
# whatever time is left. Everything lands in $OUT (default: bench/results).
# Env: DEADLINE (seconds for the whole script, default 540), TRAIN=0 (no train.py runs),
# SUITE=0 (not the whole suite), CONFIGS, TRAIN_ARGS, BENCHES,
# BENCH_TIMEOUT (per bench script), BENCH_ARGS_<bench> (its arguments, e.g.
# BENCH_ARGS_train_step=--no-compile).
# Needs .whl/ (jsonargparse and its two helpers; see README "Performance") and .gpu_data/
# (the MNIST t10k files) carried along.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-540}
left() { echo $(( DEADLINE - SECONDS > 5 ? DEADLINE - SECONDS : 5 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
export MNIST_T10K_DIR="$PWD/.gpu_data"
ROOT=$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} 2>&1 | tee "$OUT/gpu_machine.txt"
# 1. the tests that skip without a GPU (-v names each test as it ends)
timeout 150 python3 -m pytest -v -rfs -n 4 -p no:cacheprovider -p no:benchmark tests \
  -k "cuda or gpu" > "$OUT/gpu_tests_cuda.txt" 2>&1
grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests_cuda.txt" | tail -30
# 2. train.py on the GPU: the real t10k digits as train (8,000) / val (2,000), 10 epochs
if [ "${TRAIN:-1}" != 0 ]; then
mkdir -p /tmp/run/data/MNIST/raw && cd /tmp/run
for kind in images-idx3 labels-idx1; do
  cp "$MNIST_T10K_DIR/t10k-$kind-ubyte.gz" "data/MNIST/raw/train-$kind-ubyte.gz"; done
for cfg in ${CONFIGS:-mnist_regression mnist_cnn}; do for impl in manual native; do
  echo "== $cfg impl=$impl" | tee -a "$OUT/gpu_train.txt"
  timeout 120 python3 "$ROOT/train.py" fit --config "$ROOT/configs/$cfg.yaml" \
    --trainer.accelerator gpu --data.val_size 2000 --model.impl $impl \
    --trainer.enable_progress_bar false ${TRAIN_ARGS:-} 2>&1 | tail -1 | tee -a "$OUT/gpu_train.txt"
done; done
# the opt-in fast path: each optimiser step replayed as one CUDA graph, 64 per Lightning step
for impl in manual native; do
  echo "== mnist_regression impl=$impl steps_per_batch=64 cuda_graph=true" | tee -a "$OUT/gpu_train.txt"
  timeout 120 python3 "$ROOT/train.py" fit --config "$ROOT/configs/mnist_regression.yaml" \
    --trainer.accelerator gpu --data.val_size 2000 --data.steps_per_batch 64 --model.impl $impl \
    --model.cuda_graph true --trainer.enable_progress_bar false ${TRAIN_ARGS:-} 2>&1 \
    | tail -3 | tee -a "$OUT/gpu_train.txt"
done
cd "$ROOT"
fi
# 3. the benchmarks' CUDA rows
export BENCH_DEVICES=cuda
for b in ${BENCHES:-kernel_counts seed_table train_step memory lightning_epoch layers models}; do
  # per-bench arguments: BENCH_ARGS_train_step="--no-compile", BENCH_ARGS_lightning_epoch=...
  args_var="BENCH_ARGS_$b"; args=${!args_var:-}
  [ "$b" = lightning_epoch ] && args=${args:-"--epochs 4"}
  t=$(left); [ "$t" -gt "${BENCH_TIMEOUT:-240}" ] && t=${BENCH_TIMEOUT:-240}
  timeout "$t" python3 -m bench.$b --save $args 2>&1 | grep -v -i "warn\|tip:" | tee -a "$OUT/gpu_bench.txt"
done
# 4. the whole suite on this machine's torch, in the time left
[ "${SUITE:-1}" = 0 ] && exit 0
echo "suite: $(left) s left" | tee "$OUT/gpu_pytest.txt"
timeout "$(left)" python3 -m pytest -v -rf -n 12 -p no:cacheprovider -p no:benchmark \
  tests >> "$OUT/gpu_pytest.txt" 2>&1; grep -E "FAILED|passed|failed" "$OUT/gpu_pytest.txt" | tail -30
exit 0
