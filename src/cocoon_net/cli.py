"""The cocoon-net command line: flags, validation, printing. No logic beyond that.

Exit codes: 0 success, 1 a failure (one line on stderr), 2 a usage error (one line on stderr,
nothing touched). Logs go to stderr, command output to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from cocoon_net import __version__, config, logsetup
from cocoon_net.errors import CocoonError, UsageError, one_line

if TYPE_CHECKING:
    from cocoon_net.lifecycle import NodeOptions

PROG = "cocoon-net"
log = logging.getLogger("cocoon_net")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2), never a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, "") or default


def _add_globals(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options accepted before or after the subcommand."""
    d = argparse.SUPPRESS if suppress else None
    p.add_argument(
        "--netns",
        metavar="NAME",
        default=d if suppress else _env(config.ENV_NETNS),
        help="run all node-side work inside this existing network namespace "
        f"(env {config.ENV_NETNS})",
    )
    p.add_argument(
        "--log-format",
        choices=logsetup.FORMATS,
        default=d if suppress else _env(config.ENV_LOG_FORMAT, "text"),
        help=f"log line format on stderr (env {config.ENV_LOG_FORMAT}; default text)",
    )
    p.add_argument(
        "--log-level",
        metavar="LEVEL",
        default=d if suppress else _env(config.ENV_LOG_LEVEL, "info"),
        help=f"debug, info, warn or error (env {config.ENV_LOG_LEVEL}; default info)",
    )


def _add_dir(p: argparse.ArgumentParser, flag: str, env: str, default: Path, what: str) -> None:
    p.add_argument(
        flag,
        type=Path,
        default=config.env_path(os.environ, env, default),
        help=f"{what} (env {env}; default {default})",
    )


def _add_state_dir(p: argparse.ArgumentParser) -> None:
    _add_dir(
        p, "--state-dir", config.ENV_STATE_DIR, config.DEFAULT_STATE_DIR, "directory of pool.json"
    )


def _add_run_dir(p: argparse.ArgumentParser) -> None:
    _add_dir(
        p,
        "--run-dir",
        config.ENV_RUN_DIR,
        config.DEFAULT_RUN_DIR,
        "directory of the locks and the control socket",
    )


def _add_cni_dir(p: argparse.ArgumentParser) -> None:
    _add_dir(
        p,
        "--cni-conf-dir",
        config.ENV_CNI_CONF_DIR,
        config.DEFAULT_CNI_CONF_DIR,
        f"where {config.CONFLIST_NAME} lives (daemon and teardown: unless pool.json records "
        "its path)",
    )


def _add_lease_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lease-file",
        type=Path,
        default=Path(os.environ[config.ENV_LEASE_FILE])
        if os.environ.get(config.ENV_LEASE_FILE)
        else None,
        help=f"DHCP lease file (env {config.ENV_LEASE_FILE}; default: the one recorded in "
        "pool.json, else <state-dir>/leases.json)",
    )


def _add_node_flags(p: argparse.ArgumentParser, *, pool_default: int) -> None:
    p.add_argument(
        "--platform",
        default="",
        help="gke, volcengine, aws or static (default: detected from instance metadata)",
    )
    p.add_argument("--node-name", required=True, help="virtual node name (required)")
    p.add_argument(
        "--subnet",
        required=True,
        help="VM subnet CIDR, e.g. 172.20.100.0/24, or (init) 'auto': claim the first free "
        "/--subnet-prefix block (gke: in --range-cidr; volcengine, aws: in the VPC) (required)",
    )
    p.add_argument("--subnet-prefix", type=int, default=24, help="--subnet auto's size (24)")
    p.add_argument(
        "--range-cidr",
        default="",
        help="gke, --subnet auto: the fleet's cocoon-pods range the first node creates",
    )
    p.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help=f"number of VM addresses in the pool (default {pool_default}, or what the subnet "
        "holds)",
    )
    p.add_argument("--gateway", default="", help="gateway IP on the bridge (default: first host)")
    p.add_argument(
        "--primary-nic",
        default="",
        help="host primary NIC (default: the interface of the default route)",
    )
    p.add_argument(
        "--dns",
        default=",".join(config.DEFAULT_DNS),
        help="comma-separated DNS servers for DHCP clients (default 8.8.8.8,1.1.1.1)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be done; change nothing"
    )
    p.add_argument(
        "--drop-internal-access",
        action="store_true",
        help="drop VM traffic to the node's own subnet (other VMs via the gateway)",
    )
    p.add_argument(
        "--drop-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="drop VM traffic to this CIDR (repeatable)",
    )
    p.add_argument(
        "--vpc-cidr",
        action="append",
        default=[],
        metavar="CIDR",
        help="destination VMs reach with their own address, not masqueraded (repeatable; "
        "default: the VPC ranges the platform reports)",
    )
    p.add_argument(
        "--mtu",
        type=int,
        default=None,
        help="bridge and DHCP MTU (default: the VPC's, else the primary NIC's)",
    )
    p.add_argument(
        "--bridge",
        default=_env(config.ENV_BRIDGE, config.DEFAULT_BRIDGE),
        help=f"bridge name (env {config.ENV_BRIDGE}; default {config.DEFAULT_BRIDGE})",
    )
    p.add_argument(
        "--bridge-mac",
        default="",
        help="bridge MAC address (default: 02:c0 followed by the gateway's four bytes)",
    )
    p.add_argument(
        "--allow-vm-to-vm",
        action="store_true",
        help="let VMs reach each other (through the gateway and, without port isolation in "
        "the CNI conflist, directly); default: only the VPC and the outside",
    )
    p.add_argument(
        "--allow-ipv6",
        action="store_true",
        help="let VMs send IPv6 (router advertisements and DHCPv6 replies stay dropped); "
        "default: IPv6 from VMs is dropped",
    )
    p.add_argument(
        "--security-group",
        default="",
        help="volcengine, aws: security group for the ENIs (default: the instance's own)",
    )
    _add_state_dir(p)
    _add_lease_file(p)
    _add_cni_dir(p)
    _add_run_dir(p)


def build_parser() -> argparse.ArgumentParser:
    root = _Parser(
        prog=PROG,
        description="VPC-native networking for microVM nodes: cloud address pools, host "
        "setup and an embedded DHCPv4 server on the VM bridge.",
    )
    root.add_argument("-v", "--version", action="version", version=f"{PROG} version {__version__}")
    _add_globals(root, suppress=False)
    sub = root.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_globals(p, suppress=True)
        return p

    p = command("init", "provision cloud networking for this node and set up the host")
    _add_node_flags(p, pool_default=config.POOL_SIZE_INIT)

    p = command("adopt", "register a node whose cloud networking already exists (no cloud changes)")
    _add_node_flags(p, pool_default=config.POOL_SIZE_ADOPT)
    p.add_argument(
        "--manage-iptables",
        action="store_true",
        help="let cocoon-net install its firewall rules (default: leave the firewall alone, "
        "and the daemon will too)",
    )

    p = command("daemon", "set up the host and serve DHCP on the bridge (systemd service)")
    _add_state_dir(p)
    _add_lease_file(p)
    _add_cni_dir(p)
    _add_run_dir(p)
    p.add_argument(
        "--skip-iptables", action="store_true", help="do not install or change firewall rules"
    )
    p.add_argument(
        "--no-guard",
        action="store_true",
        help="escape hatch: run without the VM guard (any VM may then use any address) and "
        "remove its tables if this daemon installed them (default: guard on)",
    )
    p.add_argument(
        "--metrics-addr",
        default=os.environ.get(config.ENV_METRICS_ADDR, config.DEFAULT_METRICS_ADDR),
        help=f"Prometheus metrics listen address; empty disables (env {config.ENV_METRICS_ADDR}; "
        f"default {config.DEFAULT_METRICS_ADDR})",
    )
    p.add_argument(
        "--lease-time",
        default=str(config.DEFAULT_LEASE_SECONDS),
        help="DHCP lease time, e.g. 24h, 90m or 3600s (default 24h)",
    )
    p.add_argument(
        "--decline-quarantine",
        default="10m",
        help="how long an address a VM declined (found in use) is kept out of the pool "
        "(default 10m)",
    )
    p.add_argument("--domain", default="", help="DHCP option 15: the VMs' domain name")
    p.add_argument(
        "--search", default="", help="DHCP option 119: comma-separated DNS search domains"
    )
    p.add_argument("--ntp", default="", help="DHCP option 42: comma-separated NTP servers")
    p.add_argument(
        "--classless-route",
        action="append",
        default=[],
        metavar="CIDR=GATEWAY",
        help="DHCP options 121 and 249 (Windows): a route for the VMs (repeatable)",
    )
    p.add_argument(
        "--reservation",
        action="append",
        default=[],
        metavar="MAC=IP",
        help="always give this MAC this pool address (repeatable)",
    )
    p.add_argument(
        "--relay-from",
        action="append",
        default=[],
        metavar="IP",
        help="answer relayed requests (giaddr set) from this relay agent (repeatable; "
        "default: relayed requests are dropped)",
    )
    p.add_argument(
        "--read-interval",
        default=f"{config.DEFAULT_READ_INTERVAL_MS}ms",
        help="while requests keep coming, read them at most once per this interval and "
        "answer what queued meanwhile together: less CPU per request, at most this much "
        f"added to a reply (0: each at once; at most {config.MAX_READ_INTERVAL_MS}ms; "
        f"default {config.DEFAULT_READ_INTERVAL_MS}ms)",
    )

    p = command("release", "end a VM's lease at once (the VM manager calls this on VM deletion)")
    _add_run_dir(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--mac", default="", help="the VM's MAC address")
    who.add_argument("--ip", default="", help="the VM's address")

    p = command("status", "show the pool, leases and cloud resources")
    _add_state_dir(p)
    _add_run_dir(p)
    p.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    p.add_argument(
        "--no-cloud", action="store_true", help="do not ask the cloud (faster, works offline)"
    )

    p = command("teardown", "remove what init/adopt created: cloud resources, host setup, state")
    _add_state_dir(p)
    _add_cni_dir(p)
    _add_run_dir(p)
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; change nothing"
    )
    p.add_argument(
        "--remove-range",
        action="store_true",
        help="gke: also remove the cocoon-pods range once no instance uses it",
    )

    p = command("completion", "print the shell completion script for bash, zsh or fish")
    p.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell")
    return root


def _paths(args: argparse.Namespace) -> config.Paths:
    return config.Paths(
        state_dir=args.state_dir,
        run_dir=getattr(args, "run_dir", config.DEFAULT_RUN_DIR),
        cni_conf_dir=getattr(args, "cni_conf_dir", config.DEFAULT_CNI_CONF_DIR),
        lease_file=getattr(args, "lease_file", None),
    )


def _node_options(args: argparse.Namespace) -> NodeOptions:
    from cocoon_net.lifecycle import NodeOptions

    auto = args.subnet.strip() == "auto"
    if auto:
        subnet = config.auto_subnet(args.command, args.subnet_prefix, args.gateway)
    else:
        subnet = config.parse_subnet(args.subnet)
    if not auto and str(subnet) != args.subnet.strip():
        log.warning("--subnet %s has host bits set; using %s", args.subnet, subnet)
    gateway = config.resolve_gateway(args.gateway, subnet)
    default = config.POOL_SIZE_INIT if args.command == "init" else config.POOL_SIZE_ADOPT
    bridge_mac = args.bridge_mac.strip().lower() or None
    if bridge_mac is not None:
        config.parse_mac(bridge_mac, flag="--bridge-mac")
    return NodeOptions(
        command=args.command,
        platform=config.parse_platform(args.platform),
        node_name=config.parse_node_name(args.node_name),
        subnet=subnet,
        gateway=gateway,
        pool_size=config.resolve_pool_size(args.pool_size, subnet, default),
        primary_nic=config.parse_ifname(args.primary_nic, flag="--primary-nic")
        if args.primary_nic
        else None,
        dns=tuple(config.parse_dns(args.dns)),
        drop_internal_access=args.drop_internal_access,
        drop_cidrs=tuple(config.parse_cidr_list(args.drop_cidr, flag="--drop-cidr")),
        vpc_cidrs=tuple(config.parse_cidr_list(args.vpc_cidr, flag="--vpc-cidr")),
        mtu=config.parse_mtu(args.mtu),
        bridge=config.parse_ifname(args.bridge, flag="--bridge"),
        bridge_mac=bridge_mac,
        manage_iptables=args.command == "init" or args.manage_iptables,
        paths=_paths(args),
        dry_run=args.dry_run,
        platform_options=config.platform_options(args.security_group, args.range_cidr),
        subnet_auto=auto,
        allow_vm_to_vm=args.allow_vm_to_vm,
        allow_ipv6=args.allow_ipv6,
    )


def _cmd_provision(args: argparse.Namespace) -> int:
    from cocoon_net.lifecycle import provision_node

    opts = _node_options(args)
    _enter_netns(args)
    _print(provision_node(opts))
    return 0


def _cmd_teardown(args: argparse.Namespace) -> int:
    from cocoon_net.lifecycle import teardown_node

    _enter_netns(args)
    _print(
        teardown_node(
            _paths(args), dry_run=args.dry_run, environ=os.environ, remove_range=args.remove_range
        )
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from cocoon_net.status import show_status

    _enter_netns(args)
    _print(show_status(_paths(args), as_json=args.json, ask_cloud=not args.no_cloud))
    return 0


def _cmd_daemon(args: argparse.Namespace) -> int:
    from cocoon_net.daemon import DaemonOptions, parse_routes, run

    reservations = {}
    for item in args.reservation:
        mac, sep, ip = item.partition("=")
        if not sep:
            raise UsageError(f"invalid --reservation {item!r}: expected MAC=IP")
        reservations[config.parse_mac(mac, flag="--reservation")] = config.parse_ipv4(
            ip, flag="--reservation"
        )
    if args.metrics_addr:
        # Only then: prometheus_client is slow to import and stays resident.
        from cocoon_net.metrics import parse_listen

        parse_listen(args.metrics_addr)
    opts = DaemonOptions(
        paths=_paths(args),
        skip_iptables=args.skip_iptables,
        guard=not args.no_guard,
        metrics_addr=args.metrics_addr,
        lease_seconds=config.parse_duration(args.lease_time, flag="--lease-time"),
        relay_from=tuple(config.parse_ipv4(ip, flag="--relay-from") for ip in args.relay_from),
        domain=args.domain.strip(),
        search=tuple(config.split_list(args.search)),
        ntp=tuple(config.parse_ipv4(ip, flag="--ntp") for ip in config.split_list(args.ntp)),
        classless_routes=parse_routes(args.classless_route),
        reservations=reservations,
        decline_quarantine=float(
            config.parse_duration(args.decline_quarantine, flag="--decline-quarantine")
        ),
        read_interval=config.parse_milliseconds(
            args.read_interval, flag="--read-interval", maximum=config.MAX_READ_INTERVAL_MS
        ),
    )
    _enter_netns(args)
    return run(opts)


def _cmd_release(args: argparse.Namespace) -> int:
    from cocoon_net import control

    if args.mac:
        request = {"cmd": "release", "mac": config.parse_mac(args.mac, flag="--mac")}
    else:
        request = {"cmd": "release", "ip": str(config.parse_ipv4(args.ip, flag="--ip"))}
    _enter_netns(args)
    answer = control.request(_paths_run(args), request)
    released = answer.get("released") or []
    if not released:
        raise CocoonError(f"no active lease for {args.mac or args.ip}")
    _print([f"released {ip}" for ip in released])
    return 0


def _cmd_completion(args: argparse.Namespace) -> int:
    from cocoon_net import completion

    sys.stdout.write(completion.script(args.shell, build_parser()))
    return 0


def _paths_run(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) / config.CONTROL_SOCKET


def _enter_netns(args: argparse.Namespace) -> None:
    if args.netns:
        from cocoon_net import netns

        netns.enter(args.netns)


def _print(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": _cmd_provision,
    "adopt": _cmd_provision,
    "daemon": _cmd_daemon,
    "release": _cmd_release,
    "status": _cmd_status,
    "teardown": _cmd_teardown,
    "completion": _cmd_completion,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logsetup.setup(args.log_level, args.log_format)
        return _COMMANDS[args.command](args)
    except CocoonError as exc:
        log.debug("full error: %s", exc)
        sys.stderr.write(one_line(f"{PROG}: {exc}") + "\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:  # a bug: one line for the operator, the traceback in debug logs
        log.debug("internal error", exc_info=True)
        sys.stderr.write(
            f"{PROG}: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --log-level debug for the traceback)\n"
        )
        return 1
