#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run of under ten minutes on one H100:
# training throughput of PackNet against plain training in fp32, bf16 and fp16 (with and
# without channels-last), the export of the sample's cars task validated on onnxruntime's
# CUDA execution provider, and the GPU-relevant tests. Results go to RESULTS_DIR.
#
#   bash benchmarks/gpu_session.sh RESULTS_DIR            # on a machine with a CUDA GPU
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_session.sh /tmp/smoke   # a quick check of the script
#
# It runs from the checkout without installing it (PYTHONPATH), with the machine's own torch;
# the CUDA provider needs onnxruntime-gpu (a plain onnxruntime falls back to the CPU and says so).
# Multi-GPU scaling needs several GPUs: benchmarks/ddp_scaling.py --nprocs 1,2,4,8 --device cuda.
set -euo pipefail
RESULTS_DIR=${1:?usage: bash benchmarks/gpu_session.sh RESULTS_DIR}
DEVICE=${DEVICE:-cuda}
mkdir -p "$RESULTS_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "${QUICK:-0}" = 1 ]; then
    SIZES=(--images 64 --repeats 1 --threads 1)
    RESNET=(--arch vgg_mini --width 8 --image-size 32); RESNET_BATCH=16
    RESNET_NAME=vgg_mini-w8
else
    SIZES=(--images 4096 --repeats 5 --threads 8 --workers 0)
    RESNET=(--arch resnet18 --width 0 --image-size 64); RESNET_BATCH=128
    RESNET_NAME=resnet18
fi
AMP=off,bf16
[ "$DEVICE" = cuda ] && AMP=off,bf16,fp16

{
    date -u
    git rev-parse HEAD 2>/dev/null || true
    "$PY" -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None,
'onnxruntime', ort.__version__, ort.get_available_providers())"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
} | tee "$RESULTS_DIR/machine.txt"

# every precision and both memory formats interleaved in one run per model
"$PY" benchmarks/training_overhead.py --device "$DEVICE" "${SIZES[@]}" --batch-size 128 --amp "$AMP" \
    --layouts nchw,channels-last --json "$RESULTS_DIR/training-$DEVICE-vgg_mini.json" > /dev/null
"$PY" benchmarks/training_overhead.py --device "$DEVICE" "${SIZES[@]}" "${RESNET[@]}" --batch-size $RESNET_BATCH \
    --amp "$AMP" --layouts nchw,channels-last --json "$RESULTS_DIR/training-$DEVICE-$RESNET_NAME.json" > /dev/null

"$PY" benchmarks/masking_cost.py --device "$DEVICE" "${RESNET[@]}" --channels-last \
    > "$RESULTS_DIR/masking-$DEVICE-$RESNET_NAME.json"

provider=cpu
[ "$DEVICE" = cuda ] && provider=auto
"$PY" -c "from packnet_export.cli.export import main; main()" --task cars --format all -o "$RESULTS_DIR/exports" --force \
    --provider "$provider" --json > "$RESULTS_DIR/export-$DEVICE.json" 2> "$RESULTS_DIR/export-$DEVICE.log" || {
    cat "$RESULTS_DIR/export-$DEVICE.log"; exit 1; }
rm -rf "$RESULTS_DIR/exports"

"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_validation.py tests/test_training.py tests/test_export.py \
    2>&1 | tail -5 | tee "$RESULTS_DIR/tests.txt"

"$PY" - "$RESULTS_DIR" <<'EOF' | tee "$RESULTS_DIR/summary.txt"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("training-*.json")):
    d = json.loads(f.read_text())
    print(f.stem, "| images/s", d["images_per_s"], "| packnet/plain", d["ratio_vs_plain"],
          "| mixed precision speed-up", d["mixed_precision_speedup"], "| channels-last speed-up",
          d["channels_last_speedup"])
for f in sorted(Path(sys.argv[1]).glob("export-*.json")):
    d = json.loads(f.read_text())
    for v in d["validation"]:
        worst = max(t["max_abs_diff"] for t in v["tasks"])
        print(f.stem, v["format"], v["provider"], "passed" if v["passed"] else "FAILED", "tasks", len(v["tasks"]),
              "worst max|diff|", worst, "notice", v["notice"])
EOF
