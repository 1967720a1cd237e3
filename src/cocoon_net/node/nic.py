"""What the current network namespace has: links, their addresses and the default route.

Everything is read with `ip -json` (iproute2), never from /sys/class/net: sysfs shows the
namespace it was mounted in, not the one this process joined with --netns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface
from typing import Any

from cocoon_net import proc
from cocoon_net.errors import HostSetupError

# Kinds whose MAC is copied from another link (a port, a parent or a slave), so a MAC lookup
# prefers any other link: a cloud ENI's MAC belongs to the NIC, not to a VLAN on top of it.
_DERIVED_MAC_KINDS = frozenset({"vlan", "bridge", "bond", "team", "macsec", "ipvlan"})


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    kind: str  # "bridge", "veth", ...; "" for a physical device
    mtu: int
    mac: str  # lower case
    up: bool  # administratively up (IFF_UP), whatever the carrier


def _link_from_json(raw: dict[str, Any]) -> Link:
    return Link(
        name=str(raw["ifname"]),
        index=int(raw["ifindex"]),
        kind=str(raw.get("linkinfo", {}).get("info_kind", "")),
        mtu=int(raw.get("mtu", 0)),
        mac=str(raw.get("address", "")).lower(),
        up="UP" in raw.get("flags", ()),
    )


def show_dev(argv: Sequence[str], name: str) -> list[dict[str, Any]]:
    """Run an `ip -json ... dev NAME` query; an absent device reads as an empty answer.

    iproute2 exits 1 and prints 'Device "NAME" does not exist.' (link, addr) or
    'Cannot find device "NAME"' (route) for a missing device; that, and only that, is swallowed.
    """
    command = [*argv, "dev", name]
    result = proc.run(command, ok_codes=(0, 1))
    err = result.stderr.strip()
    if result.returncode == 1:
        if f'"{name}"' in err and ("does not exist" in err or "Cannot find device" in err):
            return []
        raise HostSetupError(f"{' '.join(command)}: {err.splitlines()[-1] if err else 'failed'}")
    out = result.stdout.strip()
    try:
        return list(json.loads(out)) if out else []
    except json.JSONDecodeError as exc:
        raise HostSetupError(f"{' '.join(command)}: unreadable JSON output") from exc


def link(name: str) -> Link | None:
    found = show_dev(["ip", "-json", "-details", "link", "show"], name)
    return _link_from_json(found[0]) if found else None


def links() -> list[Link]:
    return [
        _link_from_json(raw) for raw in proc.run_json(["ip", "-json", "-details", "link", "show"])
    ]


def link_exists(name: str) -> bool:
    return link(name) is not None


def link_mtu(name: str) -> int | None:
    found = link(name)
    return found.mtu if found else None


def addresses(name: str) -> tuple[IPv4Interface, ...]:
    """The IPv4 addresses of a link as address/prefix; empty when the link is absent."""
    out: list[IPv4Interface] = []
    for entry in show_dev(["ip", "-json", "-4", "addr", "show"], name):
        for info in entry.get("addr_info", ()):
            if info.get("family") == "inet":
                out.append(IPv4Interface(f"{info['local']}/{info['prefixlen']}"))
    return tuple(out)


def pick_by_mac(candidates: Iterable[Link], mac: str) -> str | None:
    """The link that owns mac: a link that copied it from another ranks last, then ifindex."""
    wanted = mac.strip().lower().replace("-", ":")
    matches = [item for item in candidates if item.mac == wanted]
    if not matches:
        return None
    return min(matches, key=lambda item: (item.kind in _DERIVED_MAC_KINDS, item.index)).name


def link_by_mac(mac: str) -> str | None:
    return pick_by_mac(links(), mac)


def pick_default_route_dev(routes: Iterable[dict[str, Any]]) -> str | None:
    """The device of the preferred IPv4 default route (lowest metric; first hop if multipath)."""
    best: tuple[int, str] | None = None
    for route in routes:
        if route.get("dst") != "default":
            continue
        dev = route.get("dev") or next(
            (hop.get("dev") for hop in route.get("nexthops", ()) if hop.get("dev")), None
        )
        if not dev:
            continue
        candidate = (int(route.get("metric", 0)), str(dev))
        if best is None or candidate[0] < best[0]:
            best = candidate
    return best[1] if best else None


def primary_nic() -> str | None:
    """The device of the IPv4 default route in the main table; None without a default route."""
    return pick_default_route_dev(
        proc.run_json(["ip", "-json", "-4", "route", "show", "table", "main", "default"])
    )
