"""The VM bridge (cni0 by default): a fixed MAC, the MTU, link up and the gateway address.

`plan` is pure: it compares what the kernel has (a `nic.Link` and the bridge's addresses) with
what we want and returns the `ip` commands that close the gap, each with the line we report.
Addresses other than the gateway address and the one we set on an earlier run are never
touched; an operator's own addresses on the bridge survive every run and teardown.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from cocoon_net import proc
from cocoon_net.errors import HostSetupError, StateError
from cocoon_net.node import nic


@dataclass(frozen=True)
class Step:
    argv: tuple[str, ...]
    change: str  # what the step does, for the operator


@dataclass(frozen=True)
class BridgeSpec:
    name: str
    mac: str
    mtu: int
    address: IPv4Interface  # gateway/prefix


@dataclass(frozen=True)
class BridgePlan:
    steps: tuple[Step, ...]
    creates: bool  # the bridge does not exist yet; teardown may delete what we create


def default_mac(gateway: IPv4Address) -> str:
    """02:c0 plus the gateway's four bytes: locally administered (bit 1) and unicast (bit 0 clear).

    A bridge without an explicit MAC takes the lowest MAC of its ports and changes it as ports
    come and go; the VMs would then hold a stale gateway MAC in their ARP caches. A MAC derived
    from the gateway stays the same across restarts, re-creation and port changes.
    """
    return "02:c0:" + ":".join(f"{byte:02x}" for byte in gateway.packed)


def plan(
    spec: BridgeSpec,
    link: nic.Link | None,
    present: tuple[IPv4Interface, ...],
    previous: str,
) -> BridgePlan:
    """Steps that make the kernel match spec; `previous` is the address an earlier run set."""
    name = spec.name
    steps: list[Step] = []
    if link is None:
        # Created with MAC and MTU at once: the kernel keeps a user-set MTU even when a port
        # with a smaller MTU joins later (bridge "MTU set by user", Linux 4.17+).
        steps.append(
            Step(
                (
                    "ip",
                    "link",
                    "add",
                    name,
                    "address",
                    spec.mac,
                    "mtu",
                    str(spec.mtu),
                    "type",
                    "bridge",
                ),
                f"create bridge {name} (mac {spec.mac}, mtu {spec.mtu})",
            )
        )
    else:
        if link.kind != "bridge":
            kind = link.kind or "physical"
            raise HostSetupError(
                f"{name} exists but is a {kind} link, not a bridge: remove it or choose "
                "another bridge name"
            )
        if link.mac != spec.mac:
            steps.append(
                Step(
                    ("ip", "link", "set", "dev", name, "address", spec.mac),
                    f"set {name} mac {spec.mac} (was {link.mac})",
                )
            )
        if link.mtu != spec.mtu:
            steps.append(
                Step(
                    ("ip", "link", "set", "dev", name, "mtu", str(spec.mtu)),
                    f"set {name} mtu {spec.mtu} (was {link.mtu})",
                )
            )
    # The old address goes before the new one is added: deleting a primary address also
    # deletes the secondaries of its subnet unless promote_secondaries is set.
    old = _recorded(previous)
    if old is not None and old != spec.address and old in present:
        steps.append(
            Step(
                ("ip", "addr", "del", previous, "dev", name),
                f"remove old address {previous} from {name}",
            )
        )
    if spec.address not in present:
        steps.append(
            Step(
                ("ip", "addr", "add", str(spec.address), "dev", name),
                f"add address {spec.address} to {name}",
            )
        )
    if link is None or not link.up:
        steps.append(Step(("ip", "link", "set", "dev", name, "up"), f"set {name} up"))
    return BridgePlan(tuple(steps), creates=link is None)


def plan_teardown(
    name: str,
    created: bool,
    address: str,
    link: nic.Link | None,
    present: tuple[IPv4Interface, ...],
) -> BridgePlan:
    """Delete the bridge if we created it, else take back only the address we put on it."""
    if link is None or link.kind != "bridge":
        return BridgePlan((), creates=False)
    if created:
        return BridgePlan(
            (Step(("ip", "link", "del", "dev", name), f"delete bridge {name}"),), False
        )
    recorded = _recorded(address)
    if recorded is not None and recorded in present:
        return BridgePlan(
            (
                Step(
                    ("ip", "addr", "del", address, "dev", name),
                    f"remove address {address} from {name}",
                ),
            ),
            creates=False,
        )
    return BridgePlan((), creates=False)


def _recorded(text: str) -> IPv4Interface | None:
    """The bridge address pool.json says we set ("" when none)."""
    if not text:
        return None
    try:
        return IPv4Interface(text)
    except ValueError:
        raise StateError(
            f"pool.json host.bridgeAddress {text!r} is not an address/prefix; fix or clear it"
        ) from None


def read(name: str) -> tuple[nic.Link | None, tuple[IPv4Interface, ...]]:
    return nic.link(name), nic.addresses(name)


def apply(bridge_plan: BridgePlan) -> list[str]:
    for step in bridge_plan.steps:
        proc.run(step.argv)
    return changes(bridge_plan)


def changes(bridge_plan: BridgePlan) -> list[str]:
    return [step.change for step in bridge_plan.steps]
