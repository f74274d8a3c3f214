#!/usr/bin/env bash
# The peer servers of benchmarks/rest_path.py, each in an environment of its own (their pins
# clash with ours): MLServer 1.7.1 and KServe 0.21, both with onnxruntime to serve the agent's
# own ONNX file. MLServer's newest uvloop crashes its worker at start-up here: pinned below 0.22.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv-bench-mlserver/bin/mlserver ]; then
  python3 -m venv .venv-bench-mlserver
  .venv-bench-mlserver/bin/pip install -q --disable-pip-version-check \
    'mlserver==1.7.1' 'uvloop<0.22' onnxruntime
fi
if [ ! -x .venv-kserve/bin/python ] || ! .venv-kserve/bin/python -c 'import kserve' 2>/dev/null; then
  python3 -m venv .venv-kserve
  .venv-kserve/bin/pip install -q --disable-pip-version-check 'kserve==0.21.*' onnxruntime
fi
# httptools, for the agent variant of benchmarks/peers/agent_httptools.py (neither daemon uses
# it: both name uvicorn's h11 protocol).
.venv/bin/pip install -q --disable-pip-version-check httptools
echo "peers ready: .venv-bench-mlserver, .venv-kserve, httptools in .venv"
