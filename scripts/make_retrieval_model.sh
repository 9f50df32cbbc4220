#!/usr/bin/env bash
# Makes the retrieval reference model (data/models/antkv-retrieval-2m) on the GPU machine, in one go: a smoke test
# of every script (a few seconds of training, quick references), the training, reference/, README.md.
#   make_retrieval_model.sh SHARED_DIR OUT_DIR [TRAIN_BUDGET_S [TRAINING FLAGS...]]
# TRAINING FLAGS go to train_retrieval_model.py (e.g. --init-from data/models/antkv-retrieval-2m --lr 3e-4 to
# fine-tune the committed model); SKIP_SMOKE=1 skips the smoke test.
# SHARED_DIR holds data/books-calib.txt, data/books-test.txt and models/stories260K (its tokenizer); the model is
# written to OUT_DIR/antkv-retrieval-2m (copy that folder to data/models/), plus OUT_DIR/tokenizer_sample.json
# (ids from the tokenizers library, to compare with the toolkit's tokenizer). Needs python3 with torch,
# transformers, tokenizers, safetensors and numpy, and a CUDA GPU; about 2 minutes more than TRAIN_BUDGET_S.
set -u -o pipefail
[ $# -ge 2 ] || { echo "usage: make_retrieval_model.sh SHARED_DIR OUT_DIR [TRAIN_BUDGET_S]" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
shared=$1 out=$2 budget=${3:-300}
shift $(( $# < 3 ? $# : 3 ))
extra=("$@")
calib=$shared/data/books-calib.txt test=$shared/data/books-test.txt tok=$shared/models/stories260K
for f in "$calib" "$test" "$tok/tokenizer.json"; do
  [ -f "$f" ] || { echo "make_retrieval_model.sh: $f: missing" >&2; exit 1; }
done
mkdir -p "$out" || exit 1
work=$(mktemp -d) || exit 1
trap 'rm -rf "$work"' EXIT
step() { echo "== $(date -u +%T) $*"; }

if [ -z "${SKIP_SMOKE:-}" ]; then
  step "smoke test: --steps auto on a 10 s budget, then quick references"
  python3 "$here/train_retrieval_model.py" --text "$calib" --tokenizer-from "$tok" --out "$work/smoke" "${extra[@]}" \
    --steps auto --budget-s 10 --log-every 50 --select-evals 2 --select-cases 1 ||
    { echo "make_retrieval_model.sh: the smoke training failed" >&2; exit 1; }
  python3 "$here/make_retrieval_reference.py" --model "$work/smoke" --test-text "$test" --quick ||
    echo "make_retrieval_model.sh: the smoke references failed (the training goes on; reference/ will fail too)" >&2
fi

step "training (budget ${budget} s)"
python3 "$here/train_retrieval_model.py" --text "$calib" --tokenizer-from "$tok" --out "$out/antkv-retrieval-2m" \
  --steps auto --budget-s "$budget" "${extra[@]}" || { echo "make_retrieval_model.sh: the training failed" >&2; exit 1; }

step "references"
python3 "$here/make_retrieval_reference.py" --model "$out/antkv-retrieval-2m" --test-text "$test" \
  --tokenizer-sample-out "$out/tokenizer_sample.json" || exit 1
python3 "$here/write_retrieval_readme.py" "$out/antkv-retrieval-2m" || exit 1
du -sb "$out/antkv-retrieval-2m" "$out/antkv-retrieval-2m"/* "$out/antkv-retrieval-2m"/reference/*
step "done"
