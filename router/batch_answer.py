"""A routed batch's answer: the cloud's rows merged into the local outputs, one RoutedItem per
row, and the routes tallied in the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from model_runtime.v2_json import InferResponse
from router.decision import Decision, Reason, Route
from router.metrics import RouterMetrics

__all__ = ["RoutedAnswer", "RoutedItem", "batch_answer", "count_model_routes", "merge_rows"]

log = logging.getLogger(__name__)

Array = npt.NDArray[np.generic]


@dataclass(frozen=True, slots=True)
class RoutedItem:
    route: Route
    reason: Reason
    confidence: float
    ticket: str | None
    provisional: bool
    answered_by: str
    """"edge" or "cloud": whose row is in the outputs."""


@dataclass(frozen=True, slots=True)
class RoutedAnswer:
    outputs: dict[str, Array]
    """The local outputs, with the rows of cloud-answered items replaced by the cloud's rows."""
    items: tuple[RoutedItem, ...]
    """One per item (row) of the batch, in order."""


def batch_answer(
    metrics: RouterMetrics,
    outputs: dict[str, Array],
    decisions: Sequence[Decision],
    confidence: Sequence[float],
    tickets: Mapping[int, str],
    answered: Collection[int] = (),
) -> RoutedAnswer:
    """The answer to a batch whose rows were decided as `decisions` (`answered`: the rows the
    cloud answered), each decision counted in `metrics`."""
    if len(decisions) == 1 and not tickets and not answered:
        # The most common answer, one item answered here, counted without a dict keyed by
        # Decision (whose dataclass hash runs in Python, twice per item below).
        d = decisions[0]
        metrics.route(d.route, d.reason, 1)
        item = RoutedItem(d.route, d.reason, confidence[0], None, d.provisional, "edge")
        return RoutedAnswer(outputs, (item,))
    counts: dict[Decision, int] = {}
    items = []
    for i, d in enumerate(decisions):
        counts[d] = counts.get(d, 0) + 1
        by = "cloud" if i in answered else "edge"
        items.append(
            RoutedItem(d.route, d.reason, confidence[i], tickets.get(i), d.provisional, by)
        )
    for d, k in counts.items():
        metrics.route(d.route, d.reason, k)
    return RoutedAnswer(outputs, tuple(items))


def count_model_routes(metrics: RouterMetrics, model: str, items: Sequence[RoutedItem]) -> None:
    """Count a batch's items by `model` and route taken."""
    if len(items) == 1:  # most requests: no tally to make
        metrics.model_route(model, items[0].route, 1)
        return
    routes: dict[Route, int] = {}
    for item in items:
        routes[item.route] = routes.get(item.route, 0) + 1
    for route, n in routes.items():
        metrics.model_route(model, route, n)


def merge_rows(
    local: Mapping[str, Array], response: InferResponse, rows: Sequence[int]
) -> dict[str, Array] | None:
    """The local outputs with `rows` replaced by the cloud's, for each output the cloud has
    with the same trailing shape (cast to the local dtype); None if none could be replaced."""
    merged = dict(local)
    replaced = 0
    for name, mine in local.items():
        theirs = response.outputs.get(name)
        if theirs is None or theirs.shape != (len(rows), *mine.shape[1:]):
            continue
        try:
            cast = theirs.astype(mine.dtype, copy=False)
        except (TypeError, ValueError):
            continue
        out = np.array(mine, copy=True)
        out[np.asarray(rows)] = cast
        merged[name] = out
        replaced += 1
    if not replaced:
        log.warning("the cloud's answer has none of the local outputs (%s)", ", ".join(local))
        return None
    return merged
