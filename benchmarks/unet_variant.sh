#!/usr/bin/env bash
# A finished real-data project's U-Net trained again with params.yaml overrides, then
# measured as RESULTS.md's real-data sections do (the pooled FD ratio over five picks):
#   bash benchmarks/unet_variant.sh PROJECT OUT KEY=VALUE...   (alone on the machine)
# e.g. bash benchmarks/unet_variant.sh /tmp/kr/t64c16/project /tmp/kr/b32 \
#        train_unet.batch_size=32 train_unet.steps=3600 seed=1
# PROJECT (a `benchmarks/real_data.py --keep` project: its data, VAE, CLIP and latents)
# is copied to OUT/project with this checkout's training/; `kiln train-unet` runs with
# the overrides. `seed` is then set back to 0 for `kiln evaluate`, so every variant is
# measured on the same caption picks and sampling seeds: evaluate's own choice (seed 0),
# `choice_spread.py --seeds 1,2,3` and `pooled_own.py`'s 640 at 1.5.
set -euo pipefail  # a failed stage stops the script (its output is piped through grep)
src=$1 out=$2; shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
dst=$out/project
rm -rf "$out" && mkdir -p "$out"
cp -a "$src" "$dst"
rm -rf "$dst/training" && cp -a "$repo/training" "$dst/training"
export PYTHONPATH=$dst PATH=$repo/.venv/bin:$PATH PREFECT_HOME=$dst/.prefect PYTHONUNBUFFERED=1
cd "$dst"
set_values() {  # KEY=VALUE... into params.yaml (numbers as numbers)
  python - "$@" <<'PY'
import sys
from pathlib import Path

import yaml

from training import config

vals = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in sys.argv[1:])}
config.set_values(Path("params.yaml"), vals)
print("params:", vals)
PY
}
set_values "$@"
/usr/bin/time -f "train_unet wall %e s" kiln train-unet 2>&1 | grep -v "it/s\]$" | tail -3
set_values seed=0
/usr/bin/time -f "evaluate wall %e s" kiln evaluate 2>&1 | grep "evaluate: guidance\|gate\|wall"
cd "$repo"
.venv/bin/python benchmarks/choice_spread.py "$dst" --seeds 1,2,3 2>&1 | grep '^{"seed'
.venv/bin/python benchmarks/pooled_own.py "$dst" --draws 0 --guidance 1.5 2>&1 | grep '^| /'
