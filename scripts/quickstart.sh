#!/usr/bin/env bash
# The README's quick start, for a fresh machine.
#   bash scripts/quickstart.sh demo  -> venv + install, then the headless demo on the sample data
#   bash scripts/quickstart.sh demo --overwrite  -> the same again, replacing the results in demo_out
#   bash scripts/quickstart.sh test  -> venv + install with test extras, then the test suite
# Set NAPARI_MAE_VENV to use another virtual environment folder (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
shift || true
venv="${NAPARI_MAE_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# The CPU build of torch (a local wheel on the CI machines); skipped if torch is present.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"

case "$mode" in
  demo)
    "$py" -m pip install -q -e .
    exec "$venv/bin/napari-mae" demo --out "${NAPARI_MAE_DEMO_OUT:-demo_out}" "$@"
    ;;
  test)
    "$py" -m pip install -q -e ".[testing]"
    # pytest exits 5 when it collects nothing: that is a failure here too.
    exec "$py" -m pytest -q -p no:cacheprovider "$@"
    ;;
  *)
    echo "usage: bash scripts/quickstart.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
