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
        Setting("net.ipv4.ip_forward", "1", required=True),
        Setting(conf_key("all", "rp_filter"), "0", required=True),
        Setting(conf_key("default", "rp_filter"), "0", required=True),
        Setting(conf_key(bridge, "rp_filter"), "0", required=True),
    ]
    for nic_name in dict.fromkeys([*([primary] if primary else []), *secondaries]):
        settings.append(Setting(conf_key(nic_name, "rp_filter"), "0", required=False))
    return tuple(settings)


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


def apply(changes: Iterable[Change]) -> tuple[dict[str, str], list[str]]:
    """Write each change; return the previous values of what was written, and the change lines.

    A best-effort setting that cannot be written (a NIC that does not exist here) is logged
    as a warning and skipped.
    """
    before: dict[str, str] = {}
    done: list[str] = []
    for change in changes:
        try:
            _write(change.setting.key, change.setting.value)
        except HostSetupError as exc:
            if change.setting.required:
                raise
            log.warning("%s; continuing", exc)
            continue
        if change.before is not None:
            before[change.setting.key] = change.before
        done.append(describe(change))
    return before, done


def plan_restore(before: Mapping[str, str]) -> list[Change]:
    """Put back recorded values; settings of interfaces that are gone have nothing to restore."""
    out: list[Change] = []
    for key, value in sorted(before.items()):
        current = read(key)
        if current is not None and current != value:
            out.append(Change(Setting(key, value, required=True), current))
    return out


def restore(before: Mapping[str, str]) -> list[str]:
    return apply(plan_restore(before))[1]
