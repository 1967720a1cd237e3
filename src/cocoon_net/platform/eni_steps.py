"""Steps every multi-ENI cloud (volcengine, aws) takes alike, each over the cloud's own view
of an ENI or a subnet: what pool.json recorded, what `status` prints, which link is the
primary NIC, how an attached ENI's link comes up, and how ENIs of ours are taken off the
instance and deleted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network
from typing import Any, Protocol, TypeVar

from cocoon_net import proc
from cocoon_net.errors import CloudError, CloudNotFound
from cocoon_net.node import nic
from cocoon_net.platform.base import StatusLine
from cocoon_net.platform.volc_api import PollPolicy, wait_for


class HasId(Protocol):
    @property
    def id(self) -> str: ...


E = TypeVar("E", bound=HasId)


def recorded_enis(cloud: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """pool.json's ENI records by ID (entries that are not records are skipped)."""
    return {str(e["id"]): dict(e) for e in cloud.get("enis") or () if isinstance(e, dict)}


def subnet_network(raw: Mapping[str, Any]) -> IPv4Network | None:
    """A subnet answer's IPv4 CIDR, or None when it has none we can read. Compared as
    networks, not strings: "172.20.100.0/24" is "172.20.100.5/24"."""
    try:
        return IPv4Network(str(raw.get("CidrBlock", "")), strict=False)
    except ValueError:
        return None


def subnet_status(
    subnet: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], state_key: str
) -> StatusLine:
    """The SubnetID line: the recorded subnet as the cloud describes it (`rows`, empty when
    it is gone), and whether init made it."""
    text = (
        f"{rows[0].get(state_key)}, {rows[0].get('AvailableIpAddressCount')} free"
        if rows
        else "missing"
    )
    owner = "created by cocoon-net" if subnet.get("created") else "pre-existing"
    return StatusLine("SubnetID", f"{subnet['id']} {subnet.get('cidr', '')} ({text}; {owner})")


def eni_status(eni_id: str, name: str, mac: str, status: str, held: str) -> StatusLine:
    """One ENI's line under "ENIs": its name, MAC, the OS link that has the MAC, its
    state and what it holds."""
    ifname = nic.link_by_mac(mac) or "-"
    return StatusLine(f"  {eni_id}", f"{name} mac {mac} if {ifname} {status} {held}")


def primary_nic(mac: str) -> str | None:
    """The link with the metadata's primary MAC, else the default route's device."""
    return (nic.link_by_mac(mac) if mac else None) or nic.primary_nic()


def link_up(mac: str, policy: PollPolicy) -> str:
    """The OS interface of an attached ENI, found by MAC once hot-plug made it appear."""
    name = wait_for(
        lambda: nic.link_by_mac(mac),
        lambda found: found is not None,
        what=f"network interface with MAC {mac} to appear",
        policy=policy,
    )
    assert name is not None
    proc.run(["ip", "link", "set", "dev", name, "up"])
    return name


def release(
    attached_to: str,
    instance_id: str,
    detach: Callable[[], object],
    delete: Callable[[], object],
) -> None:
    """Take an ENI of ours off this instance (the cloud's `detach`, which also waits until
    it is free) and delete it; never one attached to another instance."""
    if attached_to and attached_to != instance_id:
        raise CloudError(f"attached to another instance ({attached_to}); left alone")
    detach()
    with contextlib.suppress(CloudNotFound):  # an earlier attempt's answer was lost
        delete()


def remove_each(enis: Sequence[E], remove: Callable[[E], None]) -> list[str]:
    """remove() every ENI, all at once, one thread each; what failed, one entry per ENI."""
    failures: list[str] = []
    if not enis:
        return failures
    with ThreadPoolExecutor(max_workers=len(enis), thread_name_prefix="eni") as pool:
        futures = {eni.id: pool.submit(remove, eni) for eni in enis}
        for eni_id, future in futures.items():
            try:
                future.result()
            except CloudError as exc:
                failures.append(f"ENI {eni_id}: {exc}")
    return failures
