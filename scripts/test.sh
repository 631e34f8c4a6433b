#!/usr/bin/env bash
# Fresh clone -> venv -> the whole test suite.  Extra arguments go to pytest (e.g. scripts/test.sh tests/model -x).
source "$(dirname "$0")/_venv.sh"
echo "== running tests"
exec python -m pytest -q -p no:cacheprovider "${@:-tests}"
