"""How sure a classifier is of each item: temperature scaling, then one of three scores.

Every score is in [0, 1], higher meaning surer, so one threshold rule serves all methods.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt

__all__ = [
    "ConfidenceMethod",
    "OutputKind",
    "confidence",
    "margin",
    "max_probability",
    "normalized_entropy",
    "scaled_probabilities",
]

FloatArray = npt.NDArray[np.float64]


class OutputKind(StrEnum):
    PROBABILITIES = "probabilities"
    LOGITS = "logits"


class ConfidenceMethod(StrEnum):
    MAX_PROBABILITY = "max_probability"
    MARGIN = "margin"
    ENTROPY = "entropy"


def _softmax(z: FloatArray) -> FloatArray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


def scaled_probabilities(
    scores: npt.ArrayLike, kind: OutputKind, temperature: float = 1.0
) -> FloatArray:
    """Class probabilities after temperature scaling, shape (N, K).

    Logits are divided by T before the softmax (Guo et al. 2017, "On Calibration of Modern
    Neural Networks"). Probabilities are scaled the same way through their logs, since
    softmax(log p / T) is what the logits would have given.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[np.newaxis, :]
    if kind is OutputKind.PROBABILITIES:
        if temperature == 1.0:
            # The model's own probabilities, taken as they are: renormalising them on every
            # request would cost more than the rest of the confidence maths.
            return s
        # A class given probability 0 stays at 0; the floor only keeps log() finite.
        s = np.log(np.clip(s, 1e-12, None))
    return _softmax(s / temperature)


def max_probability(p: FloatArray) -> FloatArray:
    return np.asarray(p.max(axis=-1))


def margin(p: FloatArray) -> FloatArray:
    """Top probability minus the runner-up."""
    if p.shape[-1] < 2:
        return np.ones(p.shape[:-1])
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    return np.asarray(top2[..., 1] - top2[..., 0])


def normalized_entropy(p: FloatArray) -> FloatArray:
    """1 - H(p) / ln K: 1 for a one-hot answer, 0 for a uniform one."""
    k = p.shape[-1]
    if k < 2:
        return np.ones(p.shape[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return np.asarray(1.0 - h / np.log(k))


_METHODS = {
    ConfidenceMethod.MAX_PROBABILITY: max_probability,
    ConfidenceMethod.MARGIN: margin,
    ConfidenceMethod.ENTROPY: normalized_entropy,
}


def confidence(
    scores: npt.ArrayLike,
    kind: OutputKind,
    method: ConfidenceMethod,
    temperature: float = 1.0,
) -> FloatArray:
    """Per-item confidence, shape (N,), from a model's probabilities or logits."""
    return _METHODS[method](scaled_probabilities(scores, kind, temperature))
