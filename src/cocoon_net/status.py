"""`cocoon-net status`: what pool.json says, what the host has, and what the cloud reports.

It reads files and asks the kernel; it never takes the lock, so it answers while the daemon
runs. Cloud modules are imported only when the platform is a cloud and --no-cloud is not set.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from cocoon_net import config, state
from cocoon_net.errors import CocoonError

log = logging.getLogger("cocoon_net.status")


def _pool_rows(pool: state.PoolState) -> list[tuple[str, str]]:
    return [
        ("Platform", pool.platform),
        ("Node", pool.node_name),
        ("Subnet", pool.subnet),
        ("Gateway", pool.gateway),
        ("IPs", str(len(pool.ips))),
        ("Updated", pool.updated_at[:19] + "Z" if pool.updated_at else ""),
        ("Bridge", pool.bridge),
        ("MTU", str(pool.mtu) if pool.mtu else "primary NIC's"),
        ("Iptables", "managed" if pool.manage_iptables else "left alone"),
        ("VPC CIDRs", ", ".join(pool.vpc_cidrs) or "(none: all egress masqueraded)"),
        ("Lease file", pool.lease_file or "(default)"),
    ]


def show_status(paths: config.Paths, *, as_json: bool, ask_cloud: bool) -> list[str]:
    pool = state.load(paths.pool_file)
    rows = _pool_rows(pool)
    cloud_rows: list[tuple[str, str]] = []
    cloud_error = ""
    if ask_cloud and pool.platform not in ("", "static"):
        from cocoon_net.platform import get_platform

        try:
            platform = get_platform(pool.platform, os.environ)
            cloud_rows = [(s.label, s.value) for s in platform.status(pool)]
        except CocoonError as exc:
            cloud_error = str(exc)
            log.warning("platform status unavailable: %s", exc)
    if as_json:
        doc: dict[str, Any] = {
            "pool": pool.to_json(),
            "poolFile": str(paths.pool_file),
            "cloud": dict(cloud_rows),
        }
        if cloud_error:
            doc["cloudError"] = cloud_error
        return [json.dumps(doc, indent=2)]
    lines = [f"{label + ':':12}{value}" for label, value in rows + cloud_rows]
    if cloud_error:
        lines.append(f"{'Cloud:':12}unavailable ({cloud_error})")
    return lines
