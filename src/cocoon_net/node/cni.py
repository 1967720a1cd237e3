"""The CNI network list that lets container runtimes plug VMs' taps into the bridge.

The bridge plugin only attaches ports: IP addresses come from our DHCP server, so `ipam` is
empty and the plugin neither masquerades nor acts as gateway. `macspoofchk` stops a VM from
sending with another VM's MAC and `portIsolation` stops VMs talking to each other at layer 2,
so all VM traffic passes the host's routing and firewall. Older bridge plugins ignore both keys
silently, so check the plugin version where isolation matters.
"""

from __future__ import annotations

import json
from pathlib import Path

from cocoon_net import config, fsutil
from cocoon_net.errors import HostSetupError


def render_conflist(bridge: str = config.DEFAULT_BRIDGE, port_isolation: bool = True) -> bytes:
    """The Go tool's exact bytes for cni0: keys sorted, 2-space indent, trailing newline.

    Without port isolation (`--allow-vm-to-vm`) VMs reach each other directly at layer 2 as
    they do through the gateway; the guard still checks every frame's addresses."""
    conf = {
        "cniVersion": "1.0.0",
        "name": config.CNI_NETWORK_NAME,
        "plugins": [
            {
                "bridge": bridge,
                "ipMasq": False,
                "ipam": {},
                "isGateway": False,
                "macspoofchk": True,
                "portIsolation": port_isolation,
                "type": "bridge",
            }
        ],
    }
    return (json.dumps(conf, indent=2, sort_keys=True) + "\n").encode()


def plan_conflist(path: Path, bridge: str, port_isolation: bool = True) -> list[str]:
    """What ensure_conflist would do: nothing when the file already holds our bytes."""
    try:
        if path.read_bytes() == render_conflist(bridge, port_isolation):
            return []
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise HostSetupError(f"read {path}: {exc.strerror}") from exc
    return [f"write {path}"]


def ensure_conflist(path: Path, bridge: str, port_isolation: bool = True) -> list[str]:
    """Write the conflist atomically (0644; directory 0750 when created) unless identical."""
    changes = plan_conflist(path, bridge, port_isolation)
    if changes:
        data = render_conflist(bridge, port_isolation)
        fsutil.atomic_write(path, data, mode=0o644, dir_mode=0o750)
    return changes


def plan_remove_conflist(path: Path) -> list[str]:
    return [f"remove {path}"] if path.exists() else []


def remove_conflist(path: Path) -> list[str]:
    return [f"remove {path}"] if fsutil.remove_file(path) else []
