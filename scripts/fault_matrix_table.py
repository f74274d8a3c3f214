"""Print the fault matrix's figures (FAULT_MATRIX_REPORT of tests/integration/router/
test_fault_matrix.py) as the Markdown table of RELIABILITY.md, and how many cells kept their
local answers' p50 within 10 % of their own no-fault control's.

    FAULT_MATRIX_REQUESTS=100 FAULT_MATRIX_REPORT=/tmp/matrix.jsonl \\
        .venv/bin/pytest tests/integration/router/test_fault_matrix.py
    .venv/bin/python scripts/fault_matrix_table.py /tmp/matrix.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WITHIN = 0.10


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(
        "| fault | starts | requests (unsure) | answered live / queued | local p50 ms: "
        "fault / control (ratio) | local answers: fault / control | live attempts, most | "
        "deliveries, most | replays | breaker opened | model runs per item | "
        "proxy CPU, share of the round |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for r in rows:
        live = r["unsure"] - r["queued"]
        ratio = r["local_p50_ms"] / r["control_p50_ms"]
        if r["fault"] != "none":
            ratios.append(ratio)
        print(
            f"| {r['fault']} | {r['phase'] if r['fault'] != 'none' else '-'} | "
            f"{r['requests']} ({r['unsure']}) | {live} / {r['queued']} | "
            f"{r['local_p50_ms']:.3f} / {r['control_p50_ms']:.3f} ({ratio:.2f}) | "
            f"{r['local_answers']} / {r['control_answers']} | {r['max_live_attempts']} | "
            f"{r['max_drain_attempts']} | {r['replays']} | "
            f"{'yes' if r['breaker_opened'] else 'no'} | {r['model_runs'] / r['unsure']:.0f} | "
            f"{r['proxy_cpu_s'] / r['round_s']:.0%} |"
        )
    within = sum(abs(x - 1) <= WITHIN for x in ratios)
    slower = sum(x > 1 + WITHIN for x in ratios)
    print()
    print(
        f"{within} of {len(ratios)} fault cells within {WITHIN:.0%} of their control "
        f"(ratios {min(ratios):.2f}-{max(ratios):.2f}); {slower} more than {WITHIN:.0%} slower."
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
