"""Print the fault matrix's figures (FAULT_MATRIX_REPORT of tests/integration/router/
test_fault_matrix.py) as the Markdown table of RELIABILITY.md.

    FAULT_MATRIX_REQUESTS=100 FAULT_MATRIX_REPORT=/tmp/matrix.jsonl \\
        .venv/bin/pytest tests/integration/router/test_fault_matrix.py
    .venv/bin/python scripts/fault_matrix_table.py /tmp/matrix.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = next(r["local_p50_ms"] for r in rows if r["fault"] == "none")
    print(
        "| fault | starts | requests (unsure) | answered live / queued | local p50 ms "
        "(/ no fault) | live attempts, most | deliveries, most | replays | breaker opened | "
        "model runs per item |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        live = r["unsure"] - r["queued"]
        p50 = r["local_p50_ms"]
        print(
            f"| {r['fault']} | {r['phase'] if r['fault'] != 'none' else '-'} | "
            f"{r['requests']} ({r['unsure']}) | {live} / {r['queued']} | "
            f"{p50:.3f} ({p50 / base:.2f}) | {r['max_live_attempts']} | "
            f"{r['max_drain_attempts']} | {r['replays']} | "
            f"{'yes' if r['breaker_opened'] else 'no'} | {r['model_runs'] / r['unsure']:.0f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
