#!/usr/bin/env bash
# Make the environments benchmarks/edge_runtimes.py runs the edge runtimes in (--edge-venv DIR).
# The runtimes pin conflicting onnx / numpy / onnxruntime versions, so there are three:
#   DIR/main     openvino, pnnx + ncnn, MNN, apache-tvm, onnxruntime (for the .ort converter)
#   DIR/tf       onnx2tf, which pins tensorflow 2.19, onnx 1.19, onnxruntime 1.23.0, LiteRT
#   DIR/ort-old  onnxruntime 1.23.2, the older runtime many devices still run
# Versions are those EDGE.md was measured with; pass other pins by editing them here.
# About 9 GB of disk (pnnx and tensorflow bring their own torch/CUDA wheels) and a few minutes.
set -euo pipefail
DIR=${1:?usage: edge_setup.sh DIR}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
$PY -m venv "$DIR/main" && "$DIR/main/bin/pip" install -q \
    openvino==2026.4.1 pnnx==20261020 ncnn==1.0.20261020 MNN==3.6.1 apache-tvm==0.27.0.post1 \
    onnxruntime==1.32.0 onnx==1.23.2 numpy psutil
$PY -m venv "$DIR/tf" && "$DIR/tf/bin/pip" install -q onnx2tf==1.29.24
$PY -m venv "$DIR/ort-old" && "$DIR/ort-old/bin/pip" install -q onnxruntime==1.23.2 numpy
echo "environments ready: python benchmarks/edge_runtimes.py --edge-venv $DIR"
