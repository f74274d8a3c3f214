#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine, then runs lint, type
# checks and the tests. Extra arguments go to pytest (e.g. scripts/test.sh -k gateway).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real third-party programs the integration tests start: redis-server for the gateway's shared
# idempotency store, Prometheus (and its promtool) for the metric, rule and scrape checks,
# Chromium for the kiosk page (Playwright drives Debian's build; it never downloads one).
# Installed when missing and we may; otherwise those tests skip and say so.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v promtool >/dev/null || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "not root: ${missing[*]} not installed; the tests that need them will be skipped" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

# MLServer, the third-party v2 server behind the gateway's upstream mode, lives in its own
# environment: its pins clash with ours, and its newest uvloop crashes at start-up here.
if [ ! -x .venv-mlserver/bin/mlserver ]; then
  python3 -m venv .venv-mlserver
  .venv-mlserver/bin/pip install -q --disable-pip-version-check \
    'mlserver==1.7.1' 'mlserver-sklearn==1.7.1' 'uvloop<0.22'
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
