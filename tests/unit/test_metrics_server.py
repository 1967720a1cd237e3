"""The metrics endpoint starts without asking DNS anything."""

from __future__ import annotations

import socket
import urllib.request
from ipaddress import IPv4Network

import pytest

from cocoon_net.metrics import Metrics, MetricsServer, PoolCounts


def test_binding_does_not_look_up_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # http.server's own bind asks getfqdn(), which waits out the resolver's timeouts on a
    # node whose DNS does not answer: the daemon's start would wait with it.
    def no_dns(name: str = "") -> str:
        raise AssertionError(f"getfqdn({name!r}) called")

    monkeypatch.setattr(socket, "getfqdn", no_dns)
    metrics = Metrics(lambda: PoolCounts(3, 2, 1, 0, 0))
    server = MetricsServer(metrics, "127.0.0.1:0", IPv4Network("172.20.100.0/24"))
    server.start()
    try:
        port = server.address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            body = answer.read().decode()
        assert "cocoon_net_dhcp_pool_available 2.0" in body
    finally:
        server.stop()
