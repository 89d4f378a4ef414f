#!/usr/bin/env bash
# Intake at scale: `kiln source`, `kiln ingest` and `kiln validate` on a synthetic folder
# collection of N pictures (benchmarks/intake_gen.py), each stage under /usr/bin/time -v;
# then GROW more pictures added and the three stages again (an incremental sync).
#   bash benchmarks/intake_scale.sh WORK N [GROW] [grey]    (from the repository root)
# Prints one line a stage: seconds and peak RSS. WORK holds the pictures, a project copy
# (this checkout's tracked files) and each stage's log and time file.
set -eu
work=$1; n=$2; grow=${3:-0}; grey=${4:-}
repo=$(pwd)
rm -rf "$work" && mkdir -p "$work/pictures" "$work/project"
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/intake_gen.py "$work/pictures" 0 "$n" $grey
git ls-files -z | xargs -0 cp --parents -t "$work/project"
ln -s "$repo/.venv" "$work/project/.venv"
cd "$work/project"
sed -i "s|^  dataset: shapes.*|  dataset: folder|; s|^  source: null.*|  source: $work/pictures|" params.yaml
git init -q && git add -A && git -c user.email=b@b -c user.name=b commit -qm copy
unset $(env | grep -o '^\(MLFLOW\|KILN\|PREFECT_API\)[A-Z_]*' || true)
export PYTHONPATH=$PWD PREFECT_HOME=$PWD/.prefect OMP_NUM_THREADS=1
stages() {
  for st in source ingest validate; do
    /usr/bin/time -v -o "$work/$st-$1.time" .venv/bin/python -m training.cli $st > "$work/$st-$1.log" 2>&1 \
      || { echo "$st failed: $work/$st-$1.log"; exit 1; }
    echo "$1 $st: $(grep -E 'Elapsed|Maximum resident' "$work/$st-$1.time" | sed 's/^\s*//' | tr '\n' ' ')"
  done
}
stages "$n"
if [ "$grow" -gt 0 ]; then
  OMP_NUM_THREADS=1 "$repo/.venv/bin/python" "$repo/benchmarks/intake_gen.py" "$work/pictures" "$n" $((n + grow)) $grey
  stages "$n+$grow"
fi
