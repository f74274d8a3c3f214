"""`edge-agent` on asyncio's own event loop instead of uvloop, for benchmarks/peers.py only: the
measurement behind the choice of uvloop.

    .venv/bin/python benchmarks/peers/agent_asyncio.py serve [edge-agent serve's flags]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import edge_agent.app
from edge_agent.cli import main

edge_agent.app.uvloop.run = asyncio.run  # type: ignore[assignment]

if __name__ == "__main__":
    main()
