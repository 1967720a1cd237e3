"""Compute Engine v1 REST: the four calls GKE provisioning needs, and the rules around them.

    subnetworks.get / subnetworks.patch          the shared secondary range (regional operation)
    instances.get / instances.updateNetworkInterface   nic0's alias ranges (zonal operation)

Both mutations replace a whole list (secondaryIpRanges, aliasIpRanges) and carry the
fingerprint read with it, so they are read-modify-write: keep every entry we do not own,
and on a 412 (someone changed the list in between) read again and recompute. Every mutation
carries a fresh `requestId` (a UUID4) that the HTTP retries of that one request reuse, so a
retried PATCH whose first attempt did arrive is not applied twice. The operation each
mutation returns is waited on until DONE and its error surfaced.

The decisions (reuse, create or refuse the range; the new alias list) are pure functions over
the data read, tested on their own.
"""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from cocoon_net.errors import CloudConflict, CloudError, CloudNotFound, CloudTimeout, UsageError
from cocoon_net.platform.http import HttpClient, status_error

ENV_COMPUTE_URL = "COCOON_NET_GCE_COMPUTE_URL"
DEFAULT_COMPUTE_URL = "https://compute.googleapis.com/compute/v1"
RANGE_NAME = "cocoon-pods"  # the shared secondary range, one per subnetwork
NIC = "nic0"
FINGERPRINT_ATTEMPTS = 5  # read-modify-write rounds before a 412 is reported
# What the Compute calls need when they are refused (cocoon-net README prerequisites).
AUTH_HINT = (
    "the node's service account needs roles/compute.networkAdmin and the VM needs the "
    "'compute' or 'cloud-platform' access scope"
)

IN_USE = "IP_IN_USE_BY_ANOTHER_RESOURCE"  # an alias block another instance holds


class AddressInUse(CloudError):
    """The cloud refused an alias block because another instance holds it."""


_SUBNET_URL = re.compile(r"projects/([^/]+)/regions/([^/]+)/subnetworks/([^/?]+)")


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SubnetRef:
    """A subnetwork by its own project: under Shared VPC that is the host project."""

    project: str
    region: str
    name: str

    @classmethod
    def from_url(cls, url: str) -> SubnetRef:
        match = _SUBNET_URL.search(url)
        if not match:
            raise CloudError(f"unrecognised subnetwork reference {url!r} on {NIC}")
        return cls(*match.groups())

    @property
    def path(self) -> str:
        return f"projects/{self.project}/regions/{self.region}/subnetworks/{self.name}"


@dataclass(frozen=True)
class Subnetwork:
    ref: SubnetRef
    cidr: str
    secondary: tuple[dict[str, Any], ...]  # kept verbatim so a patch resends them unchanged
    fingerprint: str

    def secondary_range(self, name: str) -> str | None:
        for entry in self.secondary:
            if entry.get("rangeName") == name:
                return str(entry.get("ipCidrRange", ""))
        return None


@dataclass(frozen=True)
class Nic:
    name: str
    subnetwork: str  # full URL
    aliases: tuple[dict[str, Any], ...]  # AliasIpRange entries, verbatim
    fingerprint: str


@dataclass(frozen=True)
class Alias:
    range_name: str  # "" for an alias from the subnetwork's primary range
    cidr: str

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Alias:
        return cls(str(raw.get("subnetworkRangeName", "")), str(raw.get("ipCidrRange", "")))

    def to_json(self) -> dict[str, str]:
        out = {"ipCidrRange": self.cidr}
        if self.range_name:
            out["subnetworkRangeName"] = self.range_name
        return out

    def __str__(self) -> str:
        return f"{self.range_name}:{self.cidr}" if self.range_name else self.cidr


# ---------------------------------------------------------------------------- decisions


def _net(text: str) -> IPv4Network | None:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net if isinstance(net, IPv4Network) else None


def plan_range(subnetwork: Subnetwork, name: str, subnet: IPv4Network) -> bool:
    """True when the range must be created at `subnet`, False when the existing one covers it.

    An existing range that does not cover `subnet` is refused here, before any change.
    """
    current = subnetwork.secondary_range(name)
    if current is None:
        taken = [
            (n, c) for n, c in _ranges(subnetwork) if (net := _net(c)) and net.overlaps(subnet)
        ]
        if taken:
            other, cidr = taken[0]
            raise UsageError(
                f"--subnet {subnet} lies in {other} ({cidr}) of subnet {subnetwork.ref.name}, "
                f'so range "{name}" cannot be created there: to use an alias that already '
                "exists in it run 'cocoon-net adopt', else choose a --subnet outside it"
            )
        return True
    net = _net(current)
    if net is not None and subnet.subnet_of(net):
        return False
    raise UsageError(
        f'secondary range "{name}" on subnet {subnetwork.ref.name} is {current}, which does '
        f"not cover --subnet {subnet}; expand the range or choose a --subnet inside it"
    )


def _ranges(subnetwork: Subnetwork) -> list[tuple[str, str]]:
    """The subnetwork's ranges as (what to call it, CIDR): the primary, then secondaries."""
    out = [("the primary range", subnetwork.cidr)]
    out += [
        (f'secondary range "{r.get("rangeName")}"', str(r.get("ipCidrRange", "")))
        for r in subnetwork.secondary
    ]
    return out


def held_block(aliases: Sequence[dict[str, Any]], name: str) -> IPv4Network | None:
    """The block of range `name` this NIC already holds (what --subnet auto claimed)."""
    for raw in aliases:
        alias = Alias.from_json(raw)
        if alias.range_name == name and (net := _net(alias.cidr)) is not None:
            return net
    return None


def without_range(subnetwork: Subnetwork, name: str) -> list[dict[str, Any]]:
    return [r for r in subnetwork.secondary if r.get("rangeName") != name]


def with_range(subnetwork: Subnetwork, name: str, subnet: IPv4Network) -> list[dict[str, Any]]:
    """The full secondaryIpRanges list to send: every existing range plus ours."""
    return [*subnetwork.secondary, {"rangeName": name, "ipCidrRange": str(subnet)}]


def _same(alias: Alias, name: str, subnet: IPv4Network) -> bool:
    return alias.range_name == name and _net(alias.cidr) == subnet


def plan_alias_add(
    aliases: Sequence[dict[str, Any]], name: str, subnet: IPv4Network
) -> list[dict[str, Any]] | None:
    """nic0's new alias list with ours on it, or None when it is already there.

    Entries of other ranges are kept verbatim. A stale entry of our own range (an earlier init
    with another --subnet) is dropped, as the Go tool did: the range is ours by its name.
    """
    parsed = [Alias.from_json(a) for a in aliases]
    if any(_same(a, name, subnet) for a in parsed):
        return None
    kept = [raw for raw, a in zip(aliases, parsed, strict=True) if a.range_name != name]
    return [*kept, Alias(name, str(subnet)).to_json()]


def plan_alias_remove(
    aliases: Sequence[dict[str, Any]], name: str, subnet: IPv4Network
) -> list[dict[str, Any]] | None:
    """nic0's alias list without ours (matched by range name AND CIDR), or None if absent."""
    kept = [raw for raw in aliases if not _same(Alias.from_json(raw), name, subnet)]
    return None if len(kept) == len(aliases) else kept


def find_alias(aliases: Sequence[dict[str, Any]], subnet: IPv4Network) -> Alias | None:
    """The alias whose CIDR covers `subnet`, whatever its range is called (for adopt)."""
    for raw in aliases:
        alias = Alias.from_json(raw)
        net = _net(alias.cidr)
        if net is not None and subnet.subnet_of(net):
            return alias
    return None


# ---------------------------------------------------------------------------- client


class Compute:
    def __init__(
        self,
        http: HttpClient,
        base_url: str = DEFAULT_COMPUTE_URL,
        *,
        operation_deadline: float = 600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.operation_deadline = operation_deadline
        self._sleep = sleep
        self._clock = clock

    def get_subnetwork(self, ref: SubnetRef) -> Subnetwork:
        body = self.http.request_json("GET", f"{self.base}/{ref.path}")
        return Subnetwork(
            ref=ref,
            cidr=str(body.get("ipCidrRange", "")),
            secondary=tuple(body.get("secondaryIpRanges") or ()),
            fingerprint=str(body.get("fingerprint", "")),
        )

    def patch_secondary_ranges(self, sub: Subnetwork, ranges: list[dict[str, Any]]) -> None:
        """subnetworks.patch; the list replaces the subnetwork's secondary ranges."""
        op = self.http.request_json(
            "PATCH",
            f"{self.base}/{sub.ref.path}",
            params={"requestId": str(uuid.uuid4())},
            json={"secondaryIpRanges": ranges, "fingerprint": sub.fingerprint},
        )
        self.wait(op, f"projects/{sub.ref.project}/regions/{sub.ref.region}")

    def aliases_in(self, project: str, subnetwork: str) -> list[IPv4Network]:
        """Every alias range of the project's instances on subnetwork (instances.aggregatedList,
        all pages): what other nodes hold, so a claim skips them instead of trying each."""
        out: list[IPv4Network] = []
        token = ""
        while True:
            params = {"maxResults": "500", **({"pageToken": token} if token else {})}
            body = self.http.request_json(
                "GET", f"{self.base}/projects/{project}/aggregated/instances", params=params
            )
            for scoped in (body.get("items") or {}).values():
                for inst in scoped.get("instances") or ():
                    for nic in inst.get("networkInterfaces") or ():
                        if SubnetRef.from_url(str(nic.get("subnetwork", ""))).path != subnetwork:
                            continue
                        nets = (
                            _net(str(a.get("ipCidrRange", "")))
                            for a in nic.get("aliasIpRanges") or ()
                        )
                        out += [n for n in nets if n is not None]
            token = str(body.get("nextPageToken") or "")
            if not token:
                return out

    def get_nic(self, project: str, zone: str, instance: str) -> Nic:
        path = f"projects/{project}/zones/{zone}/instances/{instance}"
        body = self.http.request_json("GET", f"{self.base}/{path}")
        for nic in body.get("networkInterfaces") or []:
            if nic.get("name") == NIC:
                return Nic(
                    name=NIC,
                    subnetwork=str(nic.get("subnetwork", "")),
                    aliases=tuple(nic.get("aliasIpRanges") or ()),
                    fingerprint=str(nic.get("fingerprint", "")),
                )
        raise CloudNotFound(f"{NIC} not found on instance {instance} (project {project})")

    def update_aliases(
        self, project: str, zone: str, instance: str, nic: Nic, aliases: list[dict[str, Any]]
    ) -> None:
        """instances.updateNetworkInterface; the list replaces nic0's alias ranges."""
        path = f"projects/{project}/zones/{zone}/instances/{instance}/updateNetworkInterface"
        op = self.http.request_json(
            "PATCH",
            f"{self.base}/{path}",
            params={"networkInterface": nic.name, "requestId": str(uuid.uuid4())},
            json={"aliasIpRanges": aliases, "fingerprint": nic.fingerprint},
        )
        self.wait(op, f"projects/{project}/zones/{zone}")

    def wait(self, op: Any, scope: str) -> None:
        """Wait for an Operation until DONE, then raise its error if it has one.

        operations.wait returns after at most about two minutes, possibly still RUNNING, so
        it is called in a loop bounded by operation_deadline.
        """
        if not isinstance(op, dict) or not op.get("name"):
            raise CloudError(f"Compute Engine: expected an Operation, got {str(op)[:120]!r}")
        name = str(op["name"])
        deadline = self._clock() + self.operation_deadline
        delay = 0.0  # operations.wait blocks until DONE itself: the first call needs no pause
        while op.get("status") != "DONE":
            if self._clock() >= deadline:
                raise CloudTimeout(
                    f"Compute Engine operation {name} still {op.get('status')} after "
                    f"{self.operation_deadline:.0f} s; check it with 'gcloud compute operations "
                    f"describe {name}' and re-run"
                )
            if delay:
                self._sleep(delay)
            delay = min(max(delay * 2, 0.5), 5.0)
            op = self.http.request_json("POST", f"{self.base}/{scope}/operations/{name}/wait")
        raise_operation_error(op)


def raise_operation_error(op: dict[str, Any]) -> None:
    errors = (op.get("error") or {}).get("errors") or []
    if not errors:
        return
    detail = "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors)
    where = f"Compute Engine operation {op.get('name')} ({op.get('operationType', 'change')})"
    status = int(op.get("httpErrorStatusCode") or 400)
    codes = " ".join(str(e.get("code", "")) for e in errors)
    if "CONDITION_NOT_MET" in codes or "FINGERPRINT" in codes:
        raise CloudConflict(f"{where}: {detail}")
    if IN_USE in codes:
        raise AddressInUse(f"{where}: {detail}")
    raise status_error(where, status, detail, AUTH_HINT)
