#!/usr/bin/env bash
# Issue 10's GPU figures in one call on a lent GPU, inside a fixed time budget:
#   1. training images/s at 32 px on the full 50k CIFAR-10 train split, CE and KD with a live
#      ResNet-50 teacher, NCHW vs channels_last (edgekd's choice on a GPU);
#   1b. the same KD epoch with `compile: default` and `reduce-overhead` (CUDA graphs) against eager;
#   2. the flagship pipeline, its distillation epochs sized from (1) to fit what is left
#      (no CE baseline, only onnxruntime: the machine has no other runtime), all of it timed;
#   3. images/s at 224 px (CIFAR-10 upscaled), KD, edgekd vs the reference.
# Each step runs under `timeout`, so a slow or failing step leaves the others their time.
#
#   EDGEKD_SHARED=/path/to/shared bash benchmarks/gpu_figures.sh OUT_DIR SECONDS
#
# OUT_DIR gets log.txt, tp32.json, tp32_compile.json, tp224.json and flagship.tar.gz (the run directory's reports).
set -u
out=$1
budget=$2
start=$(date +%s)
left() { echo $((budget - ($(date +%s) - start))); }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
shared=${EDGEKD_SHARED:?set EDGEKD_SHARED}
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}  # DEVICE=cpu IMAGES32=512 IMAGES224=128 FLAGSHIP_SETS="--set data.subset=1000 ..." for a dry run
n32=${IMAGES32:-50000}
n224=${IMAGES224:-8192}
exec > >(tr '\r' '\n' | grep --line-buffered -v -E '(s/step|step/s|it/s|img/s|s/img|try/s|s/try|file/s|s/file)\]$|\[A$|^\s*$' | tee -a "$out/log.txt") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
$py -c "import torch, torchvision, onnxruntime, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'onnxruntime', onnxruntime.__version__, 'cuda', torch.cuda.is_available())"
git rev-parse --short HEAD 2>/dev/null || true

echo "== 1. images/s at 32 px, full train split ($(left) s left)"
timeout 150 $py benchmarks/train_throughput.py --data "$shared/data/cifar10-jpg.tar.gz" --size 32 --images "$n32" \
    --batch 256 --repeats 1 --layouts both --no-reference --device "$dev" --json "$out/tp32.json"

echo "== 1b. torch.compile at 32 px, KD ($(left) s left)"
timeout 180 $py benchmarks/train_throughput.py --data "$shared/data/cifar10-jpg.tar.gz" --size 32 --images "$n32" \
    --batch 256 --repeats 1 --loss kd --compile off,default,reduce-overhead --no-reference --device "$dev" \
    --json "$out/tp32_compile.json"

# the distillation epochs that fit the time left, from the KD epoch in edgekd's own layout
epochs=$($py - "$out/tp32.json" "$(left)" <<'EOF'
import json, sys
try:
    rows = [r for r in json.load(open(sys.argv[1]))["results"] if r["loss"] == "kd"]
    epoch_s = 45000 / next(r for r in rows if r["layout"] == "channels_last")["edgekd_images_per_s"]
except Exception:
    epoch_s = 8.0
# besides distillation: 2 x 8 prune fine-tune epochs, 3 QAT epochs (~2x an epoch each), ~150 s of
# decoding, evaluation, export and benchmark, and 100 s kept for step 3
spare = int(sys.argv[2]) - 100 - 150
print(max(10, min(200, int(spare / epoch_s) - 22)))
EOF
)
echo "== 2. flagship: distill.epochs=$epochs ($(left) s left)"
t0=$(date +%s)
timeout $(($(left) - 95)) $py -m edgekd run pipelines/mobile_vision.yaml --out "$out/flagship" --set device="$dev" \
    --set distill.epochs="$epochs" --set distill.compare_baseline=false --set "benchmark.runtimes=[onnxruntime]" \
    --set benchmark.robustness=false ${FLAGSHIP_SETS:-}
echo "flagship exit $? after $(($(date +%s) - t0)) s"
tar -czf "$out/flagship.tar.gz" --exclude='*.onnx' --exclude='*.pt' --exclude='*.pte' --exclude='*.tflite' \
    -C "$out" flagship && rm -rf "$out/flagship"

echo "== 3. images/s at 224 px ($(left) s left)"
timeout $(($(left) - 5)) $py benchmarks/train_throughput.py --data "$shared/data/cifar10-jpg.tar.gz" --size 224 \
    --images "$n224" --batch 256 --loss kd --repeats 2 --device "$dev" --json "$out/tp224.json"
echo "== done ($(left) s left)"
