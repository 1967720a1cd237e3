"""What the DHCP server hands out and how strict it is: one frozen object, passed everywhere.

Nothing here is a module global: the daemon builds one DhcpSettings from pool.json and flags,
calls validate(), and passes it to every policy call (a SIGHUP builds a new one). Tests build
their own, so no test leaks configuration into the next.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from cocoon_net.config import MIN_LEASE_SECONDS
from cocoon_net.errors import UsageError

# RFC 2132 §5.1: the smallest legal interface MTU.
MIN_MTU = 68
MAX_MTU = 65535
# RFC 2131 §3.3: 0xffffffff means "infinite"; we never grant that.
MAX_LEASE_SECONDS = 0xFFFFFFFE
# An option value is at most 255 bytes and an address list 4 bytes per entry (RFC 2132 §2).
MAX_ADDRESSES = 63
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

Route = tuple[IPv4Network, IPv4Address]


@dataclass(frozen=True)
class DhcpSettings:
    """The DHCP server's configuration (validated by validate(), never mutated).

    Defaults and why:
    - lease_time 24 h: the Go tool's fixed value; T1/T2 default to 50 % / 87.5 % (RFC 2131 §4.4.5).
    - offer_hold 60 s: an OFFER reserves its address this long (the Go tool's value), so two
      clients DISCOVERing together never get the same address.
    - decline_quarantine 600 s: a DECLINE (RFC 2131 §4.3.3, sent after an RFC 5227 ARP probe
      found someone answering) means another host uses the address right now. Ten minutes
      keeps it away from the next few DORA cycles without draining a 140-address pool on a
      transient conflict; each MAC can keep only one address in quarantine at a time, so a VM
      declining in a loop cannot exhaust the pool (see leases.LeaseTable.decline).
    - rate 5 packets/s per MAC with a burst of 20: a boot with retries is ~6 packets and a
      renewal 1; switch DHCP snooping uses 15 pps on untrusted ports. Buckets for at most
      rate_max_clients MACs are kept (least recently seen evicted).
    - relay_allowed_from empty: VMs sit on our bridge, so a relayed packet (giaddr set) is
      only accepted from relays the operator names (e.g. perfdhcp in a benchmark).
    """

    server_id: IPv4Address
    subnet: IPv4Network
    router: IPv4Address
    dns: tuple[IPv4Address, ...] = ()
    domain_name: str = ""
    search: tuple[str, ...] = ()
    ntp: tuple[IPv4Address, ...] = ()
    mtu: int | None = None
    lease_time: int = 86400
    renewal_time: int | None = None  # None: lease_time / 2
    rebinding_time: int | None = None  # None: lease_time * 7 / 8
    classless_routes: tuple[Route, ...] = ()
    offer_hold: float = 60.0
    decline_quarantine: float = 600.0
    reservations: Mapping[str, IPv4Address] = field(default_factory=dict)
    relay_allowed_from: frozenset[IPv4Address] = frozenset()
    rate_per_second: float = 5.0
    rate_burst: int = 20
    rate_max_clients: int = 4096

    @property
    def t1(self) -> int:
        return self.renewal_time if self.renewal_time is not None else self.lease_time // 2

    @property
    def t2(self) -> int:
        if self.rebinding_time is not None:
            return self.rebinding_time
        return self.lease_time * 7 // 8

    def validate(self) -> None:
        """Reject nonsense with a one-line message naming the setting and the fix."""
        net = self.subnet
        _host_in(net, self.server_id, "server_id")
        _host_in(net, self.router, "router")
        if len(self.dns) > MAX_ADDRESSES or len(self.ntp) > MAX_ADDRESSES:
            _bad("dns/ntp", len(self.dns) + len(self.ntp), f"at most {MAX_ADDRESSES} each")
        if self.domain_name:
            _check_domain(self.domain_name, "domain_name")
        for name in self.search:
            _check_domain(name, "search")
        if self.mtu is not None and not MIN_MTU <= self.mtu <= MAX_MTU:
            _bad("mtu", self.mtu, f"must be {MIN_MTU}..{MAX_MTU} (RFC 2132 §5.1)")
        if not MIN_LEASE_SECONDS <= self.lease_time <= MAX_LEASE_SECONDS:
            _bad("lease_time", self.lease_time, f"must be at least {MIN_LEASE_SECONDS} seconds")
        # RFC 2131 §4.4.5: T1 < T2 < lease time, or clients rebind before they renew.
        if not 0 < self.t1 < self.t2 < self.lease_time:
            _bad(
                "renewal_time/rebinding_time",
                f"{self.t1}/{self.t2}",
                f"need 0 < T1 < T2 < lease_time ({self.lease_time})",
            )
        for dest, gateway in self.classless_routes:
            if gateway not in net:
                _bad("classless_routes", f"{dest} via {gateway}", f"gateway not in {net}")
        if self.offer_hold <= 0:
            _bad("offer_hold", self.offer_hold, "must be positive")
        if self.decline_quarantine < 0:
            _bad("decline_quarantine", self.decline_quarantine, "must not be negative")
        if self.rate_per_second <= 0 or self.rate_burst < 1 or self.rate_max_clients < 1:
            _bad(
                "rate limit",
                f"{self.rate_per_second}/s burst {self.rate_burst}",
                "rate must be positive, burst and max clients at least 1",
            )
        taken: dict[IPv4Address, str] = {}
        for mac, ip in self.reservations.items():
            if not _MAC.match(mac):
                _bad("reservation", mac, "MAC must be lower-case colon hex like 02:00:00:00:00:01")
            _host_in(net, ip, f"reservation for {mac}")
            if ip in (self.server_id, self.router):
                _bad(f"reservation for {mac}", ip, "is the gateway")
            if ip in taken:
                _bad(f"reservation for {mac}", ip, f"already reserved for {taken[ip]}")
            taken[ip] = mac


def _bad(name: str, value: object, why: str) -> None:
    raise UsageError(f"invalid DHCP setting {name} {value}: {why}")


def _host_in(net: IPv4Network, ip: IPv4Address, name: str) -> None:
    if ip not in net or ip in (net.network_address, net.broadcast_address):
        _bad(name, ip, f"not a host address of {net}")


def _check_domain(name: str, setting: str) -> None:
    """RFC 1035 §2.3.1 names: LDH labels of at most 63 bytes, 253 bytes in all."""
    labels = name.rstrip(".").split(".")
    if len(name.rstrip(".")) > 253 or not all(_LABEL.match(label) for label in labels):
        _bad(setting, repr(name), "not a valid DNS name")
