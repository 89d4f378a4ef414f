#!/bin/bash
# U-Net sweep on one GPU: VAE, CLIP and latents once, then the named U-Net variants
# side by side on the same GPU (the tiny U-Net cannot fill a GPU alone).
#
# Usage, from the repository root on the GPU machine, with data/clean made here by
# `kiln ingest && kiln validate`:
#     WIDTH=9 bash benchmarks/gpu_sweep.sh 'h4s0={"seed":0,"attention_head_dim":4}' ...
# Variants are benchmarks/unet_sweep.py's NAME=JSON overrides. Rows are appended to
# $OUT/unet_sweep.jsonl as each variant ends (OUT defaults to /tmp/kiln-sweep-out), so
# a run cut short keeps what it finished. If a .whl/ folder is present (Kiln's
# pure-Python dependencies, for a machine that has torch but no registry access), it
# is installed first.
set -eo pipefail
OUT=${OUT:-/tmp/kiln-sweep-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python -m pip install -q --no-index --no-deps --root-user-action=ignore .whl/*.whl
fi
export PYTHONPATH=$PWD KILN_DEVICE=cuda
nvidia-smi --query-gpu=name,memory.used --format=csv
KG=/tmp/kiln-sweep-models
[ -f $KG/latents/manifest.json ] || python benchmarks/gpu_pipeline.py --out $KG --until precompute_latents
P=/tmp/kiln-sweep-project
rm -rf $P
mkdir -p $P/data/models
cp params.yaml $P/
ln -s "$PWD/data/clean" $P/data/clean
ln -s $KG/latents $P/data/latents
ln -s $KG/models/vae $P/data/models/vae
ln -s $KG/models/clip $P/data/models/clip
touch "$OUT/unet_sweep.jsonl"
ln -s "$OUT/unet_sweep.jsonl" $P/unet_sweep.jsonl
python benchmarks/unet_sweep.py $P --width "${WIDTH:-9}" --samples 2 "$@"
