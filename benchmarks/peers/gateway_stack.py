"""`cloud-gateway` on another HTTP stack than the one it ships with, for benchmarks/gateway.py
only: the measurement behind the choice of parser and event loop (each parser with the
connection guard, model_runtime.connection_guard).

    .venv/bin/python benchmarks/peers/gateway_stack.py {h11,httptools} {asyncio,uvloop} serve [flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cloud_gateway.server
from cloud_gateway.cli import main

if __name__ == "__main__":
    cloud_gateway.server.HTTP_PARSER = sys.argv.pop(1)
    cloud_gateway.server.EVENT_LOOP = sys.argv.pop(1)
    main()
