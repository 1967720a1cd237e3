"""The kernel settings a routed VM bridge needs, read and written through /proc/sys.

Keys are written the sysctl.d(5) way: dots separate components, and a dot inside a component
(an interface such as eth0.100) is written as a slash: `net.ipv4.conf.eth0/100.rp_filter` is
/proc/sys/net/ipv4/conf/eth0.100/rp_filter. Interface names cannot contain '/', so the mapping
is exact both ways; the Go tool replaced every dot and wrote to the wrong file.

/proc/sys/net shows the network namespace of the process that opens the file, so these
functions act on the namespace the CLI joined with --netns.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cocoon_net.errors import HostSetupError

PROC_SYS = Path("/proc/sys")
IP_FORWARD = "net.ipv4.ip_forward"
FORWARD_ON = "1"
RP_FILTER_OFF = "0"
# On a secondary ENI: answer ARP only for addresses on that ENI (never for the bridge's
# gateway address, which is also the cloud's gateway there), and ask from an address of it.
ENI_ARP = {"arp_ignore": "1", "arp_announce": "2"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    key: str
    value: str
    required: bool  # a required setting that cannot be written aborts host setup


@dataclass(frozen=True)
class Change:
    setting: Setting
    before: str | None  # None: the file does not exist (yet)


def conf_key(ifname: str, name: str) -> str:
    """net.ipv4.conf.<ifname>.<name>, with the dots of ifname escaped as slashes."""
    return f"net.ipv4.conf.{ifname.replace('.', '/')}.{name}"


def key_path(key: str) -> Path:
    return PROC_SYS.joinpath(*(part.replace("/", ".") for part in key.split(".")))


def desired(bridge: str, primary: str | None, secondaries: Iterable[str]) -> tuple[Setting, ...]:
    """Forwarding on, reverse-path filtering off where VM traffic enters or leaves.

    rp_filter is off because replies to VPC-routed VM addresses may arrive on a NIC other than
    the one the route back points to (secondary ENIs, alias ranges); the kernel uses the
    larger of conf.all and conf.<if>, so both are set. conf.default covers tap devices
    created later.
    """
    settings = [
        Setting(IP_FORWARD, FORWARD_ON, required=True),
        Setting(conf_key("all", "rp_filter"), RP_FILTER_OFF, required=True),
        Setting(conf_key("default", "rp_filter"), RP_FILTER_OFF, required=True),
        Setting(conf_key(bridge, "rp_filter"), RP_FILTER_OFF, required=True),
    ]
    for nic_name in dict.fromkeys([*([primary] if primary else []), *secondaries]):
        settings.append(Setting(conf_key(nic_name, "rp_filter"), RP_FILTER_OFF, required=False))
    for nic_name in dict.fromkeys(secondaries):
        if nic_name != primary:
            settings += [
                Setting(conf_key(nic_name, name), value, required=False)
                for name, value in ENI_ARP.items()
            ]
    return tuple(settings)


def value_we_set(key: str) -> str:
    """What host setup writes to key: forwarding on, an ENI's ARP settings, and every other
    setting is an rp_filter turned off. Records written before the values were kept per key
    rely on this."""
    if key == IP_FORWARD:
        return FORWARD_ON
    return ENI_ARP.get(key.rsplit(".", 1)[-1], RP_FILTER_OFF)


def read(key: str) -> str | None:
    try:
        return key_path(key).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise HostSetupError(f"read {key}: {exc.strerror}") from exc


def plan(settings: Iterable[Setting]) -> list[Change]:
    """The settings whose current value differs, with what they hold now.

    A best-effort setting that does not exist here (a NIC that is not in this namespace) is
    logged as a warning and left out; a required one stays in (the bridge may not exist yet).
    """
    out: list[Change] = []
    for setting in settings:
        before = read(setting.key)
        if before is None and not setting.required:
            log.warning("%s does not exist (no such interface?); not setting it", setting.key)
        elif before != setting.value:
            out.append(Change(setting, before))
    return out


def describe(change: Change) -> str:
    was = "absent" if change.before is None else change.before
    return f"set {change.setting.key}={change.setting.value} (was {was})"


def _write(key: str, value: str) -> None:
    try:
        key_path(key).write_text(value)
    except FileNotFoundError:
        raise HostSetupError(f"set {key}={value}: no such setting (interface missing?)") from None
    except OSError as exc:
        raise HostSetupError(f"set {key}={value}: {exc.strerror}") from exc


def apply(changes: Iterable[Change]) -> list[Change]:
    """Write each change; return those written, in order.

    A best-effort setting that cannot be written (a NIC that does not exist here) is logged
    as a warning and skipped.
    """
    done: list[Change] = []
    for change in changes:
        try:
            _write(change.setting.key, change.setting.value)
        except HostSetupError as exc:
            if change.setting.required:
                raise
            log.warning("%s; continuing", exc)
            continue
        done.append(change)
    return done


@dataclass(frozen=True)
class Left:
    """A setting teardown does not put back, and why."""

    key: str
    value: str
    reason: str

    def describe(self) -> str:
        return f"left {self.key}={self.value}: {self.reason}"


@dataclass(frozen=True)
class RestorePlan:
    restore: tuple[Change, ...]
    left: tuple[Left, ...]

    def lines(self) -> list[str]:
        """The report: each setting put back, then each one left and why."""
        return [describe(c) for c in self.restore] + [left.describe() for left in self.left]


def plan_restore(
    before: Mapping[str, str], ours: Mapping[str, str], current: Mapping[str, str | None]
) -> RestorePlan:
    """Which recorded settings go back to their value before host setup, and which stay.

    A setting is put back only while it still holds the value we wrote (ours, else
    value_we_set): a different value is someone else's decision, made after ours. ip_forward
    stays on even then: every program that needs forwarding writes the same "1", so an
    unchanged value does not show that nobody else relies on it, and turning it off cuts
    the traffic of whatever routes through this host (containers, kube-proxy, VPNs). A
    setting whose interface is gone, or that already holds its old value, needs nothing.
    """
    restore: list[Change] = []
    left: list[Left] = []
    for key, old in sorted(before.items()):
        now = current.get(key)
        if now is None or now == old:
            continue
        mine = ours.get(key, value_we_set(key))
        if now != mine:
            reason = f"changed by someone else since cocoon-net set it to {mine}"
            left.append(Left(key, now, reason))
        elif key == IP_FORWARD:
            reason = (
                f"other software may route through this host now (it was {old} before "
                f"cocoon-net); if nothing needs it: sysctl -w {key}={old}"
            )
            left.append(Left(key, now, reason))
        else:
            restore.append(Change(Setting(key, old, required=True), now))
    return RestorePlan(tuple(restore), tuple(left))


def read_restore_plan(before: Mapping[str, str], ours: Mapping[str, str]) -> RestorePlan:
    """plan_restore against the values the kernel holds now."""
    return plan_restore(before, ours, {key: read(key) for key in before})


def restore(before: Mapping[str, str], ours: Mapping[str, str]) -> list[str]:
    """Put back what plan_restore says (restores are required: a failed write raises)."""
    plan = read_restore_plan(before, ours)
    apply(plan.restore)
    return plan.lines()
