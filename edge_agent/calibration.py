"""The maths of `edge-agent calibrate`: temperature fit, ECE, risk-coverage, PGR and thresholds.

Pure functions of numpy arrays (no I/O), each citing the paper it follows, so tests can check
them against hand-computed values and the command only reads, runs, chooses and reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from model_runtime.confidence import (
    ConfidenceMethod,
    OutputKind,
    confidence,
    scaled_probabilities,
)

__all__ = [
    "CalibrationError",
    "Choice",
    "Evaluation",
    "PgrCurve",
    "ReliabilityBins",
    "RiskCoverage",
    "Target",
    "apgr",
    "choose",
    "cpt",
    "evaluate",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "pgr_curve",
    "reliability_bins",
    "risk_coverage",
    "stratified_split",
    "threshold_for_accuracy",
    "threshold_for_escalation",
    "threshold_for_pgr",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]

ECE_BINS = 15
"""Guo et al. 2017 report ECE with 15 equal-width bins; so do we, to stay comparable."""
TEMPERATURE_BOUNDS = (0.05, 20.0)


class CalibrationError(ValueError):
    """A target that the calibration data cannot meet, or data on which a measure is undefined."""


# --- temperature scaling --------------------------------------------------------------------


def negative_log_likelihood(
    scores: npt.ArrayLike, labels: npt.ArrayLike, kind: OutputKind, temperature: float = 1.0
) -> float:
    """Mean -log p(true class) after temperature scaling."""
    p = scaled_probabilities(scores, kind, temperature)
    y = np.asarray(labels, dtype=np.int64)
    # A probability of exactly 0 for the true class would make the NLL infinite and the
    # optimiser blind; the floor matches the one in scaled_probabilities.
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_temperature(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    kind: OutputKind,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature T minimizing the NLL of the true labels (Guo et al. 2017, section 4.2).

    One scalar, so a bounded Brent search over log T (scipy's minimize_scalar) finds it;
    searching in log T treats "twice as hot" and "twice as cold" alike. T does not change
    which class wins, only how sure the model says it is.
    """
    # Imported here: scipy.optimize takes a third of a second, which `edge-agent --help`
    # should not pay.
    from scipy.optimize import minimize_scalar

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(scores, labels, kind, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(float(result.x)))


# --- calibration error ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReliabilityBins:
    """Per-bin counts, mean confidence and accuracy; empty bins hold 0 and NaN."""

    edges: FloatArray
    counts: IntArray
    confidence: FloatArray
    accuracy: FloatArray


def reliability_bins(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = ECE_BINS
) -> ReliabilityBins:
    """Equal-width bins B_m = ((m-1)/M, m/M] of confidence (Guo et al. 2017, section 2).

    The data of a reliability diagram: a calibrated model's accuracy in each bin equals its
    mean confidence there.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins as in the paper; a confidence of exactly 0 goes to the first bin.
    index = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / counts
        accuracy = np.bincount(index, weights=ok, minlength=n_bins) / counts
    return ReliabilityBins(edges, counts.astype(np.int64), mean_conf, accuracy)


def expected_calibration_error(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = ECE_BINS
) -> float:
    """ECE = sum_m |B_m|/n * |acc(B_m) - conf(B_m)| (Guo et al. 2017, eq. 3).

    `confidence` is the top-class probability, `correct` whether the top class was right.
    """
    bins = reliability_bins(confidence, correct, n_bins)
    n = int(bins.counts.sum())
    if n == 0:
        raise CalibrationError("ECE of no items is undefined")
    filled = bins.counts > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float((bins.counts[filled] * gaps).sum() / n)


# --- ranking: ties ---------------------------------------------------------------------------


def _tie_averaged(values: FloatArray, sorted_keys: FloatArray) -> FloatArray:
    """Replace each value by the mean over its run of equal keys (keys already sorted).

    Items with equal confidence cannot be told apart by a threshold, so any order among them
    is arbitrary. Averaging gives the expected curve over all such orders: deterministic, and
    exact wherever a threshold can actually cut.
    """
    if len(values) == 0:
        return values
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sums = np.add.reduceat(values, starts)
    sizes = np.diff(np.r_[starts, len(values)])
    return np.repeat(sums / sizes, sizes)


# --- selective classification -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RiskCoverage:
    """Risk (error rate of the answered items) at coverage k/n, k = 1..n."""

    coverage: FloatArray
    risk: FloatArray

    @property
    def aurc(self) -> float:
        """Area under the risk-coverage curve: the mean risk over the n coverage points."""
        return float(self.risk.mean())


def risk_coverage(confidence: npt.ArrayLike, correct: npt.ArrayLike) -> RiskCoverage:
    """The risk-coverage curve of answering the k most confident items, k = 1..n.

    Geifman & El-Yaniv 2017, "Selective Classification for Deep Neural Networks"; AURC as in
    Geifman, Uziel & El-Yaniv 2019, "Bias-Reduced Uncertainty Estimation for Deep Neural
    Classifiers": lower is better, and it compares confidence scores by how well they rank
    errors last, whatever their scale.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    errors = 1.0 - np.asarray(correct, dtype=np.float64)
    n = len(conf)
    if n == 0:
        raise CalibrationError("the risk-coverage curve of no items is undefined")
    order = np.argsort(-conf, kind="stable")
    e = _tie_averaged(errors[order], conf[order])
    k = np.arange(1, n + 1, dtype=np.float64)
    return RiskCoverage(coverage=k / n, risk=np.cumsum(e) / k)


# --- routing quality (RouteLLM) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgrCurve:
    """Hybrid accuracy and PGR when the k least confident items go to the cloud, k = 0..n."""

    share: FloatArray
    accuracy: FloatArray
    accuracy_edge: float
    accuracy_cloud: float

    @property
    def gap(self) -> float:
        return self.accuracy_cloud - self.accuracy_edge

    @property
    def pgr(self) -> FloatArray:
        """(acc_hybrid - acc_edge) / (acc_cloud - acc_edge); undefined unless the cloud is better."""
        if self.gap <= 0:
            raise CalibrationError(
                f"PGR is undefined: the cloud's accuracy ({self.accuracy_cloud:.4f}) is not "
                f"above the edge's ({self.accuracy_edge:.4f})"
            )
        return (self.accuracy - self.accuracy_edge) / self.gap


def pgr_curve(
    confidence: npt.ArrayLike, edge_correct: npt.ArrayLike, cloud_correct: npt.ArrayLike
) -> PgrCurve:
    """Route the least confident items first; Ong et al. 2024, "RouteLLM", section 3.

    PGR(router) = (r(router) - r(weak)) / (r(strong) - r(weak)), plotted against the share of
    calls made to the strong (cloud) model. Ties in confidence are averaged (see _tie_averaged).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    edge = np.asarray(edge_correct, dtype=np.float64)
    cloud = np.asarray(cloud_correct, dtype=np.float64)
    n = len(conf)
    if n == 0:
        raise CalibrationError("the PGR curve of no items is undefined")
    order = np.argsort(conf, kind="stable")
    gain = _tie_averaged(cloud[order] - edge[order], conf[order])
    accuracy = (edge.sum() + np.r_[0.0, np.cumsum(gain)]) / n
    # The last point is the cloud alone; pin it against rounding so PGR(1) is exactly 1.
    accuracy[-1] = cloud.mean()
    return PgrCurve(
        share=np.arange(n + 1, dtype=np.float64) / n,
        accuracy=accuracy,
        accuracy_edge=float(edge.mean()),
        accuracy_cloud=float(cloud.mean()),
    )


def apgr(curve: PgrCurve) -> float:
    """Average PGR: the area under PGR against the share of cloud calls over [0, 1] (RouteLLM).

    RouteLLM approximates the integral on 10 call shares; we integrate the whole curve with
    the trapezoid rule. A router that picks items at random scores 0.5.
    """
    return float(np.trapezoid(curve.pgr, curve.share))


def cpt(curve: PgrCurve, target: float) -> float:
    """CPT(target): the smallest share of cloud calls whose PGR reaches `target` (RouteLLM)."""
    reached = np.flatnonzero(curve.pgr >= target - 1e-12)
    if len(reached) == 0:
        raise CalibrationError(f"PGR never reaches {target:g}")
    return float(curve.share[reached[0]])


# --- thresholds --------------------------------------------------------------------------------


def _cuts(confidence: FloatArray) -> tuple[FloatArray, IntArray]:
    """Sorted confidences and the escalation counts k a threshold can produce.

    The rule is "escalate when confidence < threshold", so a threshold can escalate exactly the
    k least confident items only where the k-th and (k+1)-th sorted values differ. Thresholds
    stop at 1, so items of confidence 1 are never escalated.
    """
    s = np.sort(np.asarray(confidence, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise CalibrationError("cannot choose a threshold from no items")
    inner = np.flatnonzero(s[1:] > s[:-1]) + 1
    last = [n] if s[-1] < 1.0 else []
    return s, np.r_[0, inner, last].astype(np.int64)


def _threshold_at(s: FloatArray, k: int) -> float:
    """A threshold escalating exactly the k lowest of the sorted values `s`."""
    if k == 0:
        return 0.0  # the config's "never escalate"
    if k == len(s):
        return float(np.nextafter(s[-1], np.inf))
    return float(np.clip((s[k - 1] + s[k]) / 2, 0.0, 1.0))


def threshold_for_escalation(confidence: npt.ArrayLike, rate: float) -> float:
    """The `rate`-quantile of confidence: a threshold sending that share of items to the cloud.

    Cut at k = round(rate * n), moved to the nearest count a threshold can produce when ties
    straddle it, midway between the k-th and (k+1)-th smallest values.
    """
    if not 0.0 <= rate <= 1.0:
        raise CalibrationError(f"target escalation {rate:g} is not in [0, 1]")
    s, cuts = _cuts(np.asarray(confidence, dtype=np.float64))
    k = int(cuts[np.argmin(np.abs(cuts - rate * len(s)))])
    return _threshold_at(s, k)


def threshold_for_accuracy(
    confidence: npt.ArrayLike,
    edge_correct: npt.ArrayLike,
    cloud_correct: npt.ArrayLike,
    accuracy: float,
) -> float:
    """The threshold of the smallest escalation share whose hybrid accuracy reaches `accuracy`."""
    curve = pgr_curve(confidence, edge_correct, cloud_correct)
    s, cuts = _cuts(np.asarray(confidence, dtype=np.float64))
    ok = cuts[curve.accuracy[cuts] >= accuracy - 1e-12]
    if len(ok) == 0:
        best = int(cuts[np.argmax(curve.accuracy[cuts])])
        raise CalibrationError(
            f"target accuracy {accuracy:g} is out of reach on the calibration part: the best "
            f"hybrid accuracy is {curve.accuracy[best]:.4f}, escalating {best / len(s):.1%}"
        )
    return _threshold_at(s, int(ok[0]))


def threshold_for_pgr(
    confidence: npt.ArrayLike,
    edge_correct: npt.ArrayLike,
    cloud_correct: npt.ArrayLike,
    target: float,
) -> float:
    """The threshold of the smallest escalation share whose PGR reaches `target`."""
    curve = pgr_curve(confidence, edge_correct, cloud_correct)
    s, cuts = _cuts(np.asarray(confidence, dtype=np.float64))
    pgr = curve.pgr
    ok = cuts[pgr[cuts] >= target - 1e-12]
    if len(ok) == 0:
        raise CalibrationError(
            f"target PGR {target:g} is out of reach on the calibration part: the best is "
            f"{pgr[cuts].max():.4f}"
        )
    return _threshold_at(s, int(ok[0]))


def stratified_split(
    y: npt.NDArray[np.int64], share: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices of the calibration and test parts, `share` of each class going to calibration.

    Stratified, so a rare class is not left out of either part by chance; seeded, so a report
    can be reproduced.
    """
    rng = np.random.default_rng(seed)
    calibration: list[npt.NDArray[np.int64]] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        calibration.append(members[: round(share * len(members))])
    mask = np.zeros(len(y), dtype=bool)
    mask[np.concatenate(calibration)] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


# --- the procedure: choose on one part, measure on another --------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """What the operator asks for: an escalation share, a hybrid accuracy or a PGR."""

    kind: Literal["escalation", "accuracy", "pgr"]
    value: float


@dataclass(frozen=True, slots=True)
class Choice:
    temperature: float
    method: ConfidenceMethod
    threshold: float
    aurc: dict[ConfidenceMethod, float]
    """AURC of each method on the part the choice was made on."""


def choose(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    cloud_correct: npt.ArrayLike,
    kind: OutputKind,
    target: Target,
) -> Choice:
    """Temperature by NLL, then the method of lowest AURC, then the threshold meeting `target`."""
    y = np.asarray(labels, dtype=np.int64)
    temperature = fit_temperature(scores, y, kind)
    edge_correct = scaled_probabilities(scores, kind, temperature).argmax(axis=1) == y
    by_method = {m: confidence(scores, kind, m, temperature) for m in ConfidenceMethod}
    aurc = {m: risk_coverage(c, edge_correct).aurc for m, c in by_method.items()}
    # min() keeps the first of equal AURCs, so a tie goes to the simplest method.
    method = min(ConfidenceMethod, key=lambda m: aurc[m])
    conf = by_method[method]
    if target.kind == "escalation":
        threshold = threshold_for_escalation(conf, target.value)
    elif target.kind == "accuracy":
        threshold = threshold_for_accuracy(conf, edge_correct, cloud_correct, target.value)
    else:
        threshold = threshold_for_pgr(conf, edge_correct, cloud_correct, target.value)
    return Choice(temperature, method, threshold, aurc)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Every figure of a report, and the curves behind the plots, on one part of the data."""

    reliability_before: ReliabilityBins
    reliability_after: ReliabilityBins
    ece_before: float
    ece_after: float
    risk_coverage: dict[ConfidenceMethod, RiskCoverage]
    escalation_rate: float
    accuracy_hybrid: float
    curve: PgrCurve
    pgr: float | None
    """None where PGR is undefined: the cloud is no more accurate than the edge."""
    apgr: float | None
    cpt: dict[float, float | None]

    def summary(self) -> dict[str, Any]:
        """The figures as JSON-ready values."""
        return {
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "aurc": {m.value: rc.aurc for m, rc in self.risk_coverage.items()},
            "escalation_rate": self.escalation_rate,
            "accuracy": {
                "edge": self.curve.accuracy_edge,
                "hybrid": self.accuracy_hybrid,
                "cloud": self.curve.accuracy_cloud,
            },
            "pgr": self.pgr,
            "apgr": self.apgr,
            "cpt": {f"{p:.0%}": v for p, v in self.cpt.items()},
        }


def evaluate(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    cloud_correct: npt.ArrayLike,
    kind: OutputKind,
    choice: Choice,
    cpt_targets: tuple[float, ...] = (0.5, 0.8, 0.95),
) -> Evaluation:
    """Measure a choice on data it never saw: calibration, ranking and routing quality."""
    y = np.asarray(labels, dtype=np.int64)
    cloud = np.asarray(cloud_correct, dtype=bool)
    before = scaled_probabilities(scores, kind, 1.0)
    after = scaled_probabilities(scores, kind, choice.temperature)
    edge_correct = after.argmax(axis=1) == y
    by_method = {m: confidence(scores, kind, m, choice.temperature) for m in ConfidenceMethod}
    escalated = by_method[choice.method] < choice.threshold
    accuracy_hybrid = float(np.where(escalated, cloud, edge_correct).mean())
    curve = pgr_curve(by_method[choice.method], edge_correct, cloud)
    defined = curve.gap > 0
    return Evaluation(
        reliability_before=reliability_bins(before.max(axis=1), before.argmax(axis=1) == y),
        reliability_after=reliability_bins(after.max(axis=1), edge_correct),
        ece_before=expected_calibration_error(before.max(axis=1), before.argmax(axis=1) == y),
        ece_after=expected_calibration_error(after.max(axis=1), edge_correct),
        risk_coverage={m: risk_coverage(c, edge_correct) for m, c in by_method.items()},
        escalation_rate=float(escalated.mean()),
        accuracy_hybrid=accuracy_hybrid,
        curve=curve,
        pgr=(accuracy_hybrid - curve.accuracy_edge) / curve.gap if defined else None,
        apgr=apgr(curve) if defined else None,
        cpt={p: cpt(curve, p) if defined else None for p in cpt_targets},
    )
