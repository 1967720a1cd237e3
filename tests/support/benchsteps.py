"""Bench steps made to measure, for the unit tests of the bench's rules."""

from __future__ import annotations

from typing import Any

from bench.ladder import Step


def step(target: float, completed_share: float = 1.0, sent_share: float = 1.0) -> Step:
    """A step whose clients completed `completed_share` of the exchanges (the rest got no
    ACK), with DISCOVERs sent at `sent_share` of the target rate."""
    clients = int(target)
    completed = round(clients * completed_share)
    latency = {"count": completed, "avg_ms": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0}
    loadgen: dict[str, Any] = {
        "target_rate": target,
        "clients": clients,
        "completed": completed,
        "acks": completed,
        "goodput": target * completed_share * sent_share,
        "discover_rate": target * sent_share,
        "drops_pct": 100.0 * (1 - completed_share),
        "loadgen_socket_drops": 0,
        "late_pct": 0.0,
        "offer_latency": latency,
        "ack_latency": latency,
        "loadgen_cpu_seconds": 30e-6 * clients,
        "send_seconds": clients / target,
        "busy_seconds": clients / target,
        "achieved_rate": (completed - 1) * target / clients if completed > 1 else 0.0,
    }
    return Step(loadgen, 50.0, 1000, 1000, 0, 0.0, window_seconds=1.2)
