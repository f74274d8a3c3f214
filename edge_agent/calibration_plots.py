"""The PNG plots of `edge-agent calibrate --report`: reliability, risk-coverage and PGR curves.

matplotlib is imported only here, and only when a report is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent.calibration import Choice, Evaluation

__all__ = ["write_plots"]


def write_plots(directory: Path, ev: Evaluation, choice: Choice) -> list[Path]:
    """Reliability diagram, risk-coverage curves and PGR curve of the test part, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    def save(fig: Any, name: str) -> Path:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        return directory / name

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
    panels = (
        (ev.reliability_before, ev.ece_before, "before scaling"),
        (ev.reliability_after, ev.ece_after, f"after scaling, T = {choice.temperature:.3f}"),
    )
    for ax, (bins, ece, title) in zip(axes, panels, strict=True):
        filled = bins.counts > 0
        step = bins.edges[1] - bins.edges[0]
        ax.bar(
            bins.edges[:-1][filled],
            bins.accuracy[filled],
            width=step,
            align="edge",
            edgecolor="black",
            label="accuracy in bin",
        )
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.set(
            title=f"{title} (ECE {ece:.4f})",
            xlabel="confidence (max probability)",
            xlim=(0, 1),
            ylim=(0, 1),
        )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    paths = [save(fig, "reliability.png")]

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method, rc in ev.risk_coverage.items():
        ax.plot(
            rc.coverage,
            rc.risk,
            lw=2.5 if method is choice.method else 1.0,
            label=f"{method.value} (AURC {rc.aurc:.4f})",
        )
    ax.set(
        title="risk-coverage, test part",
        xlabel="coverage (share answered on the edge)",
        ylabel="risk (error rate of the answered)",
        xlim=(0, 1),
    )
    ax.legend()
    paths.append(save(fig, "risk_coverage.png"))

    if ev.pgr is not None:
        curve = ev.curve
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        ax.plot(curve.share, curve.pgr, label=f"{choice.method.value} (APGR {ev.apgr:.3f})")
        ax.plot([0, 1], [0, 1], "k--", label="random routing (APGR 0.5)")
        ax.plot(
            [ev.escalation_rate],
            [ev.pgr],
            "o",
            color="red",
            label=f"chosen: {ev.escalation_rate:.1%} to the cloud, PGR {ev.pgr:.3f}",
        )
        ax.set(
            title="performance gap recovered, test part",
            xlabel="share of calls to the cloud",
            ylabel="PGR",
            xlim=(0, 1),
        )
        ax.legend(loc="lower right")
        paths.append(save(fig, "pgr.png"))
    return paths
