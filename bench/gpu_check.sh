#!/usr/bin/env bash
# The one prepared GPU run: the whole test suite (on that machine's torch), a train.py run on
# the GPU, and every benchmark's CUDA rows. Everything lands in $OUT (default: bench/results).
# Env: PYTEST_TIMEOUT, CONFIGS, TRAIN_ARGS, BENCHES, BENCH_TIMEOUT (per bench script),
# BENCH_ARGS_<bench> (its arguments, e.g. BENCH_ARGS_train_step=--no-compile).
# Needs .whl/ (jsonargparse and its two helpers; see README "Performance") and .gpu_data/
# (the MNIST t10k files) carried along.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
export MNIST_T10K_DIR="$PWD/.gpu_data"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} 2>&1 | tee "$OUT/gpu_machine.txt"
# the whole log goes to $OUT; -v names each test as it ends, so a cut-off run still shows failures
timeout ${PYTEST_TIMEOUT:-420} python3 -m pytest -v -rf -n 8 -p no:cacheprovider -p no:benchmark \
  tests > "$OUT/gpu_pytest.txt" 2>&1; grep -E "FAILED|passed|failed" "$OUT/gpu_pytest.txt" | tail -30
# train.py on the GPU: the real t10k digits as train (8,000) / val (2,000), 10 epochs
mkdir -p /tmp/run/data/MNIST/raw && cd /tmp/run
for kind in images-idx3 labels-idx1; do
  cp "$MNIST_T10K_DIR/t10k-$kind-ubyte.gz" "data/MNIST/raw/train-$kind-ubyte.gz"; done
for cfg in ${CONFIGS:-mnist_regression mnist_cnn}; do for impl in manual native; do
  timeout 120 python3 "$OLDPWD/train.py" fit --config "$OLDPWD/configs/$cfg.yaml" \
    --trainer.accelerator gpu --data.val_size 2000 --model.impl $impl \
    --trainer.enable_progress_bar false ${TRAIN_ARGS:-} 2>&1 | tail -1 | tee -a "$OUT/gpu_train.txt"
done; done
# the opt-in fast path: each optimiser step replayed as one CUDA graph, 64 per Lightning step
timeout 120 python3 "$OLDPWD/train.py" fit --config "$OLDPWD/configs/mnist_regression.yaml" \
  --trainer.accelerator gpu --data.val_size 2000 --data.steps_per_batch 64 \
  --model.cuda_graph true --trainer.enable_progress_bar false ${TRAIN_ARGS:-} 2>&1 \
  | tail -2 | tee -a "$OUT/gpu_train.txt"
cd "$OLDPWD"
export BENCH_DEVICES=cuda
for b in ${BENCHES:-seed_table train_step memory lightning_epoch}; do
  # per-bench arguments: BENCH_ARGS_train_step="--no-compile", BENCH_ARGS_lightning_epoch=...
  args_var="BENCH_ARGS_$b"; args=${!args_var:-}
  [ "$b" = lightning_epoch ] && args=${args:-"--epochs 4"}
  timeout ${BENCH_TIMEOUT:-240} python3 -m bench.$b $args 2>&1 | grep -v -i "warn\|tip:" | tee -a "$OUT/gpu_bench.txt"
done
cp bench/results/*-cuda.md "$OUT/" 2>/dev/null
exit 0
