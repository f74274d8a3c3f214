"""The calibration maths against values worked out by hand on inputs small enough to check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.calibration import (
    CalibrationError,
    Target,
    apgr,
    choose,
    cpt,
    evaluate,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    pgr_curve,
    reliability_bins,
    risk_coverage,
    stratified_split,
    threshold_for_accuracy,
    threshold_for_escalation,
    threshold_for_pgr,
)
from model_runtime.confidence import ConfidenceMethod, OutputKind, scaled_probabilities

# --- ECE ---------------------------------------------------------------------------------------


def test_ece_by_hand() -> None:
    # 15 bins of width 1/15: 0.95 falls in bin 14, 0.55 in bin 8, 0.25 in bin 3.
    # bin 14: acc 1/2 vs conf 0.95 -> 0.45, weight 2/5; bin 8: acc 1 vs 0.55 -> 0.45, weight
    # 2/5; bin 3: acc 0 vs 0.25 -> 0.25, weight 1/5. ECE = 0.18 + 0.18 + 0.05 = 0.41.
    conf = [0.95, 0.95, 0.55, 0.55, 0.25]
    correct = [True, False, True, True, False]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.41)


def test_ece_is_zero_when_accuracy_matches_confidence_in_every_bin() -> None:
    conf = [0.8] * 5 + [0.6] * 5
    correct = [True, True, True, True, False, True, True, True, False, False]
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0)


def test_bins_are_closed_on_the_right() -> None:
    # (m-1)/M < conf <= m/M: exactly 1/15 is bin 0, just above it bin 1; 0 joins bin 0, 1 bin 14.
    bins = reliability_bins([0.0, 1 / 15, 1 / 15 + 1e-9, 1.0], [True, True, False, True])
    assert bins.counts[0] == 2
    assert bins.counts[1] == 1
    assert bins.counts[14] == 1
    assert bins.accuracy[1] == 0.0
    assert np.isnan(bins.accuracy[5])  # an empty bin has no accuracy
    assert bins.counts.sum() == 4


# --- risk-coverage and AURC ----------------------------------------------------------------------


def test_aurc_by_hand() -> None:
    # Most confident first: right, wrong, right, wrong. Risk at coverage 1/4..4/4:
    # 0/1, 1/2, 1/3, 2/4; AURC is their mean = (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3.
    rc = risk_coverage([0.9, 0.8, 0.7, 0.6], [True, False, True, False])
    assert rc.coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert rc.risk == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert rc.aurc == pytest.approx(1 / 3)


def test_aurc_rewards_ranking_errors_last() -> None:
    correct = [True, True, False, False]
    good = risk_coverage([0.9, 0.8, 0.2, 0.1], correct).aurc
    bad = risk_coverage([0.1, 0.2, 0.8, 0.9], correct).aurc
    # good: risks 0, 0, 1/3, 1/2; bad: 1, 1, 2/3, 1/2.
    assert good == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert bad == pytest.approx((1 + 1 + 2 / 3 + 1 / 2) / 4)


def test_ties_count_as_the_average_over_their_orders() -> None:
    # 0.9 is right; the two items at 0.5 (one right, one wrong) count half an error each:
    # risks 0, 0.5/2, 1/3 -> AURC (0 + 1/4 + 1/3) / 3, whatever order the input lists them in.
    a = risk_coverage([0.9, 0.5, 0.5], [True, True, False])
    b = risk_coverage([0.5, 0.5, 0.9], [False, True, True])
    assert a.risk == pytest.approx([0.0, 0.25, 1 / 3])
    assert a.aurc == pytest.approx(b.aurc) == pytest.approx((1 / 4 + 1 / 3) / 3)


# --- PGR, APGR, CPT ------------------------------------------------------------------------------


def test_pgr_curve_by_hand() -> None:
    # Least confident first. Edge right on items 2 and 3 (acc 0.5), cloud right on 0, 1, 2
    # (acc 0.75); gap 0.25. Escalating 0..4 items: hybrid acc 0.5, 0.75, 1.0, 1.0, 0.75,
    # so PGR 0, 1, 2, 2, 1 (above 1 where the cloud is wrong on what the edge kept).
    curve = pgr_curve([0.1, 0.2, 0.3, 0.4], [False, False, True, True], [True, True, True, False])
    assert curve.share.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.accuracy == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.75])
    assert curve.pgr == pytest.approx([0.0, 1.0, 2.0, 2.0, 1.0])
    # Trapezoids of width 1/4: (0+1)/2 + (1+2)/2 + (2+2)/2 + (2+1)/2 = 5.5 -> 1.375.
    assert apgr(curve) == pytest.approx(1.375)
    assert cpt(curve, 0.5) == 0.25
    assert cpt(curve, 1.0) == 0.25
    assert cpt(curve, 1.5) == 0.5
    with pytest.raises(CalibrationError):
        cpt(curve, 2.5)


def test_pgr_of_a_typical_router() -> None:
    # Five items; the edge is wrong on the two least confident, the cloud on none.
    # acc edge 0.6, cloud 1.0. PGR after 0..5 escalations: 0, 0.5, 1, 1, 1, 1.
    curve = pgr_curve([0.1, 0.2, 0.7, 0.8, 0.9], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1])
    assert curve.pgr == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    # Area: 0.2 * (0.25 + 0.75 + 1 + 1 + 1) = 0.8.
    assert apgr(curve) == pytest.approx(0.8)
    assert cpt(curve, 0.5) == pytest.approx(0.2)
    assert cpt(curve, 0.8) == pytest.approx(0.4)
    assert cpt(curve, 0.95) == pytest.approx(0.4)


def test_random_order_of_a_tie_gives_the_diagonal() -> None:
    # All confidences equal: no threshold can pick, so the expected PGR is the share itself.
    curve = pgr_curve([0.5] * 4, [0, 1, 1, 0], [1, 1, 1, 1])
    assert curve.pgr == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert apgr(curve) == pytest.approx(0.5)


def test_pgr_is_undefined_when_the_cloud_is_no_better() -> None:
    curve = pgr_curve([0.1, 0.9], [1, 0], [0, 1])
    with pytest.raises(CalibrationError, match="not above"):
        _ = curve.pgr


# --- temperature -------------------------------------------------------------------------------


def _synthetic(kind: OutputKind) -> tuple[np.ndarray, np.ndarray]:
    """Logits of 4 classes and labels drawn from softmax(logits / 2): over-confident by 2x."""
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(400, 4))
    p = scaled_probabilities(logits, OutputKind.LOGITS, 2.0)
    labels = np.array([rng.choice(4, p=row) for row in p])
    scores = (
        logits if kind is OutputKind.LOGITS else scaled_probabilities(logits, OutputKind.LOGITS)
    )
    return scores, labels


@pytest.mark.parametrize("kind", list(OutputKind))
def test_temperature_fit_matches_a_brute_force_search(kind: OutputKind) -> None:
    scores, labels = _synthetic(kind)
    fitted = fit_temperature(scores, labels, kind)
    grid = np.exp(np.linspace(math.log(0.05), math.log(20.0), 4001))
    nll = np.array([negative_log_likelihood(scores, labels, kind, t) for t in grid])
    best = grid[nll.argmin()]
    step = math.log(grid[1] / grid[0])
    assert abs(math.log(fitted) - math.log(best)) <= step
    assert negative_log_likelihood(scores, labels, kind, fitted) <= nll.min() + 1e-9
    assert 1.5 < fitted < 2.7  # and it finds the temperature the labels were drawn with


def test_scaling_improves_ece_of_an_overconfident_model() -> None:
    scores, labels = _synthetic(OutputKind.LOGITS)
    t = fit_temperature(scores, labels, OutputKind.LOGITS)
    before = scaled_probabilities(scores, OutputKind.LOGITS)
    after = scaled_probabilities(scores, OutputKind.LOGITS, t)
    correct = before.argmax(axis=1) == labels
    assert expected_calibration_error(after.max(axis=1), correct) < 0.5 * (
        expected_calibration_error(before.max(axis=1), correct)
    )


# --- thresholds --------------------------------------------------------------------------------

CONF = [0.9, 0.1, 0.5, 0.3, 1.0, 0.7, 0.2, 0.8, 0.4, 0.6]


def test_threshold_for_escalation_is_the_quantile() -> None:
    # 20% of 10 is 2 items: 0.1 and 0.2, so the cut is midway between 0.2 and 0.3.
    t = threshold_for_escalation(CONF, 0.2)
    assert t == pytest.approx(0.25)
    assert (np.array(CONF) < t).sum() == 2
    assert threshold_for_escalation(CONF, 0.0) == 0.0  # the config's "never escalate"
    # A threshold is at most 1, so an item of confidence 1 stays on the edge.
    assert (np.array(CONF) < threshold_for_escalation(CONF, 1.0)).sum() == 9
    below_one = [c * 0.99 for c in CONF]
    assert (np.array(below_one) < threshold_for_escalation(below_one, 1.0)).all()


def test_threshold_for_escalation_cannot_split_ties() -> None:
    # Eight equal values: the cuts possible escalate 0, 1 or 9 of 10 items; 2 is nearest 1.
    conf = [0.1] + [0.5] * 8 + [0.9]
    t = threshold_for_escalation(conf, 0.2)
    assert (np.array(conf) < t).sum() == 1


def test_threshold_for_accuracy_and_pgr_by_hand() -> None:
    conf = [0.1, 0.2, 0.3, 0.4]
    edge, cloud = [0, 0, 1, 1], [1, 1, 1, 0]
    # Hybrid accuracy 0.5, 0.75, 1.0, 1.0, 0.75 after 0..4 escalations (see the PGR test).
    assert threshold_for_accuracy(conf, edge, cloud, 0.75) == pytest.approx(0.15)
    assert threshold_for_accuracy(conf, edge, cloud, 0.9) == pytest.approx(0.25)
    assert threshold_for_accuracy(conf, edge, cloud, 0.5) == 0.0
    assert threshold_for_pgr(conf, edge, cloud, 1.0) == pytest.approx(0.15)
    assert threshold_for_pgr(conf, edge, cloud, 1.5) == pytest.approx(0.25)
    with pytest.raises(CalibrationError, match="out of reach"):
        threshold_for_accuracy(conf, edge, cloud, 1.01)


# --- the procedure -----------------------------------------------------------------------------


def test_stratified_split_is_seeded_disjoint_and_per_class() -> None:
    y = np.array([0] * 10 + [1] * 30 + [2] * 4)
    cal, test = stratified_split(y, 0.5, seed=3)
    assert sorted([*cal, *test]) == list(range(len(y)))
    assert np.bincount(y[cal]).tolist() == [5, 15, 2]
    again, _ = stratified_split(y, 0.5, seed=3)
    other, _ = stratified_split(y, 0.5, seed=4)
    assert again.tolist() == cal.tolist()
    assert other.tolist() != cal.tolist()


def test_choose_then_evaluate_on_synthetic_data() -> None:
    scores, labels = _synthetic(OutputKind.LOGITS)
    cloud_correct = np.ones(len(labels), dtype=bool)
    choice = choose(
        scores[:200],
        labels[:200],
        cloud_correct[:200],
        OutputKind.LOGITS,
        Target("escalation", 0.3),
    )
    assert choice.aurc[choice.method] == min(choice.aurc.values())
    assert set(choice.aurc) == set(ConfidenceMethod)
    ev = evaluate(scores[200:], labels[200:], cloud_correct[200:], OutputKind.LOGITS, choice)
    assert abs(ev.escalation_rate - 0.3) < 0.1
    # A perfect cloud: the hybrid is right on every escalated item and the edge's own elsewhere.
    assert ev.curve.accuracy_cloud == 1.0
    assert ev.curve.accuracy_edge < ev.accuracy_hybrid < 1.0
    assert ev.pgr == pytest.approx(
        (ev.accuracy_hybrid - ev.curve.accuracy_edge) / (1.0 - ev.curve.accuracy_edge)
    )
    summary = ev.summary()
    assert set(summary["cpt"]) == {"50%", "80%", "95%"}
    assert summary["ece_after"] < summary["ece_before"]
