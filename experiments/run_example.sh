#!/usr/bin/env bash
# Main job: train the example LM (experiments/train_lm.py) with its CPU defaults:
# byte-level docstrings of the Python standard library, packed rows, jpack
# attention; a few minutes on a 2-core CPU. Creates (or reuses) .venv-example,
# installs jpack with its example extras, then trains. Run from anywhere:
#   bash experiments/run_example.sh                    # packed (default)
#   bash experiments/run_example.sh --packing padded   # extra arguments go to train_lm.py
# Output: runs/lm_<packing>/ (metrics.jsonl, summary.json, loss_curve.png, ckpt/).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-example}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_PROGRESS_BAR=off

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "==> creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

echo "==> pip install -e .[examples]"
start=$SECONDS
python -m pip install -q -e ".[examples]"
echo "==> install took $((SECONDS - start)) s"

echo "==> python -m experiments.train_lm $*"
start=$SECONDS
python -m experiments.train_lm "$@"
echo "==> training took $((SECONDS - start)) s"
