#!/usr/bin/env bash
# The whole tiny pipeline at two revisions, back to back, in one clone with its venv
# installed: where a change moved the time, measured in one window of a noisy machine.
#   bash benchmarks/ab_pipeline.sh CLONE REV_A REV_B   (results in CLONE/ab.txt)
# Each run starts from nothing: outputs, DVC cache, dvc.lock and the MLflow store removed.
set -u
clone=$1; shift
cd "$clone" || exit 1
for rev in "$@"; do
  make clean >/dev/null 2>&1
  rm -rf .dvc/cache .dvc/tmp dvc.lock .kiln data/.work
  git checkout -q "$rev"
  .venv/bin/pip install -q --no-deps -e . >/dev/null 2>&1
  start=$(date +%s)
  .venv/bin/kiln run --dataset shapes --profile tiny > "ab-$rev.log" 2>&1
  rc=$?
  echo "$rev rc=$rc wall=$(( $(date +%s) - start ))" >> ab.txt
  .venv/bin/python benchmarks/stage_times.py . >> ab.txt 2>&1
  grep -E "acc_all_seen|acc_all_held_out" "ab-$rev.log" >> ab.txt
done
