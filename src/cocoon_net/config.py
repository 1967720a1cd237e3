"""Defaults, environment variables and the validation of everything an operator types.

Every value from a flag, an environment variable or pool.json passes through a function here
before anything is written, changed in the kernel or sent to a cloud. Each error is one line
that names the input and, where it can, the fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from cocoon_net.errors import UsageError

# Paths and names shared with the Go tool; each has a flag and an env override.
DEFAULT_STATE_DIR = Path("/var/lib/cocoon/net")
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_RUN_DIR = Path("/run/cocoon-net")
DEFAULT_BRIDGE = "cni0"
POOL_FILE = "pool.json"
LEASE_FILE = "leases.json"
LOCK_FILE = "cocoon-net.lock"
DAEMON_LOCK_FILE = "cocoon-net.daemon.lock"
CONTROL_SOCKET = "control.sock"
CONFLIST_NAME = "30-cocoon-dhcp.conflist"
CNI_NETWORK_NAME = "cocoon-dhcp"

DEFAULT_DNS = ("8.8.8.8", "1.1.1.1")
DEFAULT_METRICS_ADDR = ":9092"
DEFAULT_LEASE_SECONDS = 24 * 3600
POOL_SIZE_INIT = 140
POOL_SIZE_ADOPT = 253

# Routes for leases carry this protocol number so that we only ever remove our own;
# `ip route show proto 203` lists them. 3 ("boot") is what the Go tool used.
ROUTE_PROTO = 203
GO_ROUTE_PROTO = 3

PLATFORMS = ("gke", "volcengine", "aws", "static")

ENV_PREFIX = "COCOON_NET_"
ENV_LOG_LEVEL = "COCOON_NET_LOG_LEVEL"
ENV_LOG_FORMAT = "COCOON_NET_LOG_FORMAT"
ENV_STATE_DIR = "COCOON_NET_STATE_DIR"
ENV_LEASE_FILE = "COCOON_NET_LEASE_FILE"
ENV_CNI_CONF_DIR = "COCOON_NET_CNI_CONF_DIR"
ENV_RUN_DIR = "COCOON_NET_RUN_DIR"
ENV_BRIDGE = "COCOON_NET_BRIDGE"
ENV_NETNS = "COCOON_NET_NETNS"
ENV_METRICS_ADDR = "COCOON_NET_METRICS_ADDR"

_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
# Cloud resource names are built as "<node>-vms" and "<node>-eni-<n>": GCE's and Volcengine's
# name rules both accept lower-case RFC 1035 labels, so node names are kept to that.
_NODE_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,48}[a-z0-9])?$")
MIN_MTU, MAX_MTU = 576, 9216
MIN_LEASE_SECONDS = 10


def env_path(environ: Mapping[str, str], name: str, default: Path) -> Path:
    value = environ.get(name, "")
    return Path(value) if value else default


def parse_subnet(text: str, *, flag: str = "--subnet") -> IPv4Network:
    """An IPv4 CIDR with room for a gateway and at least one VM; host bits are cleared."""
    text = text.strip()
    if "/" not in text:
        raise UsageError(f"invalid {flag} {text!r}: expected an IPv4 CIDR such as 172.20.100.0/24")
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise UsageError(
            f"invalid {flag} {text!r}: expected an IPv4 CIDR such as 172.20.100.0/24"
        ) from None
    if not isinstance(net, IPv4Network):
        raise UsageError(f"invalid {flag} {text!r}: only IPv4 subnets are supported")
    if net.prefixlen > 30:
        raise UsageError(
            f"invalid {flag} {text!r}: a /{net.prefixlen} has no room for a gateway and a VM "
            "(use /30 or larger)"
        )
    return net


def parse_ipv4(text: str, *, flag: str) -> IPv4Address:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        raise UsageError(f"invalid {flag} {text!r}: expected an IPv4 address") from None
    if not isinstance(addr, IPv4Address):
        raise UsageError(f"invalid {flag} {text!r}: only IPv4 is supported")
    return addr


def ipv4_int(text: str) -> int:
    """A dotted-quad IPv4 address as an integer; ValueError otherwise.

    For the pool's thousands of entries: inet_pton is strict (exactly four decimal parts)
    and about 30x faster than ipaddress's parser.
    """
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, TypeError):
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def auto_subnet(command: str, prefix: int, gateway: str | None) -> IPv4Network:
    """The placeholder for --subnet auto, after checking what goes with it."""
    if command != "init":
        raise UsageError("--subnet auto claims a block in the cloud: only init takes it")
    if not 16 <= prefix <= 28:
        raise UsageError(f"invalid --subnet-prefix {prefix}: expected 16 to 28")
    if gateway:
        raise UsageError("--gateway needs a known subnet: drop it with --subnet auto")
    return IPv4Network(f"0.0.0.0/{prefix}")


def platform_options(security_group: str, range_cidr: str) -> dict[str, str]:
    out = {"security_group": security_group} if security_group else {}
    if range_cidr:
        out["range_cidr"] = str(parse_subnet(range_cidr, flag="--range-cidr"))
    return out


def resolve_gateway(text: str | None, subnet: IPv4Network) -> IPv4Address:
    """The bridge address: --gateway, or the subnet's first host."""
    if not text:
        return subnet.network_address + 1
    gw = parse_ipv4(text, flag="--gateway")
    if gw not in subnet:
        raise UsageError(f"invalid --gateway {gw}: not inside subnet {subnet}")
    if gw in (subnet.network_address, subnet.broadcast_address):
        raise UsageError(
            f"invalid --gateway {gw}: the network or broadcast address of {subnet} "
            "cannot be a gateway"
        )
    return gw


def host_addresses(subnet: IPv4Network, gateway: IPv4Address) -> Iterable[IPv4Address]:
    """Usable VM addresses of subnet in ascending order, the gateway excluded."""
    return (ip for ip in subnet.hosts() if ip != gateway)


def pool_capacity(subnet: IPv4Network) -> int:
    return subnet.num_addresses - 3  # network, broadcast, gateway


def resolve_pool_size(value: int | None, subnet: IPv4Network, default: int) -> int:
    """--pool-size checked against the subnet; the default shrinks to fit a small subnet."""
    capacity = pool_capacity(subnet)
    if value is None:
        return min(default, capacity)
    if value < 1:
        raise UsageError(f"invalid --pool-size {value}: must be at least 1")
    if value > capacity:
        raise UsageError(
            f"invalid --pool-size {value}: {subnet} has room for {capacity} VM addresses"
        )
    return value


def first_hosts(subnet: IPv4Network, gateway: IPv4Address, count: int) -> list[IPv4Address]:
    out: list[IPv4Address] = []
    for ip in host_addresses(subnet, gateway):
        if len(out) == count:
            break
        out.append(ip)
    return out


def split_list(text: str) -> list[str]:
    """Comma-separated values, trimmed, empty items dropped (the Go tool's splitTrim)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_dns(text: str) -> list[IPv4Address]:
    return [parse_ipv4(item, flag="--dns") for item in split_list(text)]


def parse_cidr_list(items: Iterable[str], *, flag: str) -> list[IPv4Network]:
    """CIDRs given one per flag occurrence (or comma-separated), canonicalised, de-duplicated."""
    out: list[IPv4Network] = []
    for raw in items:
        for text in split_list(raw):
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise UsageError(f"invalid {flag} {text!r}: expected an IPv4 CIDR") from None
            if not isinstance(net, IPv4Network):
                raise UsageError(f"invalid {flag} {text!r}: must be IPv4")
            if net not in out:
                out.append(net)
    return out


def parse_node_name(text: str) -> str:
    if not _NODE_NAME.match(text):
        raise UsageError(
            f"invalid --node-name {text!r}: use 1-50 lower-case letters, digits and '-', "
            "starting with a letter and not ending with '-' (it becomes part of cloud "
            "resource names)"
        )
    return text


def parse_platform(text: str | None, *, allow_empty: bool = True) -> str:
    if not text:
        if allow_empty:
            return ""
        raise UsageError("missing --platform: expected one of " + ", ".join(PLATFORMS))
    if text not in PLATFORMS:
        raise UsageError(f"unknown --platform {text!r}: expected one of {', '.join(PLATFORMS)}")
    return text


def parse_ifname(text: str, *, flag: str) -> str:
    if not _IFNAME.match(text) or text in {".", ".."}:
        raise UsageError(
            f"invalid {flag} {text!r}: an interface name has 1-15 letters, digits or '_.@-'"
        )
    return text


def parse_mtu(value: int | None) -> int | None:
    if value is None or value == 0:
        return None
    if not MIN_MTU <= value <= MAX_MTU:
        raise UsageError(f"invalid --mtu {value}: must be between {MIN_MTU} and {MAX_MTU}")
    return value


def parse_duration(text: str, *, flag: str) -> int:
    """Seconds from e.g. 86400, 3600s, 90m, 24h or 7d; at least MIN_LEASE_SECONDS."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not match:
        raise UsageError(f"invalid {flag} {text!r}: expected e.g. 24h, 90m or 3600s")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if seconds < MIN_LEASE_SECONDS:
        raise UsageError(f"invalid {flag} {text!r}: must be at least {MIN_LEASE_SECONDS}s")
    return seconds


# The DHCP server's read pacing (dhcp/server.py): the default, and the longest allowed, past
# which the interval would show in a client's wait for its reply.
DEFAULT_READ_INTERVAL_MS = 4
MAX_READ_INTERVAL_MS = 50


def parse_milliseconds(text: str, *, flag: str, maximum: int) -> float:
    """Seconds from e.g. 2ms, 2 or 0 (milliseconds), at most `maximum` ms."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms)?\s*", text)
    if not match:
        raise UsageError(f"invalid {flag} {text!r}: expected milliseconds, e.g. 2ms or 0")
    milliseconds = float(match.group(1))
    if milliseconds > maximum:
        raise UsageError(f"invalid {flag} {text!r}: at most {maximum}ms")
    return milliseconds / 1000


@dataclass(frozen=True)
class Paths:
    """Every file and directory cocoon-net touches on the node."""

    state_dir: Path
    run_dir: Path
    cni_conf_dir: Path
    lease_file: Path | None = None  # None: recorded in pool.json, else <state_dir>/leases.json

    @property
    def pool_file(self) -> Path:
        return self.state_dir / POOL_FILE

    @property
    def lock_file(self) -> Path:
        return self.run_dir / LOCK_FILE

    @property
    def daemon_lock(self) -> Path:
        return self.run_dir / DAEMON_LOCK_FILE

    @property
    def control_socket(self) -> Path:
        return self.run_dir / CONTROL_SOCKET

    @property
    def conflist(self) -> Path:
        return self.cni_conf_dir / CONFLIST_NAME

    def default_lease_file(self) -> Path:
        return self.lease_file or self.state_dir / LEASE_FILE

    # pool.json records the paths init/adopt used; the Go tool's file has neither key, and
    # an empty value means "the default", never the current directory.
    def lease_file_for(self, recorded: str) -> Path:
        """--lease-file, else the lease file pool.json records, else <state-dir>/leases.json."""
        if self.lease_file is None and recorded:
            return Path(recorded)
        return self.default_lease_file()

    def conflist_for(self, recorded: str) -> Path:
        """The conflist pool.json records, else <cni-conf-dir>/30-cocoon-dhcp.conflist."""
        return Path(recorded) if recorded else self.conflist


def default_paths(environ: Mapping[str, str] | None = None) -> Paths:
    env = os.environ if environ is None else environ
    lease = env.get(ENV_LEASE_FILE, "")
    return Paths(
        state_dir=env_path(env, ENV_STATE_DIR, DEFAULT_STATE_DIR),
        run_dir=env_path(env, ENV_RUN_DIR, DEFAULT_RUN_DIR),
        cni_conf_dir=env_path(env, ENV_CNI_CONF_DIR, DEFAULT_CNI_CONF_DIR),
        lease_file=Path(lease) if lease else None,
    )


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def parse_mac(text: str, *, flag: str) -> str:
    mac = text.strip().lower()
    if not _MAC.match(mac):
        raise UsageError(f"invalid {flag} {text!r}: expected a MAC like 02:c0:ac:14:64:01")
    if int(mac[:2], 16) & 1:
        raise UsageError(f"invalid {flag} {text!r}: a multicast MAC cannot be a gateway")
    return mac
