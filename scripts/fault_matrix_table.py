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
from typing import Any

WITHIN = 0.10


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(
        "| fault | starts | requests (unsure) | answered live / queued | live attempts, most | "
        "deliveries, most | replays | breaker opened | model runs per item |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fault']} | {starts(r)} | {r['requests']} ({r['unsure']}) | "
            f"{r['unsure'] - r['queued']} / {r['queued']} | {r['max_live_attempts']} | "
            f"{r['max_drain_attempts']} | {r['replays']} | "
            f"{'yes' if r['breaker_opened'] else 'no'} | {r['model_runs'] / r['unsure']:.0f} |"
        )
    # Reports from before the Router's own time and the CPU meters were kept lack them.
    detailed = all("control_in_router_p50_ms" in r for r in rows)
    print()
    print(
        "| fault | starts | local p50 ms: fault / control (ratio) | controls before / after | "
        "answers: fault / control | "
        + (
            "of which in `Router.route`, p50 ms: fault / control | CPU s per s, Router's "
            "process: fault / control | gateway: fault / control | "
            if detailed
            else ""
        )
        + "proxy CPU s per s: fault |"
    )
    print("|---" * (9 if detailed else 6) + "|")
    ratios = []
    for r in rows:
        ratio = r["local_p50_ms"] / r["control_p50_ms"]
        if r["fault"] != "none":
            ratios.append(ratio)
        before, after = r["control_p50s_ms"]
        print(
            f"| {r['fault']} | {starts(r)} | "
            f"{r['local_p50_ms']:.3f} / {r['control_p50_ms']:.3f} ({ratio:.2f}) | "
            f"{before:.3f} / {after:.3f} | {r['local_answers']} / {r['control_answers']} | "
            + (
                f"{r['local_in_router_p50_ms']:.3f} / {r['control_in_router_p50_ms']:.3f} | "
                f"{share(r, 'router_cpu_s')} | {share(r, 'gateway_cpu_s')} | "
                if detailed
                else ""
            )
            + f"{r['used']['proxy_cpu_s'] / r['used']['seconds']:.2f} |"
        )
    within = sum(abs(x - 1) <= WITHIN for x in ratios)
    slower = sum(x > 1 + WITHIN for x in ratios)
    apart = sum(abs(a / b - 1) > WITHIN for a, b in (r["control_p50s_ms"] for r in rows))
    print()
    print(
        f"{within} of {len(ratios)} fault cells within {WITHIN:.0%} of their control "
        f"(ratios {min(ratios):.2f}-{max(ratios):.2f}); {slower} more than {WITHIN:.0%} slower. "
        f"A cell's two controls differ by more than {WITHIN:.0%} in {apart} of {len(rows)}."
    )


def starts(row: dict[str, Any]) -> str:
    return str(row["phase"]) if row["fault"] != "none" else "-"


def share(row: dict[str, Any], name: str) -> str:
    """CPU seconds per second of the fault round / of its controls (both together)."""
    fault = row["used"][name] / row["used"]["seconds"]
    control = sum(c[name] for c in row["control_used"]) / sum(
        c["seconds"] for c in row["control_used"]
    )
    return f"{fault:.2f} / {control:.2f}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
