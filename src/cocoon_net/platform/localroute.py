"""The GCE guest agent's `local <alias cidr> dev <nic> table local` route, and its switch.

For every alias IP range the guest agent installs a route of type local for the whole range in
the kernel's local table (255). With it the host claims every VM address as its own and
answers for them, so VM traffic never reaches the bridge.

Two measures, both reversible:
  * `remove_guest_agent_routes(cidr)` deletes exactly that route (type local, table local, dst
    == our range, any device) and nothing else: the host's own addresses are /32 local routes
    and never match a /30-or-larger range. It is a plan (pure) plus an apply, so the daemon's
    reconciler can call it at start, on netlink route events and periodically.
  * `set_agent_ip_aliases(path, "false")` turns the agent's alias handling off in its config
    (`[IpForwarding] ip_aliases`, read from /etc/default/instance_configs.cfg by
    google-guest-agent's cfg package) and returns the previous value, which teardown hands back
    to `set_agent_ip_aliases(path, previous)`; None means the key was absent and is removed.
    The agent reads its config when it starts, so the route removal covers the time until then.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from cocoon_net import proc
from cocoon_net.errors import HostSetupError
from cocoon_net.fsutil import atomic_write, remove_file

ENV_AGENT_CONFIG = "COCOON_NET_GCE_AGENT_CONFIG"
DEFAULT_AGENT_CONFIG = Path("/etc/default/instance_configs.cfg")
AGENT_SECTION = "IpForwarding"
AGENT_KEY = "ip_aliases"


def agent_config_path(environ: Mapping[str, str]) -> Path:
    value = environ.get(ENV_AGENT_CONFIG, "")
    return Path(value) if value else DEFAULT_AGENT_CONFIG


# ---------------------------------------------------------------------------- the route


@dataclass(frozen=True)
class LocalRoute:
    dst: str
    dev: str

    def argv(self) -> list[str]:
        return ["ip", "route", "del", "local", self.dst, "dev", self.dev, "table", "local"]

    def __str__(self) -> str:
        return f"local {self.dst} dev {self.dev} table local"


def plan_route_removal(routes: Sequence[Mapping[str, Any]], cidr: IPv4Network) -> list[LocalRoute]:
    """The routes of `ip -json route show table local type local` that the agent added for cidr."""
    out: list[LocalRoute] = []
    for route in routes:
        dst = str(route.get("dst", ""))
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net == cidr and route.get("type", "local") == "local" and route.get("dev"):
            out.append(LocalRoute(str(net), str(route["dev"])))
    return out


def remove_guest_agent_routes(cidr: IPv4Network | str) -> list[str]:
    """Delete the agent's local route(s) for cidr; return what was removed (often nothing)."""
    net = ipaddress.ip_network(cidr, strict=False)
    if not isinstance(net, IPv4Network):
        raise HostSetupError(f"guest-agent route: {cidr} is not an IPv4 range")
    routes = proc.run_json(["ip", "-json", "route", "show", "table", "local", "type", "local"])
    removed: list[str] = []
    for route in plan_route_removal(routes, net):
        # exit 2 "No such process": removed concurrently (the reconciler races the agent)
        result = proc.run(route.argv(), ok_codes=(0, 2))
        if result.returncode == 0:
            removed.append(str(route))
    return removed


# ---------------------------------------------------------------------------- the config


_SECTION = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*$")
_KEY = re.compile(r"^\s*([^=:#;\s][^=:]*?)\s*[=:]\s*(.*?)\s*$")


def edit_ini(text: str, section: str, key: str, value: str | None) -> tuple[str, str | None]:
    """Set (or with None, delete) section.key in INI text; return (new text, previous value).

    Line-based so the operator's comments and layout survive. Names compare case-insensitively,
    as the agent loads the file (go-ini, Insensitive: true). A section left empty by a delete
    is removed with its header.
    """
    lines = text.splitlines()
    start = end = None  # the section's header line and the line after its last one
    for i, line in enumerate(lines):
        header = _SECTION.match(line)
        if header:
            if start is not None and end is None:
                end = i
            if header.group(1).lower() == section.lower() and start is None:
                start = i
    if start is not None and end is None:
        end = len(lines)
    previous: str | None = None
    key_at = None
    if start is not None and end is not None:
        for i in range(start + 1, end):
            match = _KEY.match(lines[i])
            if match and match.group(1).lower() == key.lower():
                previous, key_at = match.group(2), i
    if value is None:
        if key_at is not None:
            del lines[key_at]
            assert start is not None and end is not None
            if not any(line.strip() for line in lines[start + 1 : end - 1]):
                del lines[start : end - 1]
                while lines and not lines[-1].strip():
                    lines.pop()  # the separator written when the section was appended
    elif key_at is not None:
        lines[key_at] = f"{key} = {value}"
    elif start is not None:
        lines.insert(start + 1, f"{key} = {value}")
    else:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"[{section}]", f"{key} = {value}"]
    return ("\n".join(lines) + "\n" if lines else ""), previous


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise HostSetupError(f"read {path}: {exc.strerror}") from exc


def read_agent_ip_aliases(path: Path) -> str | None:
    """[IpForwarding] ip_aliases as the file has it; None when the key (or file) is absent."""
    return edit_ini(_read(path), AGENT_SECTION, AGENT_KEY, None)[1]


def set_agent_ip_aliases(path: Path, value: str | None) -> str | None:
    """Set [IpForwarding] ip_aliases in the agent's config (None: remove it); return the
    previous value. A file that ends up empty is removed, as it did not exist before."""
    text = _read(path)
    new, previous = edit_ini(text, AGENT_SECTION, AGENT_KEY, value)
    if new != text:
        if new.strip():
            atomic_write(path, new.encode(), mode=0o644, dir_mode=0o755)
        else:
            remove_file(path)
    return previous


# ---------------------------------------------------------------------------- the Go tool's cron

ENV_GO_CRON = "COCOON_NET_GCE_GO_CRON_FILE"
DEFAULT_GO_CRON = Path("/etc/cron.d/cocoon-net-fix-alias")
_GO_CRON_LINE = re.compile(
    r"@reboot root ip route del local (\S+) dev \S+ table local 2>/dev/null \|\| true\n?"
)


def go_cron_path(environ: Mapping[str, str]) -> Path:
    value = environ.get(ENV_GO_CRON, "")
    return Path(value) if value else DEFAULT_GO_CRON


def is_go_cron_for(path: Path, cidr: IPv4Network) -> bool:
    """Whether path holds exactly the one line the Go tool's init wrote for cidr (its
    @reboot route fix, which our daemon's route watch replaces). Anything else in the file
    makes it someone else's."""
    match = _GO_CRON_LINE.fullmatch(_read(path))
    if match is None:
        return False
    try:
        return ipaddress.ip_network(match.group(1), strict=False) == cidr
    except ValueError:
        return False
