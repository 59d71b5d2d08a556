#!/usr/bin/env bash
# One short script for a machine with one CUDA GPU: the GPU-marked tests, the speed benchmarks
# (bench_backbone.py, bench_attacks.py), the MNIST-5k table (bench_mnist.py) and a sharded
# evaluation (bench_distributed.py), each step in its own time box so that the whole run stays
# under 8 minutes (90 + 45 + 60 + 240 + 60 = 495 s of boxes).
#
#   bash benchmarks/gpu.sh                   # needs a CUDA build of torch and the 'data' extra
#   OUT=/tmp/gpu DEVICE=cpu EPOCHS=1 N_PGD=20 N_AA=4 N_CONV=10 bash benchmarks/gpu.sh   # wiring check
#   OUT=/tmp/gpu03 TRAIN_EPS=0.3 EPS_WARMUP=3 EPOCHS=10 EVAL_EPS=0.3 bash benchmarks/gpu.sh  # MNIST's eps 0.3
#
# bench_mnist is resumable: a row cut off by its time box continues from its last finished epoch /
# attack unit when the script is run again with the same OUT. Everything printed is also written
# to $OUT/gpu.log; the MNIST table to $OUT/mnist_table.md.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-python}"
OUT="${OUT:-/tmp/robustdeq_gpu}"
DEVICE="${DEVICE:-cuda}"
EPOCHS="${EPOCHS:-5}"
BATCH="${BATCH:-256}"
N_PGD="${N_PGD:-1000}"
N_AA="${N_AA:-100}"
N_CONV="${N_CONV:-1000}"
TRAIN_EPS="${TRAIN_EPS:-0.1}"
EPS_WARMUP="${EPS_WARMUP:-0}"
EVAL_EPS="${EVAL_EPS:-0.1 0.3}"
ROWS="${ROWS:-undefended pgd-at trades trades-ris jiio-at lyadeq-at ff-cnn-pgd-at single trades+ier}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu.log") 2>&1

echo "== $(date -u +%FT%TZ) robustdeq gpu.sh on $(hostname), device $DEVICE"
if [ "$DEVICE" = "cuda" ]; then
    "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if ok else 'NO CUDA DEVICE'); sys.exit(0 if ok else 2)" \
        || { echo "gpu.sh: no CUDA device visible to $PY (a CPU-only torch?)"; exit 2; }
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "== gpu tests (90 s box)"
    timeout 90 "$PY" -m pytest -q -m gpu tests/ || echo "gpu.sh: gpu tests failed or timed out (rc $?)"
fi

echo "== bench_backbone.py --device $DEVICE (45 s box)"
timeout 45 "$PY" benchmarks/bench_backbone.py --device "$DEVICE" --repeats 10 \
    || echo "gpu.sh: bench_backbone failed or timed out (rc $?)"

echo "== bench_attacks.py --device $DEVICE (60 s box)"
timeout 60 "$PY" benchmarks/bench_attacks.py --device "$DEVICE" --repeats 3 \
    || echo "gpu.sh: bench_attacks failed or timed out (rc $?)"

echo "== bench_mnist.py --device $DEVICE (240 s box; resumable)"
# shellcheck disable=SC2086
timeout 240 "$PY" benchmarks/bench_mnist.py --device "$DEVICE" --rows $ROWS --epochs "$EPOCHS" \
    --batch-size "$BATCH" --n-pgd "$N_PGD" --n-aa "$N_AA" --n-conv "$N_CONV" --threads 4 \
    --train-eps "$TRAIN_EPS" --eps-warmup "$EPS_WARMUP" --eps $EVAL_EPS \
    --out "$OUT/mnist" --table "$OUT/mnist_table.md" \
    || echo "gpu.sh: bench_mnist failed or was cut by its time box (rc $?); run again with the same OUT to resume"
echo "== bench_distributed.py: torchrun, 1 process, $DEVICE (NCCL on cuda) sharded evaluate (60 s box)"
timeout 60 "$PY" benchmarks/bench_distributed.py --procs 1 --only eval --n-eval 32 --device "$DEVICE" --dir "$OUT/distributed" || echo "gpu.sh: bench_distributed failed or timed out (rc $?)"
echo "== $(date -u +%FT%TZ) gpu.sh done"
