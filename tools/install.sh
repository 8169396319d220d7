#!/usr/bin/env bash
# Install sdtrain into ./.venv (Python 3.11), idempotently. Used by the README, the demo and CI.
#  - torch and torchvision are installed first and pinned together (.ci/constraints.txt) so no dependency can
#    pull another torch (a mismatched torchvision fails to import: torchvision::nms);
#  - DeepSpeed is built without its C++/CUDA ops (DS_BUILD_OPS=0; they JIT-compile on first use) and without
#    build isolation, so its build sees the pinned torch instead of downloading another one; the one op CPU
#    training uses (cpu_adam) is compiled at the end, once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"sdtrain needs Python 3.11, found {sys.version}"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install -c .ci/constraints.txt torch==2.14.1 torchvision==0.29.1
DS_BUILD_OPS=0 "${PIP[@]}" install -c .ci/constraints.txt --no-build-isolation deepspeed
DS_BUILD_OPS=0 "${PIP[@]}" install -c .ci/constraints.txt --no-build-isolation -e ".[dev]"
# DeepSpeed's CPU Adam (the ZeRO-Offload optimizer) JIT-compiles on first use (1-3 min): build it once here into
# torch's extension cache ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so no test or first run
# pays for it; a later install finds it built and returns in a second. (DeepSpeed's shm_comm op is inference-only
# and never built: launch/zero.py turns it off.)
if ! build_log=$(.venv/bin/python -c 'from deepspeed.ops.op_builder import CPUAdamBuilder as B; B().load(verbose=False)' 2>&1); then
  echo "$build_log" | tail -5
  echo "warning: DeepSpeed's cpu_adam did not build (no C++ compiler?): strategy=deepspeed_zero3_offload will not run" >&2
fi
.venv/bin/python -c 'import torch, torchvision, lightning, diffusers, open_clip, webdataset, deepspeed, sdtrain; print(f"sdtrain ready: torch {torch.__version__}, lightning {lightning.__version__}, diffusers {diffusers.__version__}")'
