"""The agent's links to the cloud: a live and a drain CloudClient, one pacer between them, and
the ConnectivityMonitor (with its circuit breaker) both report to.
"""

from __future__ import annotations

from router.breaker import CircuitBreaker
from router.budget import DataBudget, ProbeBudget
from router.clock import Clock
from router.cloud_client import CloudClient
from router.config import RouterConfig
from router.connectivity import ConnectivityMonitor
from router.metrics import CloudMeter
from router.pacing import RequestPacer
from router.retrying import LinkBackoff

__all__ = ["open_cloud"]


def open_cloud(
    config: RouterConfig, clock: Clock, meter: CloudMeter, budget: DataBudget, probes: ProbeBudget
) -> tuple[CloudClient, CloudClient, ConnectivityMonitor]:
    """The live and the drain CloudClients (one pool each, so escalations never queue behind
    deliveries; both reserve and settle their bytes in `budget`, and start calls at the pace of
    one RequestPacer) and the monitor both report to, with its breaker, probing as often as
    `probes` lets it."""
    assert config.cloud_url is not None
    assert config.device_key is not None
    tls = config.cloud_tls.context() if config.cloud_tls is not None else None
    pacer = RequestPacer(
        config.cloud_requests_per_s,
        config.cloud_burst,
        clock,
        recovery_s=config.cloud_rate_recovery_s,
        on_wait=meter.on_paced,
    )
    live, drain = (
        CloudClient(
            config.cloud_url,
            config.device_key,
            clock=clock,
            retry=retry,
            on_attempt=meter.on_attempt,
            budget=budget,
            pacer=pacer,
            compress=config.compress,
            probe_timeout_s=config.monitor.probe_timeout_s,
            max_connections=connections,
            tls=tls,
        )
        for retry, connections in (
            (config.live_retry, config.max_connections),
            # a connection per call in flight, or calls would queue in the pool, paid for
            (config.drain_retry, max(config.max_connections, config.drain_concurrency)),
        )
    )
    backoff = LinkBackoff(
        config.link_backoff_s, cap_s=max(config.link_backoff_cap_s, config.link_backoff_s)
    )
    breaker = CircuitBreaker(clock, failure_threshold=config.breaker_failures, cooldown=backoff)
    # Probes go through the live pool, keeping its connection warm for escalations.
    monitor = ConnectivityMonitor(
        live.check_ready,
        clock=clock,
        config=config.monitor,
        breaker=breaker,
        backoff=backoff,
        probe_wait=probes.wait_s,
    )
    live.observer = drain.observer = monitor
    return live, drain, monitor
