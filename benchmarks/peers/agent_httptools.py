"""`edge-agent` with its REST API on uvicorn's httptools protocol instead of h11, for
benchmarks/rest_path.py only: the measurement behind the choice of h11 (httptools is faster, but
buffers request heads of any size). Needs httptools in the environment (benchmarks/peers/setup.sh).

    .venv/bin/python benchmarks/peers/agent_httptools.py serve [edge-agent serve's flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

import edge_agent.rest.server
from edge_agent.cli import main

edge_agent.rest.server._NamingH11Protocol = HttpToolsProtocol  # type: ignore[misc]

if __name__ == "__main__":
    main()
