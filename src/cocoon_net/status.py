"""`cocoon-net status`: what pool.json says, the live leases, egress by each secondary ENI
(its table, next hop and rules, against the leases), and what the cloud reports.

It never takes the lock, so it answers while the daemon runs: live leases come from the
daemon's control socket, or, when no daemon answers, from the lease files (read only).
Cloud modules are imported only when the platform is a cloud and --no-cloud is not set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon_net import config, control, state
from cocoon_net.errors import CocoonError, StateError

if TYPE_CHECKING:
    from cocoon_net.dhcp.model import Lease
    from cocoon_net.node import egress

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
        (
            "VM policy",
            f"VM to VM {'allowed' if pool.guard.allow_vm_to_vm else 'dropped'}, "
            f"IPv6 {'allowed' if pool.guard.allow_ipv6 else 'dropped'}",
        ),
        ("VPC CIDRs", ", ".join(pool.vpc_cidrs) or "(none: all egress masqueraded)"),
        ("Lease file", pool.lease_file or "(default)"),
    ]


def stored_leases(path: Path, now: float) -> list[Lease]:
    """The active leases in the lease files, read only (no daemon writes them now)."""
    from cocoon_net.dhcp import store  # only when no daemon answers: it pulls in asyncio

    recovered = store.load(path)
    active = (lease for lease in recovered.leases.values() if lease.expires > now)
    return sorted(active, key=lambda lease: lease.ip)


def _live(paths: config.Paths, pool: state.PoolState) -> dict[str, Any]:
    """Leases from the running daemon, else from the lease files; `source` says which."""
    try:
        answer = control.request(paths.control_socket, {"cmd": "leases"})
        return {
            "source": "daemon",
            "pool": answer["pool"],
            "guard": answer.get("guard"),
            "leases": answer["leases"],
        }
    except StateError as exc:
        daemon_error = str(exc)
    path = paths.lease_file_for(pool.lease_file)
    try:
        found = stored_leases(path, time.time())
    except CocoonError as exc:
        return {"source": "none", "error": f"{daemon_error}; {exc}", "leases": []}
    leases = [
        {
            "ip": str(lease.ip),
            "mac": lease.mac,
            "hostname": lease.hostname,
            "expires": lease.expires,
            "route": None,
        }
        for lease in found
    ]
    return {"source": f"{path} (daemon not running)", "leases": leases}


def _lease_lines(live: dict[str, Any]) -> list[str]:
    counts = live.get("pool")
    lines = []
    if counts:
        lines.append(
            f"{'Pool:':12}{counts['size']} addresses: {counts['leased']} leased, "
            f"{counts['offered']} offered, {counts['quarantined']} quarantined, "
            f"{counts['free']} free"
        )
    lines.append(f"{'Guard:':12}{_guard_line(live.get('guard'))}")
    lines.append(f"{'Leases:':12}{len(live['leases'])} active (from {live['source']})")
    if live.get("error"):
        lines.append(f"{'':12}unavailable: {live['error']}")
    if live["leases"]:
        now = time.time()
        lines.append(f"  {'IP':15} {'MAC':17} {'EXPIRES IN':>10}  {'ROUTE':5}  HOSTNAME")
        for lease in live["leases"]:
            route = {True: "yes", False: "NO", None: "?"}[lease["route"]]
            left = _duration(lease["expires"] - now)
            lines.append(
                f"  {lease['ip']:15} {lease['mac']:17} {left:>10}  {route:5}  {lease['hostname']}"
            )
    return lines


def _egress(pool: state.PoolState, live: dict[str, Any]) -> egress.Report | str:
    """Each secondary ENI's egress against the live leases, or why it cannot be read."""
    # Most nodes have no secondary ENI: they do not pay for importing netlink code.
    from cocoon_net.node import egress

    try:
        return egress.report(pool, (IPv4Address(row["ip"]) for row in live["leases"]))
    except CocoonError as exc:
        return str(exc)


def _egress_lines(report: egress.Report | str | None) -> list[str]:
    if isinstance(report, str):
        return [f"{'Egress:':12}unavailable ({report})"]
    if report is None or not report.enis:
        return [f"{'Egress:':12}main table (no secondary ENI)"]
    wanted = sum(r.rules_wanted for r in report.enis) + 1  # and the VM subnet's
    present = sum(r.rules_present for r in report.enis) + 1 - len(report.missing)
    lines = [f"{'Egress:':12}{len(report.enis)} ENIs, {present} of {wanted} rules present"]
    lines += [f"  missing rule: {rule.spec()}" for rule in report.missing]
    for r in report.enis:
        hop = f"gateway {r.gateway} at {r.gateway_mac}" if r.gateway_mac else "next hop MISSING"
        table = f"table {r.table}" + ("" if r.table_ok else " MISSING")
        line = f"  {r.ifname:10}{table}, via {r.next_hop} ({hop}), "
        line += f"rules {r.rules_present} of {r.rules_wanted}"
        lines.append(line)
        lines += [f"    missing rule: {rule.spec()}" for rule in r.missing]
    return lines


def _guard_line(guard: dict[str, Any] | None) -> str:
    if guard is None:
        return "unknown (daemon not running)"
    if guard["state"] != "on":
        return "OFF (--no-guard): any VM may send from any address"
    return f"on: {guard['guarded']} VMs guarded on {guard['ports']} bridge ports"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def show_status(paths: config.Paths, *, as_json: bool, ask_cloud: bool) -> list[str]:
    pool = state.load(paths.pool_file)
    rows = _pool_rows(pool)
    live = _live(paths, pool)
    report = _egress(pool, live) if pool.cloud.get("enis") else None
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
            "leases": live,
        }
        if isinstance(report, str):
            doc["egressError"] = report
        else:
            doc["egress"] = {"enis": [], "missingRules": []} if report is None else report.to_json()
        if cloud_error:
            doc["cloudError"] = cloud_error
        return [json.dumps(doc, indent=2)]
    lines = [f"{label + ':':12}{value}" for label, value in rows + cloud_rows]
    if cloud_error:
        lines.append(f"{'Cloud:':12}unavailable ({cloud_error})")
    return lines + _egress_lines(report) + _lease_lines(live)
