"""Counters and histograms for the per-request path, updated from the event loop's thread only.

prometheus_client's own metrics take a lock and run several Python calls per update (a
histogram: two locked adds and a linear bucket search), ten updates per answered request in
the agent. These keep plain numbers instead, which is safe because one thread writes them;
a scrape, on the exporter's thread, reads a copy and shows them in the same exposition.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["CounterChild", "HistogramChild", "LoopCounter", "LoopHistogram"]


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.total += amount
        if amount == amount:  # NaN falls in no bucket, as in prometheus_client
            self.counts[bisect_left(self.bounds, amount)] += 1


class _Labelled(Collector):
    """The children by label values, and their registration as one collector."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def _child(self, values: tuple[str, ...]) -> object:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> object:
        raise NotImplementedError

    def _snapshot(self) -> list[tuple[tuple[str, ...], object]]:
        # A copy taken in one step: the loop may add a child while the exporter iterates.
        return list(self._children.items())

    def describe(self) -> Iterable[Metric]:
        # The names without the samples, so that the registry refuses a duplicate name.
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LoopCounter(_Labelled):
    """A labelled counter, exposed as `<name>_total`, bumped from one thread only."""

    def labels(self, *values: str) -> CounterChild:
        child = self._child(values)
        assert isinstance(child, CounterChild)
        return child

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._snapshot():
            assert isinstance(child, CounterChild)
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram(_Labelled):
    """A labelled histogram with fixed bucket bounds, observed from one thread only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        *,
        buckets: Sequence[float],
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError(f"{name}: give at least one finite bucket bound")
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HistogramChild:
        child = self._child(values)
        assert isinstance(child, HistogramChild)
        return child

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        edges = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for values, child in self._snapshot():
            assert isinstance(child, HistogramChild)
            counts, total = list(child.counts), child.total
            cumulative, running = [], 0
            for edge, n in zip(edges, counts, strict=True):
                running += n
                cumulative.append((edge, float(running)))
            family.add_metric(list(values), cumulative, total)
        yield family
