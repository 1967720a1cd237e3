"""The DHCP server's counters as Prometheus metrics: each event counted once, under its own
metric and labels, however often a label set repeats."""

from __future__ import annotations

from typing import Any

from cocoon_net.daemon import PromCounters
from cocoon_net.metrics import Metrics, PoolCounts


class CountingLabels:
    """A metric that counts how often a child is looked up by its label values."""

    def __init__(self, metric: Any) -> None:
        self.metric, self.lookups = metric, 0

    def labels(self, *values: str) -> Any:
        self.lookups += 1
        return self.metric.labels(*values)


def test_every_event_is_counted_under_its_own_metric_and_labels() -> None:
    metrics = Metrics(lambda: PoolCounts(3, 2, 1, 0, 0))
    packets = CountingLabels(metrics.packets)
    metrics.packets = packets  # type: ignore[assignment]
    counters = PromCounters(metrics)
    for _ in range(3):
        counters.packet("request", "ack")
    counters.packet("discover", "offer")
    counters.drop("ok")  # the same label value as a lease's, under another metric
    counters.lease(True)
    counters.lease(True)
    counters.lease(False)
    counters.route("add", True)
    counters.route("del", False)
    counters.read(3)
    counters.read(1)
    found = {
        (sample.name, tuple(sorted(sample.labels.values()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name.startswith("cocoon_net_") and sample.name.endswith("_total")
    }
    assert {key: value for key, value in found.items() if value} == {
        ("cocoon_net_dhcp_packets_total", ("ack", "request")): 3.0,
        ("cocoon_net_dhcp_packets_total", ("discover", "offer")): 1.0,
        ("cocoon_net_dhcp_drops_total", ("ok",)): 1.0,
        ("cocoon_net_dhcp_lease_total", ("ok",)): 2.0,
        ("cocoon_net_dhcp_lease_total", ("failed",)): 1.0,
        ("cocoon_net_route_operations_total", ("add", "ok")): 1.0,
        ("cocoon_net_route_operations_total", ("del", "failed")): 1.0,
        ("cocoon_net_dhcp_reads_total", ()): 2.0,
    }
    # labels() takes a lock and builds its key every time: once per label set is enough.
    assert packets.lookups == 2
