#!/usr/bin/env bash
# The lambda_r sweep behind the default recipe (train/README.md): one pre-trained classifier,
# then 8 CASM epochs for each (preset, lambda_r), two runs at a time on one thread each.
# Usage: bash train/sweep_lambda.sh [DATA] [CLASSIFIER]
#   DATA: default data/synth; CLASSIFIER: a checkpoint to start from (default: train one,
#   `--classifier-only`, into runs/sweep/classifier). Outputs under runs/sweep/.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/synth}
classifier=${2:-runs/sweep/classifier/checkpoint.pt}
bin=.venv/bin
[ "$data" != data/synth ] || $bin/casm-deploy data synth
[ -f "$classifier" ] ||
  $bin/casm-deploy train "$data" --out runs/sweep --name classifier --classifier-only

casm() {  # NAME PRESET LAMBDA
  [ -f "runs/sweep/$1/checkpoint.pt" ] && return
  OMP_NUM_THREADS=1 $bin/casm-deploy train "$data" --out runs/sweep --name "$1" \
    --weights "$classifier" --pretrain-epochs 0 --epochs 8 \
    --reproduce "$2" --lambda-r "$3" > "runs/sweep/$1.log" 2>&1
}
mkdir -p runs/sweep
casm l100-2.5 L100 2.5 & casm l100-5 L100 5 & wait
casm f-2.5 F 2.5 & casm f-0.625 F 0.625 & wait
$bin/python train/show_runs.py runs/sweep/*/
