"""Loop metrics expose exactly what prometheus_client's own counters and histograms would."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from model_runtime.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_the_same_updates_give_the_same_samples() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    their_count = Counter("calls", "Calls.", ["method", "code"], registry=theirs)
    our_count = LoopCounter("calls", "Calls.", ["method", "code"], registry=ours)
    their_hist = Histogram("took_seconds", "Took.", ["model"], buckets=BUCKETS, registry=theirs)
    our_hist = LoopHistogram("took_seconds", "Took.", ["model"], registry=ours, buckets=BUCKETS)
    for method, code in [("Infer", "OK"), ("Infer", "OK"), ("Meta", "NOT_FOUND")]:
        their_count.labels(method, code).inc()
        our_count.labels(method, code).inc()
    their_count.labels("Infer", "OK").inc(3)
    our_count.labels("Infer", "OK").inc(3)
    for value in (0.0005, 0.001, 0.05, 0.5, 7.0, 0.1, math.nan):
        their_hist.labels("digits").observe(value)
        our_hist.labels("digits").observe(value)
    their_hist.labels("wine")  # a child made but never observed is shown, with zeros
    our_hist.labels("wine")

    theirs_now, ours_now = samples(theirs), samples(ours)
    # NaN sums are compared as NaN: neither library drops the observation from the sum.
    their_sum = theirs_now.pop(("took_seconds_sum", (("model", "digits"),)))
    our_sum = ours_now.pop(("took_seconds_sum", (("model", "digits"),)))
    assert math.isnan(their_sum)
    assert math.isnan(our_sum)
    assert ours_now == theirs_now
    text = generate_latest(ours).decode()
    assert 'took_seconds_bucket{le="0.001",model="digits"} 2.0' in text
    assert 'calls_total{code="OK",method="Infer"} 5.0' in text


def test_a_wrong_number_of_labels_and_a_taken_name_are_refused() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("calls", "Calls.", ["method"], registry=registry)
    with pytest.raises(ValueError, match="expected labels"):
        counter.labels("Infer", "OK")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("calls", "Again.", registry=registry)
