#!/usr/bin/env bash
# One command on any CUDA machine after the README install, under 8 minutes on one GPU: the GPU-marked tests, the
# SD2 U-Net sweep (layout, compile modes, batch up to the memory limit) and 50 real CLI steps under ddp and
# deepspeed_zero2; writes bench/RESULTS-gpu.md. No network, no weights. See bench/gpu_check.py.
#   bash bench/gpu_check.sh                 # on the GPU machine
#   bash bench/gpu_check.sh --cpu-smoke     # the same stages, tiny, on the CPU (the tests run this)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
