#!/usr/bin/env bash
# Trains the codebooks of every configuration of design note §3 (4, 2, 1, 0.75, 0.5, 0.375 bits) from one
# calibration dump, on each device asked for, then prints the comparison table (scripts/codebook_table.py):
#   scripts/train_every_config.sh RECIPE CALIB.h5 OUT_DIR [cpu] [cuda]
# e.g. after `antkv-calibrate --recipe recipes/antkv-ref-18m-quick.yaml --out runs/quick/calib.h5`:
#   scripts/train_every_config.sh recipes/antkv-ref-18m-quick.yaml runs/quick/calib.h5 runs/quick/every cpu cuda
# Extra antkv-train-codebook options go in ANTKV_TRAIN_ARGS (e.g. "--set kmeans.weighting=none").
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n 2,7p "$0" >&2
  exit 2
fi
recipe=$1 calib=$2 out=$3
shift 3
devices=${*:-cpu}
train=${ANTKV_TRAIN_CODEBOOK:-antkv-train-codebook}
mkdir -p "$out"
for dev in $devices; do
  for bits in 4 2 1 0.75 0.5 0.375; do
    name="$out/codebooks-${bits}bit-${dev}.h5"
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    "$train" --recipe "$recipe" --calib "$calib" --out "$name" --set "quant.bits=$bits" --device "$dev" \
      --force -q ${ANTKV_TRAIN_ARGS:-}
    ms=$((($(date +%s%N) - start) / 1000000))
    printf '%s %s bit: %d.%03d s\n' "$dev" "$bits" $((ms / 1000)) $((ms % 1000))
  done
done
python3 "$(dirname "$0")/codebook_table.py" "$out"/codebooks-*.h5.report.json
