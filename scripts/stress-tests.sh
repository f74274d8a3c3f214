#!/usr/bin/env bash
# The whole test suite, three times in a row, on a clean clone, while a CPU burner keeps every
# core busy: proof that no test depends on how fast this machine is. Prints a Markdown summary
# (wall time, result, load, the 15 slowest tests of each run) for TESTING.md.
#
#   scripts/stress-tests.sh [RUNS]          # default 3; extra pytest arguments in PYTEST_ARGS
#
# The clone is of this checkout's HEAD, in a temporary directory that is removed afterwards. Set
# MLSERVER_VENV to an existing MLServer environment to link it instead of building one.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
repo=$(pwd)
work=$(mktemp -d -t stress-tests.XXXXXX)
burners=()

cleanup() {
  for pid in "${burners[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

git clone -q "$repo" "$work/clone"
cd "$work/clone"
commit=$(git rev-parse --short HEAD)
if [ -n "${MLSERVER_VENV:-}" ]; then ln -s "$MLSERVER_VENV" .venv-mlserver; fi
# Set up as the README says (install, ruff, mypy), collecting the tests without running them.
scripts/test.sh --collect-only -q >"$work/setup.log" 2>&1 || { cat "$work/setup.log"; exit 1; }

cores=$(nproc)
for _ in $(seq "$cores"); do
  sh -c 'while :; do :; done' &
  burners+=($!)
done

echo "## $(date -u +%Y-%m-%d) stress runs: commit $commit, $cores cores, $cores CPU burners"
echo
echo "Command: \`scripts/stress-tests.sh $runs\`. Load is /proc/loadavg (1-minute average) at the"
echo "start and end of each run, burners included; other users of the machine add to it."
echo
echo "| run | wall time | result | load at start | load at end |"
echo "| --- | --- | --- | --- | --- |"
failed=0
for run in $(seq "$runs"); do
  load_start=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s)
  set +e
  # shellcheck disable=SC2086
  .venv/bin/pytest -q -p no:cacheprovider --durations=15 ${PYTEST_ARGS:-} >"$work/run$run.log" 2>&1
  code=$?
  set -e
  seconds=$(($(date +%s) - start))
  load_end=$(cut -d' ' -f1 /proc/loadavg)
  result=$(grep -E '(passed|failed|error).* in [0-9.]+s' "$work/run$run.log" | tail -1 | tr -d '=' | xargs)
  echo "| $run | ${seconds} s | ${result:-exit $code} | $load_start | $load_end |"
  [ "$code" = 0 ] || failed=1
  cp "$work/run$run.log" "$repo/.stress-run$run.log"
done
for run in $(seq "$runs"); do
  echo
  echo "Run $run, slowest 15:"
  echo
  echo '```'
  sed -n '/slowest 15 durations/,/^$/p' "$work/run$run.log" | sed '1d;/^$/d'
  echo '```'
done
exit "$failed"
