# Sourced by demo.sh and test.sh: create .venv at the repo root if missing and install ernie5 into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
# the caller's extras: demo.sh needs cpu,demo; test.sh adds test (pytest, and torch + transformers as references)
EXTRAS="${ERNIE5_EXTRAS:-cpu,test,demo}"
STAMP=".venv/.ernie5-installed-${EXTRAS//,/-}"
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ]; then
  echo "== installing ernie5 and its dependencies ($EXTRAS) into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  touch "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
