"""pool.json: what init/adopt provisioned, read by the daemon, status and teardown.

A file as the Go tool writes it (our loader reads these unchanged)::

    {
      "platform": "gke",
      "nodeName": "cocoon-pool",
      "subnet": "172.20.100.0/24",
      "gateway": "172.20.100.1",
      "primaryNIC": "ens4",
      "ips": ["172.20.100.2", "172.20.100.3"],
      "aliasRangeName": "cocoon-pods",
      "dnsServers": ["8.8.8.8", "1.1.1.1"],
      "updatedAt": "2026-04-05T06:00:00.123456789Z"
    }

We write the same keys in the same order, then our own additions (what later commands need
and the Go tool lost): whether iptables is ours to manage, the VPC CIDRs VMs reach unmasked,
the bridge name and MTU, the lease file and conflist paths, what host setup changed (so
teardown can undo exactly that), the cloud resources each platform created and the VM
guard's policy and tables. Keys we do not
know are kept as they are, so a newer cocoon-net's additions survive a rewrite by this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from cocoon_net import config
from cocoon_net.errors import StateError, UsageError
from cocoon_net.fsutil import atomic_write, remove_stale_temps

_GO_KEYS = (
    "platform",
    "nodeName",
    "subnet",
    "gateway",
    "primaryNIC",
    "secondaryNICs",
    "ips",
    "eniIDs",
    "subnetID",
    "aliasRangeName",
    "dnsServers",
    "dropInternalAccess",
    "dropCIDRs",
    "updatedAt",
)
_OUR_KEYS = (
    "manageIptables",
    "vpcCIDRs",
    "bridge",
    "mtu",
    "leaseFile",
    "cniConflist",
    "host",
    "cloud",
    "guard",
)


@dataclass
class HostRecord:
    """What host setup changed, so teardown restores exactly that and nothing else."""

    bridge_created: bool = False
    bridge_address: str = ""  # "gw/prefix" we put on the bridge
    sysctls_before: dict[str, str] = field(default_factory=dict)  # the host's, before ours
    # The value we last wrote to each of them: teardown restores a setting only while it
    # still holds this. A record without it (older versions) means the constants host setup
    # always writes (node.sysctl.value_we_set).
    sysctls_set: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "bridgeCreated": self.bridge_created,
            "bridgeAddress": self.bridge_address,
            "sysctlsBefore": dict(sorted(self.sysctls_before.items())),
            "sysctlsSet": dict(sorted(self.sysctls_set.items())),
        }

    @classmethod
    def from_json(cls, raw: Any) -> HostRecord:
        if not isinstance(raw, dict):
            return cls()
        return cls(
            bridge_created=bool(raw.get("bridgeCreated", False)),
            bridge_address=str(raw.get("bridgeAddress", "")),
            sysctls_before=cls._sysctls(raw, "sysctlsBefore"),
            sysctls_set=cls._sysctls(raw, "sysctlsSet"),
        )

    @staticmethod
    def _sysctls(raw: dict[str, Any], key: str) -> dict[str, str]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"host.{key} must be an object of sysctl values")
        return {str(k): str(v) for k, v in value.items()}


@dataclass
class GuardRecord:
    """The VM guard's policy (init/adopt flags) and whether the daemon installed its tables,
    so teardown removes them only when they are ours."""

    allow_vm_to_vm: bool = False
    allow_ipv6: bool = False
    installed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "allowVmToVm": self.allow_vm_to_vm,
            "allowIPv6": self.allow_ipv6,
            "installed": self.installed,
        }

    @classmethod
    def from_json(cls, raw: Any) -> GuardRecord:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("guard must be an object")
        return cls(
            allow_vm_to_vm=bool(raw.get("allowVmToVm", False)),
            allow_ipv6=bool(raw.get("allowIPv6", False)),
            installed=bool(raw.get("installed", False)),
        )


@dataclass
class PoolState:
    platform: str
    node_name: str
    subnet: str
    gateway: str
    ips: list[str] = field(default_factory=list)
    primary_nic: str = ""
    secondary_nics: list[str] = field(default_factory=list)
    eni_ids: list[str] = field(default_factory=list)
    subnet_id: str = ""
    alias_range_name: str = ""
    dns_servers: list[str] = field(default_factory=list)
    drop_internal_access: bool = False
    drop_cidrs: list[str] = field(default_factory=list)
    updated_at: str = ""
    # Our additions. A Go-written file has none: its daemon always managed iptables.
    manage_iptables: bool = True
    vpc_cidrs: list[str] = field(default_factory=list)
    bridge: str = config.DEFAULT_BRIDGE
    mtu: int = 0  # 0: the primary NIC's MTU
    lease_file: str = ""
    cni_conflist: str = ""
    host: HostRecord = field(default_factory=HostRecord)
    cloud: dict[str, Any] = field(default_factory=dict)  # owned by the platform
    guard: GuardRecord = field(default_factory=GuardRecord)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept verbatim

    # Typed views; valid because load() and the commands validate before saving.
    @property
    def network(self) -> IPv4Network:
        return IPv4Network(self.subnet, strict=False)

    @property
    def gateway_ip(self) -> IPv4Address:
        return IPv4Address(self.gateway)

    @property
    def pool_ips(self) -> list[IPv4Address]:
        return [IPv4Address(value) for value in self.pool_ints]

    @property
    def pool_ints(self) -> list[int]:
        """The pool as ints: the daemon's lease table keeps no object per address."""
        return [config.ipv4_int(ip) for ip in self.ips]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "platform": self.platform,
            "nodeName": self.node_name,
            "subnet": self.subnet,
            "gateway": self.gateway,
        }
        if self.primary_nic:
            out["primaryNIC"] = self.primary_nic
        if self.secondary_nics:
            out["secondaryNICs"] = list(self.secondary_nics)
        out["ips"] = list(self.ips) or None
        if self.eni_ids:
            out["eniIDs"] = list(self.eni_ids)
        if self.subnet_id:
            out["subnetID"] = self.subnet_id
        if self.alias_range_name:
            out["aliasRangeName"] = self.alias_range_name
        if self.dns_servers:
            out["dnsServers"] = list(self.dns_servers)
        if self.drop_internal_access:
            out["dropInternalAccess"] = True
        if self.drop_cidrs:
            out["dropCIDRs"] = list(self.drop_cidrs)
        out["updatedAt"] = self.updated_at
        out["manageIptables"] = self.manage_iptables
        out["vpcCIDRs"] = list(self.vpc_cidrs)
        out["bridge"] = self.bridge
        out["mtu"] = self.mtu
        out["leaseFile"] = self.lease_file
        out["cniConflist"] = self.cni_conflist
        out["host"] = self.host.to_json()
        out["cloud"] = self.cloud
        out["guard"] = self.guard.to_json()
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, raw: Any, *, source: Path) -> PoolState:
        if not isinstance(raw, dict):
            raise StateError(f"{source}: expected a JSON object{_RECOVER}")
        try:
            state = cls(
                platform=_str(raw, "platform"),
                node_name=_str(raw, "nodeName"),
                subnet=_str(raw, "subnet"),
                gateway=_str(raw, "gateway"),
                ips=_strs(raw, "ips"),
                primary_nic=_str(raw, "primaryNIC"),
                secondary_nics=_strs(raw, "secondaryNICs"),
                eni_ids=_strs(raw, "eniIDs"),
                subnet_id=_str(raw, "subnetID"),
                alias_range_name=_str(raw, "aliasRangeName"),
                dns_servers=_strs(raw, "dnsServers"),
                drop_internal_access=bool(raw.get("dropInternalAccess", False)),
                drop_cidrs=_strs(raw, "dropCIDRs"),
                updated_at=_str(raw, "updatedAt"),
                manage_iptables=bool(raw.get("manageIptables", True)),
                vpc_cidrs=_strs(raw, "vpcCIDRs"),
                bridge=_str(raw, "bridge") or config.DEFAULT_BRIDGE,
                mtu=int(raw.get("mtu") or 0),
                lease_file=_str(raw, "leaseFile"),
                cni_conflist=_str(raw, "cniConflist"),
                host=HostRecord.from_json(raw.get("host")),
                cloud=dict(raw.get("cloud") or {}),
                guard=GuardRecord.from_json(raw.get("guard")),
                extra={k: v for k, v in raw.items() if k not in _GO_KEYS + _OUR_KEYS},
            )
        except (TypeError, ValueError) as exc:
            raise StateError(f"{source}: {exc}{_RECOVER}") from None
        state.validate(source)
        return state

    def validate(self, source: Path) -> None:
        """Check what the daemon and teardown rely on; name the bad field and the file."""
        try:
            subnet = config.parse_subnet(self.subnet, flag="subnet")
            gateway = config.resolve_gateway(self.gateway, subnet)
            low, high = int(subnet.network_address), int(subnet.broadcast_address)
            for ip in self.ips:
                try:
                    value = config.ipv4_int(ip)
                except ValueError:
                    bad = f"invalid ips entry {ip!r}: expected an IPv4 address"
                    raise UsageError(bad) from None
                if not low < value < high or value == int(gateway):
                    raise UsageError(f"ips entry {ip} is not a VM address of {subnet}")
            for dns in self.dns_servers:
                config.parse_ipv4(dns, flag="dnsServers entry")
            config.parse_cidr_list(self.drop_cidrs, flag="dropCIDRs entry")
            config.parse_cidr_list(self.vpc_cidrs, flag="vpcCIDRs entry")
            config.parse_ifname(self.bridge, flag="bridge")
        except UsageError as exc:
            raise StateError(f"{source}: {exc}{_RECOVER}") from None
        if self.platform and self.platform not in config.PLATFORMS:
            raise StateError(
                f"{source}: unknown platform {self.platform!r} (expected one of "
                f"{', '.join(config.PLATFORMS)}){_RECOVER}"
            )


_RECOVER = "; fix or restore the file, or remove it and re-run 'cocoon-net adopt'"


def _str(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {type(value).__name__}")
    return value


def _strs(raw: dict[str, Any], key: str) -> list[str]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings")
    return list(value)


def load(path: Path) -> PoolState:
    """Read pool.json; every failure is a StateError naming the file and how to recover."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise StateError(
            f"no pool state at {path} (run 'cocoon-net init' or 'cocoon-net adopt' first, "
            "or pass the right --state-dir)"
        ) from None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(
            f"{path} is corrupt (line {exc.lineno} column {exc.colno}: {exc.msg}){_RECOVER}"
        ) from None
    return PoolState.from_json(raw, source=path)


def load_optional(path: Path) -> PoolState | None:
    return load(path) if path.exists() else None


def save(path: Path, state: PoolState, *, now: datetime | None = None) -> None:
    """Atomically replace pool.json (fsync of file and directory) and drop crash leftovers."""
    stamp = now or datetime.now(UTC)
    state.updated_at = stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    data = json.dumps(state.to_json(), indent=2) + "\n"
    atomic_write(path, data.encode(), mode=0o644, dir_mode=0o750)
    remove_stale_temps(path)
