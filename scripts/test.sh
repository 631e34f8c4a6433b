#!/usr/bin/env bash
# Fresh clone -> venv -> the whole test suite.  Extra arguments go to pytest (e.g. scripts/test.sh tests/model -x).
source "$(dirname "$0")/_venv.sh"
echo "== running tests"
# pytest-xdist: one worker per core (at most 4); the tests that start several ranks run one after another on one
# worker (tests/conftest.py RANKS_MODULES). ERNIE5_TEST_WORKERS=0 runs everything in this process.
CORES=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
WORKERS="${ERNIE5_TEST_WORKERS:-$(( CORES >= 4 ? 4 : (CORES >= 2 ? CORES : 0) ))}"
exec python -m pytest -q -p no:cacheprovider -n "$WORKERS" --dist loadgroup "${@:-tests}"
