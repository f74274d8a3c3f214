"""Confidence maths against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_runtime.confidence import (
    ConfidenceMethod,
    OutputKind,
    confidence,
    margin,
    max_probability,
    normalized_entropy,
    scaled_probabilities,
)


def test_max_probability_and_margin_by_hand() -> None:
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    np.testing.assert_allclose(max_probability(p), [0.7, 0.4])
    np.testing.assert_allclose(margin(p), [0.5, 0.05])


def test_normalized_entropy_by_hand() -> None:
    # H([0.5, 0.5, 0, 0]) = ln 2, K = 4: 1 - ln2 / ln4 = 0.5
    p = np.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_allclose(normalized_entropy(p), [0.5, 1.0, 0.0], atol=1e-12)


def test_softmax_of_logits_by_hand() -> None:
    # softmax([ln 3, 0]) = [3/4, 1/4]
    p = scaled_probabilities([[math.log(3.0), 0.0]], OutputKind.LOGITS)
    np.testing.assert_allclose(p, [[0.75, 0.25]])


def test_temperature_divides_logits() -> None:
    # logits [ln 9, 0] at T = 2 behave like [ln 3, 0]: [3/4, 1/4]
    p = scaled_probabilities([[math.log(9.0), 0.0]], OutputKind.LOGITS, temperature=2.0)
    np.testing.assert_allclose(p, [[0.75, 0.25]])


def test_temperature_on_probabilities_matches_logits() -> None:
    logits = np.array([[2.0, 0.5, -1.0]])
    probs = scaled_probabilities(logits, OutputKind.LOGITS)
    for t in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(
            scaled_probabilities(probs, OutputKind.PROBABILITIES, t),
            scaled_probabilities(logits, OutputKind.LOGITS, t),
        )


def test_higher_temperature_lowers_confidence() -> None:
    logits = [[3.0, 1.0, 0.0]]
    sure = confidence(logits, OutputKind.LOGITS, ConfidenceMethod.MAX_PROBABILITY, 0.5)
    unsure = confidence(logits, OutputKind.LOGITS, ConfidenceMethod.MAX_PROBABILITY, 2.0)
    assert sure[0] > unsure[0]


@pytest.mark.parametrize("method", list(ConfidenceMethod))
def test_every_method_is_in_unit_interval_per_item(method: ConfidenceMethod) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10)) * 4
    c = confidence(logits, OutputKind.LOGITS, method, 1.3)
    assert c.shape == (50,)
    assert np.all((c >= 0) & (c <= 1 + 1e-12))


def test_single_item_vector_is_one_row() -> None:
    c = confidence([0.9, 0.1], OutputKind.PROBABILITIES, ConfidenceMethod.MARGIN)
    np.testing.assert_allclose(c, [0.8])
