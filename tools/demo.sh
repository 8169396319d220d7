#!/usr/bin/env bash
# The README demo: install, then build real emoji data -> train a tiny VAE and tune its decoder (sdtrain-train-vae) ->
# encode latent shards -> train the tiny U-Net with EMA -> sample grids and FID. ~23-34 minutes on 2 CPU cores (by the
# hour). Output in ${1:-demo_out}/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
out=${1:-demo_out}
shift || true
exec .venv/bin/sdtrain-demo --out "$out" "$@"
