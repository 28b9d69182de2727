#!/usr/bin/env bash
# Set up the environment and run the whole test suite (what CI runs). With arguments, they go to one
# plain pytest run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. .venv/bin/activate
ruff check .
no_tests() {  # pytest's exit 5: nothing collected, which must not pass
  if [ "$1" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
  fi
}
set +e
if [ "$#" -gt 0 ]; then
  python -m pytest "$@"
  rc=$?
  no_tests "$rc"
  exit "$rc"
fi
# Two pytest runs side by side on the two cores: the tests that start Ray (marked `ray`), one after
# another so that there is never a second Ray instance, and all the others beside them (their output
# follows). Either run collecting nothing (exit 5) fails the suite.
others=$(mktemp)
python -m pytest -m "not ray" -p no:cacheprovider --durations=15 >"$others" 2>&1 &
pid=$!
python -m pytest -m ray --durations=15
rc_ray=$?
wait "$pid"
rc_others=$?
echo "================ the tests that do not start Ray (run beside the ones above) ================"
cat "$others"
rm -f "$others"
no_tests "$rc_ray"
no_tests "$rc_others"
[ "$rc_ray" -ne 0 ] && exit "$rc_ray"
exit "$rc_others"
